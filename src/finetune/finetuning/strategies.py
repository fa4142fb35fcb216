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
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import lightning as L
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, TensorDataset

from finetune.errors import FinetuneError
from finetune.finetuning.feature_cache import FeatureCache, FeatureSource

log = logging.getLogger("finetune")
BN_MODES = ("frozen", "train")


@runtime_checkable
class FeatureData(FeatureSource, Protocol):
    """What the strategies that train the head on cached features use of a data module
    (`finetune.data.datamodule.ImageDataModule`'s data contract), besides what the cache reads."""

    @property
    def random_training(self) -> bool: ...

    @property
    def mixes_batches(self) -> bool: ...

    def use_stand_in(self, stand_in: Callable[[str], Dataset | None] | None) -> None: ...

    def train_eval_view(self) -> Dataset: ...


def feature_data(trainer: L.Trainer) -> FeatureData | None:
    """The trainer's data module if it can stand cached features in for its splits, else None."""
    datamodule = trainer.datamodule
    return datamodule if isinstance(datamodule, FeatureData) else None


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


class LinearProbeThenFinetune(Gradual):
    """LP-FT (Kumar et al., ICLR 2022): a linear probe first, then the whole network from that head.

    Fine-tuning everything from a random head lets the head's large early gradients distort the
    pretrained features before they help; a head already fitted on frozen features avoids that.
    Stage 1 (`lp_epochs` epochs) trains the head at the configured rate on backbone features of
    the training images seen through the evaluation transform: computed once, through the feature
    cache, so it costs one backbone pass whatever `data.augment`, `data.auto_augment` or MixUp say
    (those apply in stage 2). Stage 2 unfreezes the backbone and every group, the head included,
    trains at `ft_lr_mult` times its stage-1 rate (layer decay applies to the backbone's groups).

    The loaders follow the stage whatever the validation interval: cached features (2-D) never
    reach the head in stage 2 (the model refuses them). The stage is logged as `train/stage`.
    """

    def __init__(self, lp_epochs: int = 1, ft_lr_mult: float = 0.1, feature_cache: bool | str = "auto",
                 cache_dir: str | None = None, train_bn: bool = False, bn: str = "frozen",
                 select_from: str = "stage2") -> None:
        if lp_epochs < 1:
            raise FinetuneError(f"finetune.callback.lp_epochs={lp_epochs}: LP-FT needs at least 1 epoch of "
                                "linear probing; use finetune=full to fine-tune from a random head")
        if select_from not in ("stage2", "all"):
            raise FinetuneError(f"finetune.callback.select_from={select_from}: use stage2 (the best checkpoint is "
                                "a fine-tuned one) or all (stage-1 probe epochs compete too)")
        self.select_from = select_from
        super().__init__(unfreeze_at_epoch=lp_epochs, backbone_lr_mult=ft_lr_mult, train_bn=train_bn, bn=bn)
        self.lp_epochs = lp_epochs
        self.ft_lr_mult = ft_lr_mult
        self.feature_cache = feature_cache
        self.cache_dir = cache_dir
        self._features: dict[str, TensorDataset] = {}
        self._reload_every: int | None = None
        self._trainer: L.Trainer | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Offer the datamodule cached features as a stand-in for the train and val images. It asks
        each time the Trainer builds a loader, which is after a checkpoint restored the epoch: a run
        resumed in stage 2 never computes features."""
        datamodule = feature_data(trainer)
        if self.feature_cache is False or datamodule is None:
            log.info("LP-FT stage 1: the head trains on images through the frozen backbone (feature cache off)")
            return
        self._cache = FeatureCache(pl_module.backbone, trainer, self.cache_dir, name=pl_module.hparams.get("name"),
                                   channels_last=bool(getattr(pl_module, "channels_last", False)))
        self._trainer = trainer
        datamodule.use_stand_in(self.stand_in)

    def in_stage_one(self) -> bool:
        return self.joined_at is None

    def stand_in(self, split: str) -> TensorDataset | None:
        """`split`'s backbone features while stage 1 trains (train: the training images through
        the evaluation transform), else None: the images."""
        trainer = self._trainer
        if split not in ("train", "val") or not self.in_stage_one() or trainer.current_epoch >= self.lp_epochs \
                or trainer.state.fn != TrainerFn.FITTING:
            return None
        if split not in self._features:
            datamodule = feature_data(trainer)
            images = datamodule.train_eval_view() if split == "train" else None
            self._features[split] = self._cache.features(datamodule, split, images)
            log.info("LP-FT stage 1: the head trains on cached %s features for %d epochs", split, self.lp_epochs)
        trainer.lightning_module.takes_features = True
        return self._features[split]

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        pl_module.log("train/stage", 1.0 if self.in_stage_one() else 2.0, on_step=False, on_epoch=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After stage 1's last epoch (its validation included) the Trainer must build new train and
        val loaders (they get the images): every loader is rebuilt until stage 2 has validated once,
        whatever `check_val_every_n_epoch`, then the user's reload setting comes back."""
        if trainer.current_epoch + 1 == self.lp_epochs and self._reload_every is None:
            self._reload_every = trainer.reload_dataloaders_every_n_epochs
            trainer.reload_dataloaders_every_n_epochs = 1
            self._features = {}  # stage 1 is over: free them

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._reload_every is not None and not self.in_stage_one() and not trainer.sanity_checking:
            trainer.reload_dataloaders_every_n_epochs = self._reload_every
            self._reload_every = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = feature_data(trainer)
        if datamodule is not None and self._trainer is not None:  # it offered the stand-in
            datamodule.use_stand_in(None)
        self._features, self._trainer = {}, None
        pl_module.takes_features = False

    def join(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        """Stage 2: the head goes from its probing rate to its fine-tuning rate (the backbone's groups
        were built at `ft_lr_mult` times theirs); schedulers that compute from `base_lrs` follow."""
        pl_module.takes_features = False
        for optimizer in trainer.optimizers:
            scale = [not is_backbone_group(g) for g in optimizer.param_groups]
            for group, head in zip(optimizer.param_groups, scale):
                if head:
                    for key in ("lr", "initial_lr"):
                        if key in group:
                            group[key] *= self.ft_lr_mult
                    group["lr_mult"] = group.get("lr_mult", 1.0) * self.ft_lr_mult
            for config in trainer.lr_scheduler_configs:
                scheduler = config.scheduler
                if getattr(scheduler, "optimizer", None) is optimizer and hasattr(scheduler, "base_lrs"):
                    scheduler.base_lrs = [lr * self.ft_lr_mult if head else lr
                                          for lr, head in zip(scheduler.base_lrs, scale)]
        super().join(trainer, pl_module, epoch)
        log.info("LP-FT stage 2 from epoch %d: every layer trains", epoch)
        if self.select_from == "stage2":
            self.forget_stage_one_best(trainer, pl_module)

    @staticmethod
    def forget_stage_one_best(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The best checkpoint (and `val/acc_best`) is chosen among stage-2 epochs: a run asked to
        fine-tune returns a fine-tuned network, chosen by validation. Stage 1's best file stays on
        disk (the probe), no longer tracked."""
        for callback in trainer.checkpoint_callbacks:
            if getattr(callback, "monitor", None) and callback.best_model_path:
                log.info("LP-FT: the best checkpoint is chosen among stage-2 epochs; stage 1's best stays as %s",
                         callback.best_model_path)
                callback.best_k_models = {}
                callback.best_model_path = callback.kth_best_model_path = ""
                callback.best_model_score = None
                callback.kth_value = callback.kth_value.new_tensor(float("-inf" if callback.mode == "max" else "inf"))
        if hasattr(pl_module, "val_acc_best"):
            pl_module.val_acc_best.reset()


def is_backbone_group(group: dict) -> bool:
    """A parameter group named by `param_groups` for backbone parameters."""
    name = str(group.get("name", ""))
    return name == "backbone" or name.startswith("backbone.")
