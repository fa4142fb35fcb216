"""Models: the backbone factory, weights sources and the LightningModule."""

from finetune.models.backbones import create_backbone
from finetune.models.classifier import ImageClassifier

__all__ = ["ImageClassifier", "create_backbone"]
