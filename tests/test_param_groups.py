"""Optimizer parameter groups: every trainable parameter in exactly one group, per-block rates that
decay from the head to the stem, no weight decay on biases, norms and embeddings (unless asked),
and the same groups when `finetune=gradual` unfreezes the backbone."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from torch import nn
from torchvision.models import VisionTransformer

from finetune.cli.train import build
from finetune.finetuning.param_groups import NO_DECAY, check_partition, param_groups
from finetune.models import ImageClassifier

WD = 0.05
TINY = [
    "data=shapes", "data.train_size=64", "data.val_size=16", "data.test_size=16",
    "data.image_size=32", "data.resize_size=32", "data.batch_size=16",
    "model.weights=null", "callbacks.rich_progress_bar=null", "logger=csv",
    "+trainer.enable_model_summary=false",
]

# name -> (the parameter nearest the input, parameters beyond 1-D that are embeddings, layers with
# the head: stem + each block (+ final norm where timm does not merge it into the last block) + head)
ARCHITECTURES = {
    "resnet18": ("conv1.weight", set(), 1 + 8 + 1),
    "mobilenet_v2": ("features.0.0.weight", set(), 19 + 1),
    "timm:efficientnet_b0": ("conv_stem.weight", set(), 1 + 16 + 1),
    "vit_small": ("class_token", {"class_token", "encoder.pos_embedding"}, 1 + 4 + 1 + 1),  # torchvision
    "vit_b_16": ("class_token", {"class_token", "encoder.pos_embedding"}, 1 + 12 + 1 + 1),
    "timm:vit_tiny_patch16_224": ("cls_token", {"cls_token", "pos_embed"}, 1 + 12 + 1),
}


def classifier(name: str, **kwargs) -> ImageClassifier:
    """A random-init classifier; "vit_small" is torchvision's VisionTransformer at 32 px, 4 blocks."""
    kwargs = {"layer_decay": 0.7, "optimizer": partial(torch.optim.AdamW, lr=1e-3, weight_decay=WD), **kwargs}
    if name != "vit_small":
        return ImageClassifier(name=name, weights=None, num_classes=3, **kwargs)
    model = ImageClassifier(name="resnet18", weights=None, num_classes=3, channels_last=False, **kwargs)
    model.backbone = VisionTransformer(image_size=32, patch_size=8, num_layers=4, num_heads=2,
                                       hidden_dim=16, mlp_dim=32)
    model.backbone.heads = nn.Identity()
    model.head = nn.Sequential(nn.Dropout(0.0), nn.Linear(16, 3))
    return model


def layer_rates(groups: list[dict]) -> list[tuple[str, float]]:
    """(layer, lr) in group order, a layer's decay and no-decay groups counted once."""
    rates: dict[str, float] = {}
    for g in groups:
        layer = g["name"].removesuffix(NO_DECAY)
        assert rates.setdefault(layer, g["lr"]) == g["lr"], layer
    return list(rates.items())


def names_of(model: nn.Module, params: list[nn.Parameter]) -> set[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in params}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_layer_decay_groups_every_parameter_once_with_rates_decaying_towards_the_stem(name):
    model = classifier(name)
    groups = model.configure_optimizers().param_groups
    in_groups = [id(p) for g in groups for p in g["params"]]
    assert len(in_groups) == len(set(in_groups))  # none twice
    assert set(in_groups) == {id(p) for p in model.parameters() if p.requires_grad}  # none missing
    assert len({g["name"] for g in groups}) == len(groups)  # one curve per group in the LR monitor

    first, _, n_layers = ARCHITECTURES[name]
    rates = layer_rates(groups)
    assert len(rates) == n_layers  # one per block, as timm groups them
    assert rates[-1] == ("head", pytest.approx(1e-3))
    lrs = [lr for _, lr in rates]
    assert lrs == sorted(lrs) and len(set(lrs)) == len(lrs)  # strictly decaying from head to stem
    assert lrs[:2] == pytest.approx([1e-3 * 0.7 ** (len(rates) - 1), 1e-3 * 0.7 ** (len(rates) - 2)])
    stem = [g for g in groups if g["lr"] == lrs[0]]
    assert "backbone." + first in names_of(model, [p for g in stem for p in g["params"]])


