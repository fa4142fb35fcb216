"""Optimizer parameter groups: the backbone (one group, or one per block with `layer_decay`) and
the new head, each split into parameters that get weight decay and those that do not.

Each group carries a `name` (Lightning's LearningRateMonitor uses it for its curve, e.g.
`lr-AdamW/backbone.layer3.0`) and an `lr_mult` applied to the optimizer's base learning rate, so
`head_lr_mult=10` reproduces the d2l recipe and `layer_decay` gives earlier blocks geometrically
smaller rates.

Blocks are found the way timm's `param_groups_layer_decay` finds them: a timm model's own
`group_matcher` (stem, each block, final norm); for other models (torchvision) a generic walk that
opens the `Sequential` / `ModuleList` containers holding the blocks. As in timm (BEiT), the head is
the top layer: block `i` of `n` trains at `layer_decay ** (n - i)` times the base rate and the head
at `head_lr_mult` times it.

Biases, norm weights and embeddings (class tokens, position embeddings, relative position tables)
get `weight_decay=0`, as timm's `weight_decay_exclude_1d` plus `no_weight_decay()` and
torchvision's `norm_weight_decay=0` do; `decay_norm_and_bias=True` decays them too.
"""

from __future__ import annotations

import fnmatch
import os
from collections import Counter
from collections.abc import Iterable
from typing import Any

from timm.models import group_parameters
from torch import nn

NO_DECAY = ".no_decay"
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


# --- which block each parameter belongs to ---------------------------------------------------------
def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _is_container(module: nn.Module) -> bool:
    """Plain containers only: subclasses such as torchvision's `Conv2dNormActivation` are one layer."""
    return type(module) in _CONTAINERS


