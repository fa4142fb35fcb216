"""Calibrated probabilities for an ImageClassifier: the softmax temperature fitted on validation
(callbacks.calibration), one per test-time augmentation, and the ECE metrics that judge them."""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.classification import MulticlassCalibrationError

from finetune.errors import FinetuneError

TTA_VIEWS = (None, "hflip")


def check_tta(tta: str | None) -> str | None:
    """`tta` if it is a test-time augmentation this package knows; else a one-line error."""
    if tta not in TTA_VIEWS:
        raise FinetuneError(f"tta={tta} is not one of {sorted(str(v) for v in TTA_VIEWS)}; use tta=hflip or tta=null")
    return tta


def calibration_error(num_classes: int) -> MulticlassCalibrationError:
    """Expected calibration error over 15 confidence bins (Guo et al. 2017). It is fed
    probabilities, never logits: torchmetrics applies softmax only when some value lies outside
    [0, 1], so logits that happen to lie inside would be read as probabilities."""
    return MulticlassCalibrationError(num_classes, n_bins=15, norm="l1")


class Calibrated:
    """The temperature and test-time augmentation part of `ImageClassifier` (a mixin: it uses the
    module's `hparams`, `head`, `log` and its ECE metrics `val_ece`, `test_ece`, `test_ece_calibrated`).
    `temperature`, `tta_temperatures` and `tta` are set by the classifier's __init__."""

    temperature: float
    tta_temperatures: dict[str, float]
    tta: str | None

    def set_temperature(self, temperature: float, tta: str | None = None) -> None:
        """The softmax temperature that calibrates the probabilities (fitted on the validation
        split by callbacks.calibration); in the hparams, so every checkpoint carries the value
        fitted for its own weights. Logits (`forward`, the loss, accuracy) never use it: only the
        probabilities users see (`predict_step`, `test/ece_calibrated`, the exported model) do.
        `tta`: the one fitted on logits averaged over that test-time augmentation's views."""
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if tta is None:
            self.temperature = float(temperature)
            self.hparams["temperature"] = self.temperature
        else:
            self.tta_temperatures[tta] = float(temperature)
            self.hparams["tta_temperatures"] = dict(self.tta_temperatures)

    @property
    def applied_temperature(self) -> float:
        """The temperature for the logits `tta_logits` gives: fitted on the same kind of logits.
        Uncalibrated models (T = 1) need none for a test-time augmentation."""
        if self.tta is None:
            return self.temperature
        if self.tta in self.tta_temperatures:
            return self.tta_temperatures[self.tta]
        if self.temperature == 1.0 and not self.tta_temperatures:
            return 1.0
        raise FinetuneError(
            f"tta={self.tta}: this checkpoint's temperature ({self.temperature:.4g}) was fitted on plain "
            f"validation logits, not on {self.tta}-averaged ones, and would miscalibrate them; train with "
            f"tta={self.tta} (calibration then fits both), or use tta=null")

    def calibrated_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """softmax(logits / temperature), with the temperature fitted for these logits (plain or
        TTA-averaged): the same argmax as the logits, honest confidences."""
        return (logits.float() / self.applied_temperature).softmax(dim=-1)

    @torch.no_grad()
    def fold_temperature(self) -> None:
        """Divide the head's last linear layer by the temperature, so `forward` itself returns
        calibrated logits (for export: the deployed graph needs no extra op); the temperature
        becomes 1, so the probabilities are the same before and after."""
        last = self.head[-1]
        if not isinstance(last, nn.Linear):
            raise TypeError(f"fold_temperature needs a head ending in nn.Linear, not {type(last).__name__}")
        last.weight.div_(self.temperature)
        if last.bias is not None:
            last.bias.div_(self.temperature)
        self.set_temperature(1.0)

    def set_tta(self, tta: str | None) -> None:
        """`hflip`: test and predict average the logits of each image and its mirror image (then
        the temperature and softmax apply as usual, so loss, ECE and probabilities stay defined
        on one set of logits); None: the plain view."""
        self.tta = check_tta(tta)
        self.applied_temperature  # noqa: B018  a temperature fitted for other logits fails here, in one line

    def tta_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits through `self.tta`'s views (the plain forward without TTA or for cached features)."""
        logits = self(images)
        if self.tta == "hflip" and images.dim() == 4:
            logits = (logits + self(images.flip(-1))) / 2
        return logits

    def _log_calibration(self, logits: torch.Tensor, targets: torch.Tensor, stage: str) -> None:
        """`<stage>/ece` of the network's probabilities; on test also `test/ece_calibrated`, with
        the temperature (the one the checkpoint under test carries)."""
        logits = logits.detach().float()
        raw = self.val_ece if stage == "val" else self.test_ece
        raw.update(logits.softmax(dim=-1), targets)
        self.log(f"{stage}/ece", raw, on_step=False, on_epoch=True)
        if stage == "test":
            self.test_ece_calibrated.update(self.calibrated_probabilities(logits), targets)
            self.log("test/ece_calibrated", self.test_ece_calibrated, on_step=False, on_epoch=True)
