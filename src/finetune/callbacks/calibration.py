"""Temperature scaling (Guo et al. 2017): one number that makes a classifier's probabilities honest.

Fine-tuned networks are over-confident: their top probability is higher than their accuracy.
Dividing the logits by a temperature T > 1 fitted on held-out data (the NLL, one parameter)
fixes most of it, and cannot change any prediction: argmax(z / T) = argmax(z) for every T > 0.

`TemperatureScaling` fits T on every validation epoch's logits (a few milliseconds, no extra
forward pass: the validation step returns them) and stores it in the module's hparams before
ModelCheckpoint saves, so each checkpoint, the best one included, carries the temperature fitted
for its own weights (the averaged ones too, when weight averaging swaps them in for validation).
After test it draws the reliability diagram, before and after the temperature.

Test-time augmentation (`tta=hflip`) averages the logits of each image and its mirror image; the
average is less confident than either, so the plain logits' temperature over-corrects it. With
`tta` the callback also fits a temperature on the validation logits averaged the same way, stored
beside the plain one; test and predict apply the one fitted for the logits they compute.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image
from torchmetrics.functional.classification import multiclass_calibration_error

from finetune.callbacks.confusion_matrix import render
from finetune.callbacks.grid import batch_logits, tensorboard

# A validation split the model gets entirely right pushes the fitted T towards 0 (and one it
# cannot beat chance on, towards infinity): keep it finite.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-2, 1e2
N_BINS = 15


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 100) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T) on `targets` (LBFGS on log T, in
    float64 on the CPU). The NLL is convex in 1/T, so the optimum found is the global one."""
    # Validation hooks run under inference mode / no_grad; inference tensors are copied out of it.
    with torch.inference_mode(False), torch.enable_grad():
        logits = logits.detach().to("cpu", torch.float64).clone()
        targets = targets.detach().to("cpu").clone()
        log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(logits / log_t.exp(), targets)
            loss.backward()
            return loss

        optimizer.step(closure)
    return float(log_t.detach().exp().clamp(MIN_TEMPERATURE, MAX_TEMPERATURE))