@pytest.mark.parametrize("name", ["resnet18", "vit_small", "timm:vit_tiny_patch16_224"])
def test_biases_norms_and_embeddings_get_no_weight_decay_unless_switched_on(name):
    model = classifier(name)
    _, embeddings, _ = ARCHITECTURES[name]
    expected = {n for n, p in model.named_parameters() if p.ndim <= 1} | {f"backbone.{e}" for e in embeddings}
    groups = model.configure_optimizers().param_groups
    undecayed = names_of(model, [p for g in groups if g["weight_decay"] == 0 for p in g["params"]])
    decayed = names_of(model, [p for g in groups if g["weight_decay"] == WD for p in g["params"]])
    assert undecayed == expected
    assert decayed == {n for n, _ in model.named_parameters()} - expected
    assert all(g["name"].endswith(NO_DECAY) == (g["weight_decay"] == 0) for g in groups)

    switched = classifier(name, decay_norm_and_bias=True).configure_optimizers().param_groups
    assert {g["weight_decay"] for g in switched} == {WD}
    assert not any(g["name"].endswith(NO_DECAY) for g in switched)


@pytest.mark.parametrize("name, size", [("vit_small", 32), ("timm:vit_tiny_patch16_224", 224)])
def test_class_token_and_position_embedding_train(name, size):
    """Owned by the backbone itself (not by one of its blocks), they used to be in no group."""
    torch.manual_seed(0)
    model = classifier(name)
    optimizer = model.configure_optimizers()
    _, embeddings, _ = ARCHITECTURES[name]
    before = {e: model.backbone.get_parameter(e).detach().clone() for e in embeddings}
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, size, size)), torch.tensor([0, 1]))
    loss.backward()
    optimizer.step()
    for e, tensor in before.items():
        assert not torch.equal(tensor, model.backbone.get_parameter(e)), e


def test_a_parameter_outside_the_groups_is_a_bug_named_in_the_error():
    model = classifier("resnet18", layer_decay=None)
    model.temperature = nn.Parameter(torch.ones(1))  # trainable, but neither backbone nor head
    with pytest.raises(RuntimeError, match=r"in no group: temperature"):
        model.configure_optimizers()

    groups = param_groups(model.backbone, model.head)
    groups[0]["params"].append(model.head[1].weight)
    with pytest.raises(RuntimeError, match=r"in two groups: head\.1\.weight"):
        check_partition(groups, nn.ModuleDict({"backbone": model.backbone, "head": model.head}))


class GroupRates(L.Callback):
    """The optimizer's (name, lr, weight_decay) per training epoch, and the stem's first weight."""

    def __init__(self) -> None:
        self.groups: list[list[tuple[str, float, float]]] = []
        self.stem: list[torch.Tensor] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.groups.append([(g["name"], g["lr"], g["weight_decay"]) for g in trainer.optimizers[0].param_groups])
        self.stem.append(pl_module.backbone.conv1.weight.detach().clone())
        check_partition(trainer.optimizers[0].param_groups, pl_module)


@pytest.mark.slow  # multi-epoch training
def test_gradual_unfreeze_keeps_the_per_block_rates_of_layer_decay(make_cfg):
    cfg = make_cfg(TINY + [
        "finetune=gradual", "finetune.callback.unfreeze_at_epoch=1", "finetune.callback.backbone_lr_mult=0.1",
        "model.layer_decay=0.5", "model.optimizer.lr=0.01", "model.optimizer.weight_decay=0.001",
        "trainer.max_epochs=2",
    ])
    dm, model, trainer = build(cfg)
    spy, monitor = GroupRates(), LearningRateMonitor(logging_interval="epoch")
    trainer.callbacks += [spy, monitor]
    start = model.backbone.conv1.weight.detach().clone()
    trainer.fit(model, datamodule=dm)

    assert [name for name, _, _ in spy.groups[0]] == [name for name, _, _ in spy.groups[1]]  # one optimizer
    after = {name: (lr, wd) for name, lr, wd in spy.groups[1]}
    # resnet18: the head (layer 9) at the base rate; below it a stem and 8 blocks, each at
    # backbone_lr_mult x 0.5 ** (9 - i), as `finetune=full` would give them (times 0.1).
    assert after["head"] == (pytest.approx(0.01), 0.001)
    assert after["backbone.layer4.1"] == (pytest.approx(0.01 * 0.1 * 0.5), 0.001)
    assert after["backbone.layer2.0.no_decay"] == (pytest.approx(0.01 * 0.1 * 0.5 ** 6), 0.0)
    assert after["backbone.stem"] == (pytest.approx(0.01 * 0.1 * 0.5 ** 9), 0.001)
    assert len(layer_rates([{"name": n, "lr": lr} for n, (lr, _) in after.items()])) == 10
    assert torch.equal(spy.stem[0], start) and not torch.equal(spy.stem[1], start)
    assert {"lr-Adam/backbone.stem", "lr-Adam/backbone.layer3.0.no_decay", "lr-Adam/head"} <= set(monitor.lrs)
