"""How much of the backbone trains, as Lightning `BaseFinetuning` callbacks.

`finetune=full` needs no callback (every parameter trains; learning rates come from the module's
parameter groups). `frozen` and `gradual` freeze the backbone before the optimizer is built, so it
only ever sees the parameters that train.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.trainer.states import TrainerFn
from torch.optim import Optimizer

from finetune.errors import FinetuneError
from finetune.finetuning.feature_cache import FeatureCache
from finetune.finetuning.param_groups import backbone_groups, check_partition

log = logging.getLogger("finetune")


def reapply_train_mode(pl_module: L.LightningModule) -> None:
    """Run the module's `train()` rule (BatchNorm with frozen parameters stays in eval) after
    `requires_grad` changed. Lightning never calls `train()` during fit: it captures every
    submodule's mode before validation and restores it after, so without this the mode from
    construction (all training) would persist and frozen BatchNorm would normalise with batch
    statistics while training and with running statistics while evaluating."""
    pl_module.train(pl_module.training)


class Frozen(BaseFinetuning):
    """Feature extraction / linear probe: only the head trains.

    BatchNorm layers are frozen too, and the module keeps frozen BatchNorm in eval mode, so the
    backbone's running statistics stay exactly as pretrained. With a deterministic training
    transform, backbone features are computed once and the head trains on them (`feature_cache`),
    keyed by everything from file to feature, the backbone's name and the model's memory format
    among it (see `finetune.finetuning.feature_cache`).
    """

    def __init__(self, feature_cache: bool | str = "auto", cache_dir: str | None = None) -> None:
        super().__init__()
        self.feature_cache = feature_cache
        self.cache_dir = cache_dir

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        self.freeze(pl_module.backbone, train_bn=False)
        reapply_train_mode(pl_module)

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        pass

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        datamodule = trainer.datamodule
        if self.feature_cache is False or datamodule is None:
            return
        # Random crops/flips, an auto-augment policy or MixUp/CutMix: features differ every epoch.
        deterministic = not getattr(datamodule, "random_training", datamodule.preprocessing.augment)
        if not deterministic:
            if self.feature_cache == "auto":
                log.info("feature cache off: the training data is random (data.augment, data.auto_augment, "
                         "data.mixup_alpha, data.cutmix_alpha; turn them off to use it)")
                return
            log.warning("feature cache on with data augmentation: every epoch sees the same augmented view")
        cache = FeatureCache(pl_module.backbone, trainer, self.cache_dir,
                             name=pl_module.hparams.get("name"),
                             channels_last=bool(getattr(pl_module, "channels_last", False)))
        datamodule.setup("fit")
        for split in ("train", "val"):
            datamodule.datasets[split] = cache.features(datamodule, split)


class Gradual(BaseFinetuning):
    """Train the head alone for `unfreeze_at_epoch` epochs, then the backbone too, slower.

    The backbone joins the optimizer with the groups `finetune=full` would give it (one "backbone"
    group, or one per block with `model.layer_decay`; weight decay as `model.decay_norm_and_bias`
    says), each at `backbone_lr_mult` times that group's rate, so every curve shows in the
    learning-rate monitor and layer decay survives the unfreeze.
    """

    def __init__(self, unfreeze_at_epoch: int = 1, backbone_lr_mult: float = 0.1, train_bn: bool = False) -> None:
        super().__init__()
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.backbone_lr_mult = backbone_lr_mult
        self.train_bn = train_bn

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        self.freeze(pl_module.backbone, train_bn=self.train_bn)
        reapply_train_mode(pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """On resume, Lightning restores the optimizer's backbone groups but `setup` has just
        frozen the backbone again; past the unfreeze it must train."""
        super().on_fit_start(trainer, pl_module)
        if self.unfrozen(trainer):
            self.make_trainable(pl_module.backbone)
            reapply_train_mode(pl_module)
            for optimizer in trainer.optimizers:
                schedule_new_groups(trainer, optimizer)

    @staticmethod
    def unfrozen(trainer: L.Trainer) -> bool:
        """The optimizer holds backbone groups: the unfreeze has happened (in this run or in the
        run a checkpoint came from)."""
        return any(is_backbone_group(g) for opt in trainer.optimizers for g in opt.param_groups)

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        if epoch != self.unfreeze_at_epoch:
            return
        self.make_trainable(pl_module.backbone)
        reapply_train_mode(pl_module)
        base_lr = optimizer.defaults["lr"]  # the configured rate; groups carry their own multiples
        # Where the schedule is now (cosine half-way: 0.5): joining groups start there too.
        first = optimizer.param_groups[0]
        progress = first["lr"] / first["initial_lr"] if first.get("initial_lr") else 1.0
        taken = {id(p) for g in optimizer.param_groups for p in g["params"]}  # BN with train_bn=true
        names = {g.get("name") for g in optimizer.param_groups}
        hparams = pl_module.hparams
        for group in backbone_groups(pl_module.backbone, hparams.get("layer_decay"),
                                     hparams.get("decay_norm_and_bias", False)):
            params = [p for p in group["params"] if id(p) not in taken]
            if not params:
                continue
            mult = group["lr_mult"] * self.backbone_lr_mult
            name = group["name"] if group["name"] not in names else group["name"] + ".unfrozen"
            optimizer.add_param_group({**group, "params": params, "name": name, "lr_mult": mult,
                                       "lr": base_lr * mult * progress, "initial_lr": base_lr * mult})
        check_partition(optimizer.param_groups, pl_module)
        schedule_new_groups(pl_module.trainer, optimizer)
        log.info("epoch %d: backbone unfrozen at %.3g x the learning rate%s", epoch, self.backbone_lr_mult,
                 " with layer decay" if hparams.get("layer_decay") else "")


class LinearProbeThenFinetune(Gradual):
    """LP-FT (Kumar et al., ICLR 2022): a linear probe first, then the whole network from that head.

    Fine-tuning everything from a random head lets the head's large early gradients distort the
    pretrained features before they help; a head already fitted on frozen features avoids that.
    Stage 1 (`lp_epochs` epochs) trains the head at the configured rate on backbone features of
    the training images seen through the evaluation transform: computed once, through the feature
    cache, so it costs one backbone pass whatever `data.augment`, `data.auto_augment` or MixUp say
    (those apply in stage 2). Stage 2 unfreezes the backbone and every group, the head included,
    trains at `ft_lr_mult` times its stage-1 rate (layer decay applies to the backbone's groups).

    The stage is logged as `train/stage` (1 or 2). A run resumed in stage 1 reads the cached
    features again; one resumed in stage 2 finds the backbone groups in the optimizer's state.
    """

    def __init__(self, lp_epochs: int = 1, ft_lr_mult: float = 0.1, feature_cache: bool | str = "auto",
                 cache_dir: str | None = None, train_bn: bool = False) -> None:
        if lp_epochs < 1:
            raise FinetuneError(f"finetune.callback.lp_epochs={lp_epochs}: LP-FT needs at least 1 epoch of "
                                "linear probing; use finetune=full to fine-tune from a random head")
        super().__init__(unfreeze_at_epoch=lp_epochs, backbone_lr_mult=ft_lr_mult, train_bn=train_bn)
        self.lp_epochs = lp_epochs
        self.ft_lr_mult = ft_lr_mult
        self.feature_cache = feature_cache
        self.cache_dir = cache_dir
        self._features: dict[str, Any] = {}
        self._reload_every: int | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Offer the datamodule cached features as a stand-in for the train and val images. It asks
        each time the Trainer builds a loader, which is after a checkpoint restored the epoch: a run
        resumed in stage 2 never computes features."""
        super().on_fit_start(trainer, pl_module)
        datamodule = trainer.datamodule
        if self.feature_cache is False or datamodule is None or not hasattr(datamodule, "stand_in"):
            log.info("LP-FT stage 1: the head trains on images through the frozen backbone (feature cache off)")
            return
        self._cache = FeatureCache(pl_module.backbone, trainer, self.cache_dir, name=pl_module.hparams.get("name"),
                                   channels_last=bool(getattr(pl_module, "channels_last", False)))
        self._trainer = trainer
        datamodule.stand_in = self.stand_in

    def stand_in(self, split: str) -> Any:
        """`split`'s backbone features while stage 1 trains (train: the training images through
        the evaluation transform), else None: the images."""
        trainer = self._trainer
        if split not in ("train", "val") or trainer.current_epoch >= self.lp_epochs \
                or trainer.state.fn != TrainerFn.FITTING:
            return None
        if split not in self._features:
            datamodule = trainer.datamodule
            datamodule.setup("fit")
            images = datamodule.datasets["train"]
            if split == "train":
                datamodule.datasets["train"] = datamodule.train_eval_view()
            try:
                self._features[split] = self._cache.features(datamodule, split)
            finally:
                datamodule.datasets["train"] = images
            log.info("LP-FT stage 1: the head trains on cached %s features for %d epochs", split, self.lp_epochs)
        return self._features[split]

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        stage = 1 if trainer.current_epoch < self.lp_epochs else 2
        pl_module.log("train/stage", float(stage), on_step=False, on_epoch=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After stage 1's last epoch (its validation included), the Trainer builds new train and
        val loaders for the next epoch (they get the images), and after that epoch goes back to
        its own reload setting."""
        super().on_train_epoch_end(trainer, pl_module)
        if trainer.current_epoch + 1 == self.lp_epochs and self._features:
            self._reload_every = trainer.reload_dataloaders_every_n_epochs
            trainer.reload_dataloaders_every_n_epochs = 1
            self._features = {}  # stage 1 is over: free them
        elif trainer.current_epoch == self.lp_epochs and self._reload_every is not None:
            trainer.reload_dataloaders_every_n_epochs = self._reload_every
            self._reload_every = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        if getattr(datamodule, "stand_in", None) == self.stand_in:
            datamodule.stand_in = None
        self._features = {}

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        if epoch != self.lp_epochs:
            return
        for group in optimizer.param_groups:  # the head: from its probing rate to its fine-tuning rate
            for key in ("lr", "initial_lr"):
                if key in group:
                    group[key] *= self.ft_lr_mult
            group["lr_mult"] = group.get("lr_mult", 1.0) * self.ft_lr_mult
        for config in pl_module.trainer.lr_scheduler_configs:
            if getattr(config.scheduler, "optimizer", None) is optimizer and hasattr(config.scheduler, "base_lrs"):
                config.scheduler.base_lrs = [lr * self.ft_lr_mult for lr in config.scheduler.base_lrs]
        super().finetune_function(pl_module, epoch, optimizer)
        log.info("LP-FT stage 2 from epoch %d: every layer trains", epoch)


def schedule_new_groups(trainer: L.Trainer | None, optimizer: Optimizer) -> None:
    """Make the optimizer's learning-rate schedulers cover groups added after they were built.

    torch schedulers keep one base rate (and, for LambdaLR, one lambda) per group they saw at
    construction and zip them with the groups, so a group added later would silently keep a
    constant rate while the others anneal. Idempotent: a resumed run restores `base_lrs` from its
    checkpoint, and LambdaLR's lambdas (functions are not saved) are extended again here.
    """
    if trainer is None:
        return
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        if getattr(scheduler, "optimizer", None) is not optimizer:
            continue
        if hasattr(scheduler, "base_lrs"):
            for group in optimizer.param_groups[len(scheduler.base_lrs):]:
                scheduler.base_lrs.append(group.get("initial_lr", group["lr"]))
        min_lrs = getattr(scheduler, "min_lrs", None)  # ReduceLROnPlateau: one floor per group
        if min_lrs:
            min_lrs.extend(min_lrs[:1] * (len(optimizer.param_groups) - len(min_lrs)))
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if lambdas:
            lambdas.extend(lambdas[:1] * (len(optimizer.param_groups) - len(lambdas)))


def is_backbone_group(group: dict) -> bool:
    """A parameter group named by `param_groups` for backbone parameters."""
    name = str(group.get("name", ""))
    return name == "backbone" or name.startswith("backbone.")
