"""How much of the backbone trains, as Lightning `BaseFinetuning` callbacks.

`finetune=full` needs no callback (every parameter trains; learning rates come from the module's
parameter groups). `frozen` and `gradual` freeze the backbone before the optimizer is built, so it
only ever sees the parameters that train.
"""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning
from torch.optim import Optimizer

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
        if any(is_backbone_group(g) for opt in trainer.optimizers for g in opt.param_groups):
            self.make_trainable(pl_module.backbone)
            reapply_train_mode(pl_module)

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        if epoch != self.unfreeze_at_epoch:
            return
        self.make_trainable(pl_module.backbone)
        reapply_train_mode(pl_module)
        base_lr = optimizer.defaults["lr"]  # the configured rate; groups carry their own multiples
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
                                       "lr": base_lr * mult, "initial_lr": base_lr * mult})
        check_partition(optimizer.param_groups, pl_module)
        log.info("epoch %d: backbone unfrozen at %.3g x the learning rate%s", epoch, self.backbone_lr_mult,
                 " with layer decay" if hparams.get("layer_decay") else "")


def is_backbone_group(group: dict) -> bool:
    """A parameter group named by `param_groups` for backbone parameters."""
    name = str(group.get("name", ""))
    return name == "backbone" or name.startswith("backbone.")