def expected_calibration_error(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    """ECE (15 bins, as `val/ece`) of softmax(logits / temperature)."""
    probabilities = (logits.float() / temperature).softmax(dim=-1)
    return float(multiclass_calibration_error(probabilities, targets, logits.shape[-1], n_bins=N_BINS))


def reliability_bins(logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                     n_bins: int = N_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per confidence bin: mean confidence, accuracy and count (NaN where a bin is empty)."""
    confidence, predicted = (logits.float() / temperature).softmax(dim=-1).max(dim=-1)
    correct = (predicted == targets).float()
    bins = torch.clamp((confidence * n_bins).long(), max=n_bins - 1)
    counts = torch.bincount(bins, minlength=n_bins).float()
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = (torch.bincount(bins, confidence, minlength=n_bins) / counts).numpy()
        accuracy = (torch.bincount(bins, correct, minlength=n_bins) / counts).numpy()
    return mean_conf, accuracy, counts.numpy()


def reliability_figure(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> Figure:
    """Accuracy against confidence, before and after the temperature; the diagonal is perfect
    calibration, points below it are over-confident."""
    figure = Figure(figsize=(5.5, 5), dpi=100)
    ax = figure.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    for t, colour, name in ((1.0, "tab:red", "network"), (temperature, "tab:blue", f"T = {temperature:.3g}")):
        conf, acc, counts = reliability_bins(logits, targets, t)
        seen = counts > 0
        ece = expected_calibration_error(logits, targets, t)
        ax.plot(conf[seen], acc[seen], marker="o", color=colour, label=f"{name}: ECE {ece:.4f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability on {len(targets)} images ({N_BINS} bins)")
    ax.legend(loc="upper left")
    figure.tight_layout()
    return figure


def _gather(pl_module: L.LightningModule, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' logits and targets (every rank gets the same, so every rank fits the same T).

    Ranks can hold different numbers of images (33 test images over 2 ranks), and all_gather
    needs equal shapes: pad each rank's rows to the largest count, gather, then drop the padding.
    """
    logits = torch.cat([p[0] for p in parts])
    targets = torch.cat([p[1] for p in parts])
    if pl_module.trainer.world_size <= 1:
        return logits.cpu(), targets.cpu()
    count = torch.tensor([len(targets)], device=logits.device)
    counts = pl_module.all_gather(count).reshape(-1).tolist()
    pad = max(counts) - len(targets)
    logits = F.pad(logits, (0, 0, 0, pad))
    targets = F.pad(targets, (0, pad))
    all_logits = pl_module.all_gather(logits)
    all_targets = pl_module.all_gather(targets)
    logits = torch.cat([all_logits[r, :n] for r, n in enumerate(counts)])
    targets = torch.cat([all_targets[r, :n] for r, n in enumerate(counts)])
    return logits.cpu(), targets.cpu()


def tta_average(pl_module: L.LightningModule, logits: torch.Tensor, images: torch.Tensor, tta: str) -> torch.Tensor:
    """The logits `tta` would give (the module's own `tta_logits` rule), from the plain ones and
    one more forward pass; cached features (2-D) have no views, so theirs are the plain logits."""
    if tta != "hflip" or images.dim() != 4:
        return logits.detach().float()
    return ((logits.float() + pl_module(images.flip(-1)).float()) / 2).detach()


class TemperatureScaling(L.Callback):
    """`fit=True`: fit the temperature on each validation epoch's logits, set it on the module
    (hence in the checkpoints saved after that epoch) and log `val/temperature` and
    `val/ece_calibrated`; with `tta`, also the temperature for that test-time augmentation
    (`val/temperature_<tta>`). After test (train's or eval's): the reliability diagram in TensorBoard
    (`tag`) and, with `save_dir`, reliability_diagram.png there.
    """

    def __init__(self, fit: bool = True, save_dir: str | None = None,
                 tag: str = "test/reliability_diagram", tta: str | None = None) -> None:
        self.fit = fit
        self.save_dir = Path(save_dir) if save_dir else None
        self.tag = tag
        self.tta = tta
        self._parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._tta_parts: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _collect(self, pl_module: L.LightningModule, outputs: Any, batch: Any) -> None:
        logits = batch_logits(pl_module, outputs, batch[0])
        self._parts.append((logits.detach().float(), batch[1].detach()))
        if self.tta and self.fit and pl_module.trainer.validating:
            self._tta_parts.append((tta_average(pl_module, logits, batch[0], self.tta), batch[1].detach()))

    # --- validation: fit ------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._parts, self._tta_parts = [], []

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.fit and not trainer.sanity_checking and dataloader_idx == 0:
            self._collect(pl_module, outputs, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._parts:
            return
        logits, targets = _gather(pl_module, self._parts)
        self._parts = []
        temperature = fit_temperature(logits, targets)
        pl_module.set_temperature(temperature)
        pl_module.log("val/temperature", temperature, on_epoch=True)
        pl_module.log("val/ece_calibrated", expected_calibration_error(logits, targets, temperature), on_epoch=True)
        if self._tta_parts:
            logits, targets = _gather(pl_module, self._tta_parts)
            self._tta_parts = []
            temperature = fit_temperature(logits, targets)
            pl_module.set_temperature(temperature, tta=self.tta)
            pl_module.log(f"val/temperature_{self.tta}", temperature, on_epoch=True)

    # --- test: show -----------------------------------------------------------------------------
    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._parts = []

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                          batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx == 0:
            self._collect(pl_module, outputs, batch)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._parts:
            return
        logits, targets = _gather(pl_module, self._parts)
        self._parts = []
        writer = tensorboard(trainer)
        if not trainer.is_global_zero or (writer is None and self.save_dir is None):
            return
        picture = render(reliability_figure(logits, targets, pl_module.applied_temperature))
        if writer is not None:
            writer.add_image(self.tag, picture[..., :3], global_step=trainer.global_step, dataformats="HWC")
        if self.save_dir is not None:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(picture).save(self.save_dir / "reliability_diagram.png")
