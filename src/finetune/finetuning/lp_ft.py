"""`finetune=lp_ft`: a linear probe on cached features first, then the whole network from that head."""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import TensorDataset

from finetune.errors import FinetuneError
from finetune.finetuning.feature_cache import FeatureCache
from finetune.finetuning.feature_data import feature_data
from finetune.finetuning.strategies import Gradual

log = logging.getLogger("finetune")


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
