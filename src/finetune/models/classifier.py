"""The LightningModule: a pretrained backbone, a new head sized to the data, metrics and optimizer."""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchmetrics import MaxMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from finetune.data.transforms import Preprocessing
from finetune.finetuning.param_groups import check_partition, param_groups
from finetune.hardware import compile_problem, is_convolutional
from finetune.models.backbones import create_backbone
from finetune.models.calibration import TTA_VIEWS, Calibrated, calibration_error  # noqa: F401  (TTA_VIEWS: its former home)
from finetune.models.factory_config import OPTIMIZER_TYPES, SCHEDULER_TYPES, as_config, as_factory
from finetune.models.weights import WeightsSpec

log = logging.getLogger("finetune")


def _metrics(num_classes: int, prefix: str) -> MetricCollection:
    metrics: dict[str, Any] = {"acc": MulticlassAccuracy(num_classes, average="micro")}
    if num_classes > 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics, prefix=prefix)


class ImageClassifier(Calibrated, L.LightningModule):
    """`backbone` (pretrained, classifier removed) followed by `head` (new, sized to the data).

    Everything needed to rebuild the model (architecture, class names, preprocessing) is a
    hyperparameter, so a checkpoint alone is enough for eval, predict and export.
    """

    def __init__(
        self,
        name: str = "resnet18",
        weights: str | None = "DEFAULT",
        num_classes: int = 1000,
        class_names: Sequence[str] | None = None,
        optimizer: partial | Mapping | None = None,
        scheduler: partial | Mapping | None = None,
        scheduler_interval: str = "epoch",
        head_dropout: float = 0.0,
        drop_path: float | None = None,
        label_smoothing: float = 0.0,
        head_lr_mult: float = 1.0,
        layer_decay: float | None = None,
        decay_norm_and_bias: bool = False,
        preprocessing: dict[str, Any] | None = None,
        channels_last: bool | None = None,
        compile: bool = False,
        temperature: float = 1.0,
        tta_temperatures: dict[str, float] | None = None,
        weights_spec: WeightsSpec | None = None,
    ) -> None:
        """Long because every hyperparameter is an argument: `save_hyperparameters` records them
        from this signature, and a checkpoint is rebuilt from them. `preprocessing`: the decided
        one (finetune.data.preprocessing; None: the weights' own). `weights_spec`: `name` and
        `weights` resolved already by the caller that decided the preprocessing from them (None:
        resolved here); not a hyperparameter."""
        super().__init__()
        if class_names is not None:
            class_names = [str(c) for c in class_names]
        # As config dicts, not partials: a checkpoint holds data only (finetune.run.safe_checkpoint).
        optimizer, scheduler = as_config(optimizer), as_config(scheduler)
        self.save_hyperparameters(ignore=["weights_spec"], logger=False)
        backbone = create_backbone(name, weights, drop_path=drop_path, spec=weights_spec)
        self.backbone = backbone.module
        self.head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(backbone.num_features, num_classes))
        self.class_names = class_names or [str(i) for i in range(num_classes)]
        self.set_preprocessing(
            Preprocessing.from_dict(preprocessing) if preprocessing else backbone.preprocessing
        )
        self._add_metrics(num_classes)
        self.tta_temperatures: dict[str, float] = {}
        self.set_temperature(temperature)
        for view, value in (tta_temperatures or {}).items():
            self.set_temperature(value, tta=view)
        self._set_speed(channels_last, compile)
        # Test-time augmentation for test and predict (eval.py/predict.py tta=hflip): a choice of
        # the evaluation, not of the model, so not a hyperparameter.
        self.tta: str | None = None
        # Set by the fine-tuning strategy (finetune.finetuning.strategies) before fit: the rate of
        # the backbone's groups relative to `finetune=full`'s, whether 2-D cached features may
        # reach the head, and what of the backbone trains (`set_backbone_training`).
        self.backbone_lr_mult = 1.0
        self.finetune_starts_at_epoch = 0
        self.takes_features = False
        self._trainable = [p for p in self.backbone.parameters() if p.requires_grad]
        self._backbone_trains, self._train_bn, self._bn_frozen = True, False, False

    def _add_metrics(self, num_classes: int) -> None:
        self.train_metrics = _metrics(num_classes, "train/")
        self.val_metrics = _metrics(num_classes, "val/")
        self.test_metrics = _metrics(num_classes, "test/")
        self.val_acc_best = MaxMetric()
        # ECE of the network's own probabilities, and (test) of those divided by the temperature.
        self.val_ece = calibration_error(num_classes)
        self.test_ece = calibration_error(num_classes)
        self.test_ece_calibrated = calibration_error(num_classes)

    # --- model ------------------------------------------------------------------------------
    def set_preprocessing(self, p: Preprocessing) -> None:
        """Record the preprocessing actually used, so the checkpoint carries it (evaluation decides
        it again, from the checkpoint's and its data config's, and hands it here and to the data)."""
        self.preprocessing = p
        self.hparams["preprocessing"] = p.as_dict()

    def _set_speed(self, channels_last: bool | None, compile: bool) -> None:
        """channels_last (None: for CNNs) and torch.compile; the resolved values go in the
        hparams, so the run's config and the checkpoint say what actually ran."""
        self.channels_last = is_convolutional(self.backbone) if channels_last is None else bool(channels_last)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        if compile:
            problem = compile_problem("cuda" if torch.cuda.is_available() else "cpu")
            if problem:
                log.warning("model.compile=true ignored: %s", problem)
                compile = False
            else:
                self.backbone.compile()  # in place: the state_dict keys stay the same
        self.hparams["channels_last"] = self.channels_last
        self.hparams["compile"] = bool(compile)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images, or for a batch of backbone features (2-D, from the cache)
        while a strategy trains the head on them (`takes_features`): features computed by the frozen
        backbone must never reach a head whose backbone trains, or validate it."""
        if images.dim() == 2:
            if not self.takes_features:
                raise RuntimeError("a batch of cached backbone features reached the head while the backbone "
                                   "is not frozen on them: the loaders did not follow the fine-tuning stage")
            return self.head(images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.head(self.backbone(images))

    def set_backbone_training(self, trains: bool, train_bn: bool = False, bn_frozen: bool = False) -> None:
        """What of the backbone trains; every parameter stays in its optimizer group either way
        (one without a gradient is skipped by the optimizer).

        trains=False: the backbone is frozen, and in inference mode whole (BatchNorm statistics,
        dropout, stochastic depth), so its features are deterministic; `train_bn` lets BatchNorm
        layers train meanwhile. trains=True with `bn_frozen`: BatchNorm layers stay in inference
        mode (pretrained running statistics) while their affine weights train.
        """
        for p in self._trainable:
            p.requires_grad_(trains)
        if train_bn and not trains:
            for module in self.backbone.modules():
                if isinstance(module, _BatchNorm):
                    module.requires_grad_(True)
        self._backbone_trains, self._train_bn, self._bn_frozen = trains, train_bn, bn_frozen
        self.train(self.training)  # Lightning never calls train() during fit: apply the modes now

    def train(self, mode: bool = True) -> ImageClassifier:
        """The modes `set_backbone_training` asks for (Lightning captures every submodule's mode
        before validation and restores it after)."""
        super().train(mode)
        if mode and not self._backbone_trains:
            self.backbone.eval()
        batch_norm_trains = self._train_bn if not self._backbone_trains else not self._bn_frozen
        if mode and (batch_norm_trains is False or not self._backbone_trains):
            for module in self.backbone.modules():
                if isinstance(module, _BatchNorm):
                    module.train(batch_norm_trains)
        return self

    # --- steps --------------------------------------------------------------------------------
    def _shared_step(
        self, batch: Any, metrics: MetricCollection, stage: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits); training also logs per-step accuracy, so metrics run forward, not update."""
        images, targets = batch
        logits = self.tta_logits(images) if stage == "test" else self(images)
        # Class indices, or soft targets (N, C) from MixUp/CutMix: cross_entropy takes both, with
        # label smoothing applied on top of the soft ones.
        loss = F.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing)
        on_step = stage == "train"
        if on_step:
            # Mixed targets have no one true class: accuracy counts the argmax of the soft target
            # (the image with the larger share), so train/acc stays a fraction in [0, 1].
            metrics(logits, targets.argmax(dim=-1) if targets.dim() == 2 else targets)
        else:
            metrics.update(logits, targets)
        # Val/test loss averaged over DDP ranks: a scheduler monitoring val/loss must see one value.
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True,
                 batch_size=len(targets), sync_dist=not on_step)
        self.log_dict(metrics, on_step=on_step, on_epoch=True, prog_bar=stage != "train")
        # How many images the epoch's metrics cover (unreadable files are left out of a split).
        self.log(f"{stage}/images", float(len(targets)), on_step=False, on_epoch=True, reduce_fx="sum",
                 sync_dist=True)
        return loss, logits

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, self.train_metrics, "train")[0]

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """The logits reach callbacks (prediction grid, temperature fit) as `outputs`, saving
        them a forward pass."""
        logits = self._shared_step(batch, self.val_metrics, "val")[1]
        self._log_calibration(logits, batch[1], "val")
        return logits

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.val_acc_best.update(self.val_metrics["acc"].compute())
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=False, sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The best validation accuracy so far, so a resumed run's `val/acc_best` is the whole
        run's (the metric's state is not in the state dict, which older checkpoints lack), and the
        latest validation metrics."""
        if self.val_acc_best.update_count:
            checkpoint["val_acc_best"] = float(self.val_acc_best.compute())
        # The validation these weights scored (and the temperature fitted for them): what the final
        # metrics report beside the test of the best checkpoint (finetune.cli.train.final_metrics).
        if self._trainer is not None:
            checkpoint["val_metrics"] = {k: float(v) for k, v in self.trainer.callback_metrics.items()
                                         if k.startswith("val/")}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "val_acc_best" in checkpoint:
            self.val_acc_best.reset()
            self.val_acc_best.update(torch.tensor(checkpoint["val_acc_best"]))
        # trainer.test(ckpt_path="best") loads weights into this module, not its hparams: the
        # temperature fitted for those weights comes with them (1.0 for older checkpoints).
        hparams = checkpoint.get(self.CHECKPOINT_HYPER_PARAMS_KEY) or {}
        self.set_temperature(hparams.get("temperature", 1.0))
        self.tta_temperatures = {}
        self.hparams["tta_temperatures"] = None
        for view, value in (hparams.get("tta_temperatures") or {}).items():
            self.set_temperature(value, tta=view)

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """The logits reach callbacks (confusion matrix, top losses, reliability diagram) as `outputs`."""
        logits = self._shared_step(batch, self.test_metrics, "test")[1]
        self._log_calibration(logits, batch[1], "test")
        return logits

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Calibrated class probabilities (the temperature applied)."""
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.calibrated_probabilities(self.tta_logits(images))

    # --- optimization ---------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        """The optimizer over `param_groups` of every parameter, frozen or not (per-block rates with
        `layer_decay`; no weight decay on biases, norm weights and embeddings unless
        `decay_norm_and_bias`), each group at `lr_mult` times the configured rate; the backbone's
        at `backbone_lr_mult` times that. Raises RuntimeError if the groups miss or repeat a
        parameter: such a parameter would silently never train, or train twice."""
        optimizer_factory = (as_factory(self.hparams.optimizer, OPTIMIZER_TYPES) if self.hparams.optimizer
                             else partial(torch.optim.Adam, lr=1e-3))
        groups = param_groups(self.backbone, self.head, self.hparams.head_lr_mult, self.hparams.layer_decay,
                              decay_norm_and_bias=self.hparams.decay_norm_and_bias, trainable_only=False,
                              backbone_lr_mult=self.backbone_lr_mult)
        check_partition(groups, self)
        optimizer = optimizer_factory(params=groups)
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * group["lr_mult"]
        if self.hparams.scheduler is None:
            return optimizer
        scheduler_factory = as_factory(self.hparams.scheduler, SCHEDULER_TYPES)
        interval = self.hparams.scheduler_interval
        if "total_steps" in inspect.signature(scheduler_factory).parameters:  # a schedule in steps (WarmupCosine)
            scheduler_factory = partial(scheduler_factory, **self.schedule_steps())
            interval = "step"
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": scheduler_factory(optimizer=optimizer),
                "interval": interval,
                "monitor": "val/loss",
            },
        }

    def schedule_steps(self) -> dict[str, int]:
        """`total_steps` (optimizer steps of the whole fit) and `start_step` (the first step in
        which the backbone trains, as the strategy set `finetune_starts_at_epoch`), for schedules
        that fit the steps actually run."""
        trainer = self.trainer
        total = int(trainer.estimated_stepping_batches)  # builds the train loader: its length is known
        per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        return {"total_steps": total, "start_step": min(total, self.finetune_starts_at_epoch * per_epoch)}
