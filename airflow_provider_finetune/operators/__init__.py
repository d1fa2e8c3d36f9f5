"""The provider's operators. Import from here:

from airflow_provider_finetune.operators import FinetuneKubernetesOperator
"""

from airflow_provider_finetune.operators.base import EngineJobOperator
from airflow_provider_finetune.operators.deliver import DataScriptToBucketOperator, HFModelToBucketOperator
from airflow_provider_finetune.operators.deploy import DeployVLLMOperator, UndeployVLLMOperator
from airflow_provider_finetune.operators.evaluate import EvaluateModelsOperator
from airflow_provider_finetune.operators.finetune import FinetuneKubernetesOperator
from airflow_provider_finetune.operators.merge import MergeAdapterOperator
from airflow_provider_finetune.operators.quantize import QuantizeModelOperator

__all__ = [
    "DataScriptToBucketOperator",
    "DeployVLLMOperator",
    "EngineJobOperator",
    "EvaluateModelsOperator",
    "FinetuneKubernetesOperator",
    "HFModelToBucketOperator",
    "MergeAdapterOperator",
    "QuantizeModelOperator",
    "UndeployVLLMOperator",
]
