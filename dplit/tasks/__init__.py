"""LightningModules, one per task family. No DP code in here, ever."""

from dplit.tasks.base import GroupedTask, default_optimizer
from dplit.tasks.causal_lm import CausalLMTask
from dplit.tasks.classification import ClassificationTask
from dplit.tasks.vision import MultiLabelTask, MultiViewClassificationTask

__all__ = [
    "CausalLMTask",
    "ClassificationTask",
    "GroupedTask",
    "MultiLabelTask",
    "MultiViewClassificationTask",
    "default_optimizer",
]
