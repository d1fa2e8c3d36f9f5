"""Triggers of the provider's deferrable operators (run in the triggerer; no torch, no blocking I/O)."""

from airflow_provider_finetune.triggers.job import TrainingJobTrigger

__all__ = ["TrainingJobTrigger"]
