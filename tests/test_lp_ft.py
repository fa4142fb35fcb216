"""LP-FT: the head alone on cached features, then every layer from that head, resumable in either stage."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch

from finetune.cli.train import build, train
from test_finetuning import TINY, Snapshots, changed, snapshot

LP_FT = TINY + ["finetune=lp_ft", "finetune.callback.lp_epochs=2", "finetune.callback.ft_lr_mult=0.1",
                "model.optimizer.lr=0.01", "trainer.precision=32-true"]


class BatchKinds(L.Callback):
    """Per training epoch: the dimensions of the input batches and whether targets were soft."""

    def __init__(self) -> None:
        self.epochs: dict[int, set[tuple[int, bool]]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        inputs, targets = batch
        self.epochs.setdefault(trainer.current_epoch, set()).add((inputs.dim(), targets.dim() == 2))


@pytest.mark.slow
def test_lp_ft_trains_the_head_on_features_then_everything_at_the_lower_rate(make_cfg):
    # Random training data (crops, flips, MixUp) must not stop stage 1 from using cached features.
    cfg = make_cfg(LP_FT + ["trainer.max_epochs=3", "data.augment=true", "data.mixup_alpha=0.4"])
    dm, model, trainer = build(cfg)
    spy, kinds = Snapshots(), BatchKinds()
    trainer.callbacks += [spy, kinds]
    start_backbone, start_head = snapshot(model.backbone), snapshot(model.head)
    trainer.fit(model, datamodule=dm)

    # Stage 1 (epochs 0-1): 2-D cached features with hard targets; the backbone bitwise frozen.
    assert kinds.epochs == {0: {(2, False)}, 1: {(2, False)}, 2: {(4, True)}}
    assert changed(start_backbone, spy.backbone[1]) == []
    assert changed(start_head, snapshot(model.head))
    # Stage 2: the backbone trains, every group at 0.1 x its stage-1 rate.
    assert len(changed(spy.backbone[1], spy.backbone[2])) > 10
    assert spy.groups[0] == [("backbone", pytest.approx(0.001)), ("backbone.no_decay", pytest.approx(0.001)),
                             ("head", 0.01), ("head.no_decay", 0.01)]
    assert spy.groups[2] == [("backbone", pytest.approx(0.001)), ("backbone.no_decay", pytest.approx(0.001)),
                             ("head", pytest.approx(0.001)), ("head.no_decay", pytest.approx(0.001))]


def halve(epoch: int) -> float:
    """A learning-rate lambda Lightning can pickle into the checkpoint's hparams."""
    return 0.5 ** epoch


def test_lp_ft_logs_the_stage_and_its_groups_follow_the_schedule(make_cfg, tmp_path):
    cfg = make_cfg(LP_FT + ["trainer.max_epochs=4", "finetune.callback.lp_epochs=1", "test=false"])
    dm, model, trainer = build(cfg)
    # A schedule read from base_lrs (LambdaLR): groups that join later must be given theirs.
    model.hparams.scheduler = {"_target_": "torch.optim.lr_scheduler.LambdaLR", "_partial_": True, "lr_lambda": halve}
    spy = Snapshots()
    trainer.callbacks.append(spy)
    trainer.fit(model, datamodule=dm)
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        metrics = list(csv.DictReader(f))
    stages = [float(r["train/stage"]) for r in metrics if r.get("train/stage")]
    assert stages == [1.0, 2.0, 2.0, 2.0]
    # Every group halves every epoch, the backbone groups that joined at epoch 1 included, and
    # they join where the schedule is: at the head's (already 0.1x) rate.
    lrs = [dict(g) for g in spy.groups]
    for epoch in (1, 2, 3):
        assert lrs[epoch]["backbone"] == pytest.approx(lrs[epoch]["head"])
    for epoch in (2, 3):
        assert lrs[epoch]["backbone"] == pytest.approx(lrs[epoch - 1]["backbone"] / 2)


@pytest.mark.slow
@pytest.mark.parametrize("killed_after", [1, 3])  # in stage 1, in stage 2
def test_lp_ft_resumed_in_either_stage_ends_as_the_uninterrupted_run(make_cfg, tmp_path, killed_after):
    run = LP_FT + ["test=false", "callbacks=default", "callbacks.rich_progress_bar=null",
                   "data.augment=true", "trainer.deterministic=true"]
    whole = train(make_cfg(run + ["trainer.max_epochs=4"], out_dir=tmp_path / "whole"))
    whole_state = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]

    resumed_dir = tmp_path / "resumed"
    train(make_cfg(run + [f"trainer.max_epochs={killed_after}"], out_dir=resumed_dir))
    last = resumed_dir / "checkpoints" / "last.ckpt"
    dm, model, trainer = build(make_cfg(run + ["trainer.max_epochs=4"], out_dir=resumed_dir))
    kinds = BatchKinds()
    trainer.callbacks.append(kinds)
    trainer.fit(model, datamodule=dm, ckpt_path=str(last), weights_only=False)
    resumed_state = torch.load(last, weights_only=False)["state_dict"]

    assert set(kinds.epochs) == set(range(killed_after, 4))
    assert all(kinds.epochs[e] == ({(2, False)} if e < 2 else {(4, False)}) for e in kinds.epochs)
    different = [k for k in whole_state if not torch.allclose(whole_state[k].float(), resumed_state[k].float())]
    assert different == []
    assert float(trainer.callback_metrics["val/acc"]) == pytest.approx(float(whole["last_epoch/val/acc"]))


def test_lp_ft_needs_a_probing_stage(make_cfg):
    with pytest.raises(Exception, match="lp_epochs=0"):
        build(make_cfg(LP_FT + ["finetune.callback.lp_epochs=0"]))
