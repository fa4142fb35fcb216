"""Callbacks that show what a run learned (TensorBoard views) and write predictions."""

from finetune.callbacks.confusion_matrix import ConfusionMatrix
from finetune.callbacks.prediction_grid import PredictionGrid
from finetune.callbacks.prediction_writer import PredictionWriter
from finetune.callbacks.top_losses import TopLosses

__all__ = ["ConfusionMatrix", "PredictionGrid", "PredictionWriter", "TopLosses"]