def _units(module: nn.Module, prefix: str, in_container: bool) -> list[tuple[str, list[str], bool]]:
    """(path, parameter names, came from a container) for each block, in registration order.

    Containers are opened (their elements are the blocks); modules outside any container are
    opened too when they hold a container (torchvision ViT's `encoder` holds `layers`), so that
    parameters such as `encoder.pos_embedding` land in the stem rather than in one giant block.
    """
    def join(name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    units = []
    own = [join(n) for n, _ in module.named_parameters(recurse=False)]
    if own:
        units.append((prefix, own, in_container))
    for name, child in module.named_children():
        if not _has_params(child):
            continue
        if _is_container(child):
            units += _units(child, join(name), True)
        elif not in_container and any(_is_container(c) and _has_params(c) for c in child.children()):
            units += _units(child, join(name), False)
        else:
            units.append((join(name), [n for n, _ in child.named_parameters(prefix=join(name))], in_container))
    return units


def _generic_layers(backbone: nn.Module) -> list[tuple[str, list[str]]]:
    """Blocks of a model without a `group_matcher`: everything before the first block that sits in a
    container is the stem (conv1 + bn1, class token, patch projection, position embedding); each
    block in a container is a layer; what follows (final norm) is a layer each."""
    units = _units(backbone, "", False)
    first = next((i for i, (_, _, in_container) in enumerate(units) if in_container), None)
    if first is None or first == 0:
        return [(path or "stem", names) for path, names, _ in units]
    stem = [n for _, names, _ in units[:first] for n in names]
    return [("stem", stem)] + [(path, names) for path, names, _ in units[first:]]


def _layer_name(index: int, names: list[str]) -> str:
    """A readable name for a timm layer: the module path its parameters share (`blocks.3`), or
    several joined by "+" where timm merges modules (`blocks.11+norm`); layer 0 is the stem."""
    if index == 0:
        return "stem"
    clusters: dict[str, list[list[str]]] = {}
    for name in names:
        parts = name.split(".")
        clusters.setdefault(parts[0], []).append(parts)
    paths = []
    for parts in clusters.values():
        common = os.path.commonprefix(parts)
        paths.append(".".join(common[:-1] if len(parts) == 1 and len(common) > 1 else common))
    return "+".join(paths)


def _timm_layers(backbone: nn.Module) -> list[tuple[str, list[str]]]:
    """timm's fine-grained grouping (stem, each block, final norm), as `param_groups_layer_decay`."""
    by_layer = group_parameters(backbone, backbone.group_matcher(coarse=False))
    return [(_layer_name(i, by_layer[i]), list(by_layer[i])) for i in sorted(by_layer)]


def backbone_layers(backbone: nn.Module) -> list[tuple[str, list[str]]]:
    """(name, parameter names) per layer, input to output; every parameter in exactly one layer."""
    if hasattr(backbone, "group_matcher"):
        return _timm_layers(backbone)
    return _generic_layers(backbone)


# --- which parameters get weight decay ------------------------------------------------------------
def _is_builtin_layer(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.nn.")


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Biases, norm weights and other 1-D tensors; embeddings (`nn.Embedding`, and tensors owned
    directly by a composite block, such as ViT's class token and position embedding or Swin's
    relative position table); and what a timm model lists in `no_weight_decay()`."""
    patterns = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    names = set()
    for owner_name, owner in model.named_modules():
        embedding_owner = isinstance(owner, nn.Embedding) or (
            not _is_builtin_layer(owner) and next(owner.children(), None) is not None
        )
        for short, p in owner.named_parameters(recurse=False):
            name = f"{owner_name}.{short}" if owner_name else short
            if (p.ndim <= 1 or short == "bias" or embedding_owner
                    or any(fnmatch.fnmatch(name, pattern) for pattern in patterns)):
                names.add(name)
    return names


# --- the groups ---------------------------------------------------------------------------------
def _split(
    name: str, named: Iterable[tuple[str, nn.Parameter]], lr_mult: float, no_decay: set[str] | None
) -> list[dict[str, Any]]:
    """One group, or two (`name` and `name.no_decay`, the latter at weight_decay 0)."""
    named = list(named)
    if no_decay is None:
        return [{"name": name, "params": [p for _, p in named], "lr_mult": lr_mult}]
    decay = [p for n, p in named if n not in no_decay]
    plain = [p for n, p in named if n in no_decay]
    return [
        {"name": name, "params": decay, "lr_mult": lr_mult},
        {"name": name + NO_DECAY, "params": plain, "lr_mult": lr_mult, "weight_decay": 0.0},
    ]


def backbone_groups(
    backbone: nn.Module,
    layer_decay: float | None = None,
    decay_norm_and_bias: bool = False,
    trainable_only: bool = True,
    lr_mult: float = 1.0,
) -> list[dict[str, Any]]:
    """The backbone's groups: "backbone" at `lr_mult`, or with `layer_decay` one per layer
    ("backbone.stem", "backbone.layer1.0", ...) at `lr_mult * layer_decay ** (n_layers - i)`."""
    params = {n: p for n, p in backbone.named_parameters() if p.requires_grad or not trainable_only}
    no_decay = None if decay_norm_and_bias else no_weight_decay_names(backbone)
    if layer_decay is None:
        layers = [("", list(params))]
    else:
        layers = backbone_layers(backbone)
    groups = []
    for i, (layer, names) in enumerate(layers):
        mult = lr_mult * (1.0 if layer_decay is None else layer_decay ** (len(layers) - i))
        named = [(n, params[n]) for n in names if n in params]
        groups += _split(f"backbone.{layer}" if layer else "backbone", named, mult, no_decay)
    return [g for g in groups if g["params"]]


def param_groups(
    backbone: nn.Module,
    head: nn.Module,
    head_lr_mult: float = 1.0,
    layer_decay: float | None = None,
    decay_norm_and_bias: bool = False,
    trainable_only: bool = True,
    backbone_lr_mult: float = 1.0,
) -> list[dict[str, Any]]:
    """Groups for the optimizer; frozen parameters are left out unless `trainable_only=False`
    (the model keeps every parameter in its group and a strategy switches what trains)."""
    groups = backbone_groups(backbone, layer_decay, decay_norm_and_bias, trainable_only, backbone_lr_mult)
    named = [(n, p) for n, p in head.named_parameters() if p.requires_grad or not trainable_only]
    no_decay = None if decay_norm_and_bias else no_weight_decay_names(head)
    groups += [g for g in _split("head", named, head_lr_mult, no_decay) if g["params"]]
    return groups


def check_partition(groups: list[dict[str, Any]], model: nn.Module, trainable_only: bool = False) -> None:
    """Every parameter of `model` (with `trainable_only`, every trainable one) in exactly one
    group, and nothing else in any group.

    A parameter in no group silently never trains; one in two groups trains twice as fast. Either
    is a bug in the grouping, so this raises RuntimeError naming the parameters.
    """
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    seen: dict[int, str] = {}
    twice, foreign = [], []
    for group in groups:
        for p in group["params"]:
            if id(p) in seen:
                twice.append(f"{names.get(id(p), '?')} ({seen[id(p)]}, {group.get('name')})")
            elif id(p) not in names or (trainable_only and not p.requires_grad):
                foreign.append(f"{names.get(id(p), 'unknown')} ({group.get('name')})")
            seen.setdefault(id(p), str(group.get("name")))
    missing = [n for n, p in model.named_parameters()
               if (p.requires_grad or not trainable_only) and id(p) not in seen]
    counts = Counter(str(g.get("name")) for g in groups)
    duplicate_names = sorted(name for name, count in counts.items() if count > 1)
    problems = [
        f"{label}: {', '.join(map(str, items[:10]))}{' ...' if len(items) > 10 else ''}"
        for label, items in (("in no group", missing), ("in two groups", twice),
                             ("frozen or not in the model" if trainable_only else "not in the model", foreign),
                             ("group names used twice", duplicate_names))
        if items
    ]
    if problems:
        raise RuntimeError("optimizer parameter groups do not partition the trainable parameters; "
                           + "; ".join(problems))
