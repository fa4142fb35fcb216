"""How much of the backbone trains, and from which epoch: one callback per strategy.

A strategy changes *what trains*, never which groups the optimizer has (fastai's splitter and
`freeze_to`): `ImageClassifier.configure_optimizers` puts every parameter in its group once, and a
strategy only switches the backbone's `requires_grad` (a parameter without a gradient is skipped
by every torch optimizer, weight decay included). So schedulers, resumes and DDP see one optimizer
from the first step to the last.

Why not Lightning's `BaseFinetuning`: it freezes in `setup`, before DDP wraps the model, and adds
the backbone's groups at the unfreeze. DDP's reducer only averages the parameters that required
grad when it was built, so after the unfreeze each rank trained its own backbone (Lightning issue
#20340). Here, when the backbone starts to train under DDP the wrapper is built again through
Lightning's own `DDPStrategy.configure_ddp`, so its reducer knows every parameter that trains; the
frozen stage keeps a reducer over the head alone and costs what it did.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch.nn.parallel import DistributedDataParallel

from finetune.errors import FinetuneError
from finetune.finetuning.feature_cache import FeatureCache
from finetune.finetuning.feature_data import feature_data

log = logging.getLogger("finetune")
BN_MODES = ("frozen", "train")


def rewrap_ddp(trainer: L.Trainer) -> bool:
    """Build the DDP wrapper again (Lightning's path: `DDPStrategy.configure_ddp`, its comm hooks
    included), so its reducer averages the parameters that require grad *now*. DDP broadcasts rank
    0's weights while it is built, so every rank starts the new stage from one model. True if the
    model was wrapped."""
    strategy = trainer.strategy
    if not isinstance(strategy, DDPStrategy) or not isinstance(strategy.model, DistributedDataParallel):
        return False
    strategy.model = strategy.lightning_module  # drops the old wrapper and its reducer's hooks
    strategy.configure_ddp()
    return True


class Strategy(L.Callback):
    """The backbone is frozen until epoch `joins_at` (None: never), then trains.

    bn: once the backbone trains, `frozen` keeps BatchNorm layers in inference mode (running
    statistics stay the pretrained ones; their affine weights still train), `train` lets them
    normalise with batch statistics and update them. train_bn: BatchNorm's affine weights train
    while the rest of the backbone is frozen (Lightning's `BaseFinetuning.freeze(train_bn=True)`).
    The epoch the backbone joined is saved in checkpoints (the callback's state), and restored
    before DDP wraps the model, so a resumed run's reducer is built over what trains.
    """

    joins_at: int | None = None

    def __init__(self, backbone_lr_mult: float = 1.0, bn: str = "frozen", train_bn: bool = False) -> None:
        if bn not in BN_MODES:
            raise FinetuneError(f"finetune.bn={bn} is not one of {list(BN_MODES)}: frozen keeps the pretrained "
                                "BatchNorm statistics while the backbone trains (small data sets), train updates them")
        self.backbone_lr_mult = float(backbone_lr_mult)
        self.bn = bn
        self.train_bn = bool(train_bn)
        self.joined_at: int | None = None
        self._module: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Before the optimizer is built and before DDP wraps the model: the backbone's groups get
        `backbone_lr_mult`, and the backbone is frozen unless it trains from the start."""
        if stage != TrainerFn.FITTING:
            return
        if self.joins_at not in (0, None) and not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise FinetuneError(f"finetune={type(self).__name__} unfreezes during training, which this project "
                                f"supports on one device and with DDP, not with {type(trainer.strategy).__name__}; "
                                "use trainer.strategy=ddp or finetune=full")
        self._module = pl_module
        if self.bn == "frozen" and self.joins_at is not None and pl_module.hparams.get("weights") is None:
            log.warning("finetune.bn=frozen with model.weights=null: there are no pretrained BatchNorm statistics "
                        "to keep, so BatchNorm trains (finetune.bn=train says so)")
            self.bn = "train"
        pl_module.backbone_lr_mult = self.backbone_lr_mult
        pl_module.finetune_starts_at_epoch = self.joins_at or 0
        self.joined_at = 0 if self.joins_at == 0 else None
        self._apply()
        if self.joins_at is not None:  # a default that changes what trains: said out loud
            log.info("BatchNorm statistics %s while the backbone trains (finetune.bn=%s; %s)", "stay as pretrained"
                     if self.bn == "frozen" else "follow the batches", self.bn,
                     "finetune.bn=train updates them" if self.bn == "frozen" else "finetune.bn=frozen keeps them")

    def state_dict(self) -> dict[str, Any]:
        return {"joined_at": self.joined_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "internal_optimizer_metadata" in state_dict:  # BaseFinetuning's state: groups added mid-fit
            raise FinetuneError("this checkpoint was written by an older finetune whose strategies added "
                                "optimizer groups at the unfreeze; it cannot be resumed. Start afresh with "
                                "model.weights=PATH_TO_ITS_STATE_DICT, or evaluate it with eval.py")
        self.joined_at = state_dict.get("joined_at")
        if self._module is not None:  # restored before DDP wraps the model
            self._apply()

    def _apply(self) -> None:
        self._module.set_backbone_training(self.joined_at is not None, train_bn=self.train_bn,
                                           bn_frozen=self.bn == "frozen")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.joined_at is None and self.joins_at is not None and epoch >= self.joins_at:
            self.join(trainer, pl_module, epoch)

    def join(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        """The backbone starts to train (at the rates its groups had from the start)."""
        self.joined_at = epoch
        self._apply()
        rewrapped = rewrap_ddp(trainer)
        log.info("epoch %d: backbone unfrozen at %.3g x the learning rate (BatchNorm statistics %s)%s",
                 epoch, self.backbone_lr_mult, self.bn, "; DDP rebuilt over every trainable parameter"
                 if rewrapped else "")


class Full(Strategy):
    """Every layer trains from the first step."""

    joins_at = 0

    def __init__(self, bn: str = "frozen") -> None:
        super().__init__(bn=bn)


class Frozen(Strategy):
    """Feature extraction / linear probe: only the head trains.

    The frozen backbone is in inference mode whole (BatchNorm statistics, dropout, stochastic
    depth), so its features are deterministic. With a deterministic training transform, backbone
    features are computed once and the head trains on them (`feature_cache`), keyed by everything
    from file to feature, the backbone's name and the model's memory format among it (see
    `finetune.finetuning.feature_cache`).
    """

    joins_at = None

    def __init__(self, feature_cache: bool | str = "auto", cache_dir: str | None = None) -> None:
        super().__init__()
        self.feature_cache = feature_cache
        self.cache_dir = cache_dir

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = feature_data(trainer)
        if self.feature_cache is False or datamodule is None:
            return
        # Random crops/flips, an auto-augment policy or MixUp/CutMix: features differ every epoch.
        if datamodule.random_training:
            if self.feature_cache == "auto":
                log.info("feature cache off: the training data is random (data.augment, data.auto_augment, "
                         "data.mixup_alpha, data.cutmix_alpha; turn them off to use it)")
                return
            if datamodule.mixes_batches:
                raise FinetuneError(
                    "data.mixup_alpha/data.cutmix_alpha mix images, but finetune.callback.feature_cache=true trains "
                    "on cached backbone features; set finetune.callback.feature_cache=auto (it stays off with "
                    "mixing) or the alphas to 0")
            log.warning("feature cache on with data augmentation: every epoch sees the same augmented view")
        cache = FeatureCache(pl_module.backbone, trainer, self.cache_dir,
                             name=pl_module.hparams.get("name"),
                             channels_last=bool(getattr(pl_module, "channels_last", False)))
        features = {split: cache.features(datamodule, split) for split in ("train", "val")}
        datamodule.use_stand_in(features.get)
        pl_module.takes_features = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = feature_data(trainer)
        if datamodule is not None:
            datamodule.use_stand_in(None)
        pl_module.takes_features = False


class Gradual(Strategy):
    """Train the head alone for `unfreeze_at_epoch` epochs, then the backbone too, slower.

    The backbone's groups (one "backbone" group, or one per block with `model.layer_decay`; weight
    decay as `model.decay_norm_and_bias` says) are in the optimizer from the start at
    `backbone_lr_mult` times the rate `finetune=full` would give them, and follow the schedule
    while frozen, so they join where it is and layer decay holds throughout.
    """

    def __init__(self, unfreeze_at_epoch: int = 1, backbone_lr_mult: float = 0.1, train_bn: bool = False,
                 bn: str = "frozen") -> None:
        super().__init__(backbone_lr_mult=backbone_lr_mult, bn=bn, train_bn=train_bn)
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.joins_at = unfreeze_at_epoch
