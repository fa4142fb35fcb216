"""How much of the pretrained network trains, and at what learning rate."""

from finetune.finetuning.feature_cache import FeatureCache
from finetune.finetuning.lp_ft import LinearProbeThenFinetune
from finetune.finetuning.param_groups import param_groups
from finetune.finetuning.schedule import WarmupCosine
from finetune.finetuning.strategies import Frozen, Full, Gradual

__all__ = ["FeatureCache", "Frozen", "Full", "Gradual", "LinearProbeThenFinetune", "WarmupCosine", "param_groups"]
