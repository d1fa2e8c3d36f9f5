"""Airflow provider for LLM fine-tuning on Kubernetes."""

# The one home of the release version: pyproject.toml reads it (setuptools dynamic version),
# get_provider_info and the default engine image tag use it; the engine's pyproject.toml, the
# image build commands and the docs repeat it, checked by tests/provider/test_constants.py.
__version__ = "0.1.0"
