"""What trains when: strategies toggle `requires_grad` over one optimizer, BatchNorm as asked,
LP-FT's loaders follow the stage, and a schedule that fits the fine-tuning steps."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torchvision

from conftest import compose_train
from finetune.callbacks.time_budget import TimeBudget
from finetune.cli.train import build
from test_finetuning import TINY, changed, snapshot
from test_lp_ft import LP_FT, BatchKinds
from test_streaming import _streaming, converted, folder  # noqa: F401 (fixtures)


class ModuleModes(L.Callback):
    """Per training epoch: the `training` flags of every backbone module, and of its BatchNorm
    layers, seen at every training step (after Lightning's validation restored the modes)."""

    def __init__(self) -> None:
        self.all: dict[int, set[bool]] = {}
        self.bn: dict[int, set[bool]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        epoch = trainer.current_epoch
        for module in pl_module.backbone.modules():
            self.all.setdefault(epoch, set()).add(module.training)
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                self.bn.setdefault(epoch, set()).add(module.training)


class ValidationKinds(L.Callback):
    """Per epoch: the dimensions of the validation batches (2: cached features, 4: images)."""

    def __init__(self) -> None:
        self.epochs: dict[int, set[int]] = {}

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self.epochs.setdefault(trainer.current_epoch, set()).add(batch[0].dim())


class StepRates(L.Callback):
    """The head's and the backbone's learning rate at every optimizer step."""

    def __init__(self) -> None:
        self.rates: list[tuple[float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        groups = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}
        self.rates.append((groups["head"], groups["backbone"]))


def _batch_norms(model) -> set[str]:
    return {n for n, m in model.backbone.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}


def _pretrained_file(tmp_path) -> str:
    """A ResNet-18 state dict whose BatchNorm statistics are not the init's (mean 0, var 1)."""
    net = torchvision.models.resnet18()
    generator = torch.Generator().manual_seed(0)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(1 + torch.rand(module.num_features, generator=generator))
    path = tmp_path / "resnet18-pretrained.pth"
    torch.save(net.state_dict(), path)
    return str(path)


def test_every_parameter_is_in_the_optimizer_from_the_start_and_only_the_trainable_change(make_cfg):
    """Gradual with train_bn: epoch 0 trains the head and BatchNorm's affine weights only (the
    BatchNorm group must not count as "the backbone joined"); epoch 1 trains the backbone."""
    cfg = make_cfg(TINY + ["finetune=gradual", "finetune.callback.unfreeze_at_epoch=1", "finetune.callback.train_bn=true",
                           "trainer.max_epochs=1", "model.optimizer.lr=0.01", "test=false"])
    dm, model, trainer = build(cfg)
    start = snapshot(model.backbone)
    trainer.fit(model, datamodule=dm)
    names = [g["name"] for g in trainer.optimizers[0].param_groups]
    assert names == ["backbone", "backbone.no_decay", "head", "head.no_decay"]
    moved = changed(start, snapshot(model.backbone))
    batch_norms = _batch_norms(model)
    assert moved and all(k.rsplit(".", 1)[0] in batch_norms for k in moved), moved
    assert {f"{n}.weight" for n in batch_norms} <= set(moved)


@pytest.mark.parametrize("bn, statistics_move", [("frozen", False), ("train", True)])
def test_batchnorm_statistics_stay_pretrained_when_frozen_while_its_weights_train(make_cfg, tmp_path, bn,
                                                                                   statistics_move):
    cfg = make_cfg(TINY + ["finetune=full", f"finetune.bn={bn}", f"model.weights={_pretrained_file(tmp_path)}",
                           "trainer.max_epochs=1", "model.optimizer.lr=0.01", "test=false",
                           "+trainer.num_sanity_val_steps=0"])
    dm, model, trainer = build(cfg)
    modes = ModuleModes()
    trainer.callbacks.append(modes)
    start = snapshot(model.backbone)
    trainer.fit(model, datamodule=dm)
    moved = set(changed(start, snapshot(model.backbone)))
    batch_norms = _batch_norms(model)
    assert len(batch_norms) == 20
    statistics = {f"{n}.{s}" for n in batch_norms for s in ("running_mean", "running_var")}
    affine = {f"{n}.{s}" for n in batch_norms for s in ("weight", "bias")}
    if statistics_move:
        assert statistics <= moved
    else:  # bit-identical to the pretrained ones
        assert not statistics & moved
        assert torch.equal(model.backbone.bn1.running_var, torch.load(cfg.model.weights)["bn1.running_var"])
    assert affine <= moved  # the affine weights train either way
    assert modes.bn == {0: {bn == "train"}}


def test_a_frozen_backbone_is_in_inference_mode_whole(make_cfg):
    """Not only BatchNorm: dropout and stochastic depth in a frozen backbone would make its
    features random (and differ from the cached ones)."""
    cfg = make_cfg(TINY + ["finetune=gradual", "finetune.callback.unfreeze_at_epoch=1", "trainer.max_epochs=2",
                           "test=false", "+trainer.num_sanity_val_steps=1", "finetune.bn=train"])
    dm, model, trainer = build(cfg)
    modes = ModuleModes()
    trainer.callbacks.append(modes)
    trainer.fit(model, datamodule=dm)
    assert modes.all == {0: {False}, 1: {True}}


@pytest.mark.slow  # four epochs
def test_lp_ft_validates_stage_two_on_images_whatever_the_validation_interval(make_cfg):
    cfg = make_cfg(LP_FT + ["trainer.max_epochs=4", "trainer.check_val_every_n_epoch=2", "test=false"])
    dm, model, trainer = build(cfg)
    train_kinds, val_kinds = BatchKinds(), ValidationKinds()
    trainer.callbacks += [train_kinds, val_kinds]
    trainer.fit(model, datamodule=dm)
    assert {e: {d for d, _ in k} for e, k in train_kinds.epochs.items()} == {0: {2}, 1: {2}, 2: {4}, 3: {4}}
    assert val_kinds.epochs == {1: {2}, 3: {4}}


def test_cached_features_never_reach_a_head_whose_backbone_trains(make_cfg):
    _, model, _ = build(make_cfg(TINY))
    with pytest.raises(RuntimeError, match="cached backbone features"):
        model(torch.zeros(2, 512))
    model.takes_features = True
    assert model(torch.zeros(2, 512)).shape == (2, 4)


def test_warmup_cosine_runs_over_stage_two_steps(make_cfg):
    """LP-FT with 2 probe epochs and 2 fine-tuning epochs of 6 steps: the head's probe rate is
    constant, then every group warms up and decays to about zero at the last step."""
    cfg = make_cfg(LP_FT + ["trainer.max_epochs=4", "test=false", "+model.scheduler._target_=finetune.finetuning.WarmupCosine",
                            "+model.scheduler._partial_=true", "+model.scheduler.warmup_steps=3"])
    dm, model, trainer = build(cfg)
    spy = StepRates()
    trainer.callbacks.append(spy)
    trainer.fit(model, datamodule=dm)
    head, backbone = zip(*spy.rates)
    assert len(head) == 24
    assert head[:12] == (0.01,) * 12  # stage 1: the probe's constant rate
    # Stage 2 (steps 12-23): 0.1x, warmup over 3 steps (1/4, 2/4, 3/4), then cosine to ~0.
    assert head[12:15] == pytest.approx([0.001 / 4, 0.001 * 2 / 4, 0.001 * 3 / 4])
    assert backbone[12:15] == pytest.approx(head[12:15])
    assert head[15] == pytest.approx(0.001)
    assert head[19] == pytest.approx(0.001 * 0.5 * (1 + torch.cos(torch.tensor(4 / 9 * torch.pi)).item()))
    assert 0 < head[23] < 0.001 * 0.04


class ValAccuracies(L.Callback):
    """val/acc after each training epoch's validation."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.values.append(float(trainer.callback_metrics["val/acc"]))


@pytest.mark.slow  # two runs
@pytest.mark.parametrize("select_from", ["stage2", "all"])
def test_lp_ft_chooses_its_checkpoint_among_fine_tuned_epochs(make_cfg, select_from):
    """Stage 2 at a rate that wrecks the network: validation still chooses a stage-2 epoch, unless
    stage-1 epochs may compete. Six probe epochs: a probe on random features learns slowly, and
    after one it was often still at chance, tied with the wrecked stage 2 (a tie tests nothing)."""
    cfg = make_cfg(LP_FT + ["trainer.max_epochs=7", "finetune.callback.lp_epochs=6", "finetune.callback.ft_lr_mult=3000",
                            f"finetune.callback.select_from={select_from}", "callbacks=default",
                            "callbacks.rich_progress_bar=null", "test=false"])
    dm, model, trainer = build(cfg)
    accuracies = ValAccuracies()
    trainer.callbacks.append(accuracies)
    trainer.fit(model, datamodule=dm)
    probe, wrecked = accuracies.values[:6], accuracies.values[6]
    assert max(probe) > wrecked, f"the probe must beat the wrecked stage 2 for this test to mean anything: {accuracies.values}"
    best = 6 if select_from == "stage2" else probe.index(max(probe))  # the first of equals, as ModelCheckpoint keeps it
    assert trainer.checkpoint_callback.best_model_path.endswith(f"epoch_{best:03d}.ckpt"), accuracies.values


class SteppedClock(TimeBudget):
    """A clock that advances 2 s per training step and stands still otherwise."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.t += 2.0
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def test_a_time_budget_plans_whole_epochs_and_the_schedule_ends_with_them(make_cfg):
    """6 steps of 2 s per epoch, 57 s usable (1 min less 5% for the test): after 3 measured steps
    (6 s), 51 s are left: the rest of epoch 0 (6 s) and 3 more epochs of 12 s."""
    cfg = make_cfg(TINY + ["finetune=full", "trainer.max_epochs=100", "test=false", "model.optimizer.lr=0.01",
                           "+model.scheduler._target_=finetune.finetuning.WarmupCosine", "+model.scheduler._partial_=true"])
    dm, model, trainer = build(cfg)
    budget, rates = SteppedClock(minutes=1, measure_steps=3), StepRates()
    trainer.callbacks += [budget, rates]
    trainer.fit(model, datamodule=dm)
    assert budget.planned_epochs == 4 and trainer.global_step == 24
    head = [h for h, _ in rates.rates]
    assert max(head) == pytest.approx(0.01, rel=0.05) and head[-1] < 0.01 * 0.01  # cosine ended at the last step


@pytest.mark.slow  # converts a data set, then trains two epochs
def test_lp_ft_on_streaming_data_trains_stage_one_on_cached_features(converted, tmp_path):  # noqa: F811
    """One loader path: the streaming data module asks the strategy's stand-in too."""
    cfg = compose_train(_streaming(converted, "finetune=lp_ft", "finetune.callback.lp_epochs=1", "trainer.max_epochs=2",
                                   "test=false", f"finetune.callback.cache_dir={tmp_path / 'features'}"), tmp_path)
    dm, model, trainer = build(cfg)
    kinds = BatchKinds()
    trainer.callbacks.append(kinds)
    trainer.fit(model, datamodule=dm)
    assert {e: {d for d, _ in k} for e, k in kinds.epochs.items()} == {0: {2}, 1: {4}}


def test_a_checkpoint_of_the_old_strategies_is_refused_in_one_line():
    """Their optimizer had groups added at the unfreeze: it cannot be restored into one optimizer."""
    from finetune.errors import FinetuneError
    from finetune.finetuning import Gradual

    with pytest.raises(FinetuneError, match="older finetune"):
        Gradual().load_state_dict({"internal_optimizer_metadata": {0: []}})
