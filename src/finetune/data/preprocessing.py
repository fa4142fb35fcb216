"""The one decision of a run's preprocessing (as timm's `resolve_data_config`): train, evaluate and
optimize call it once, then hand the result to both the data module and the model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from finetune.data.transforms import Preprocessing


def decide_preprocessing(defaults: Preprocessing, source: Mapping[str, Any] | None = None,
                         user: Mapping[str, Any] | None = None) -> Preprocessing:
    """`defaults` (the weights' own, or the checkpoint's for evaluation), then the data source's
    own settings (`source_preprocessing()`: a converted data set's, those it was converted with),
    then the user's explicit `data.*` values (the data module's `overrides`), each on top of the
    one before: a later crop size without a resize size keeps the earlier crop/resize ratio, so
    the order matters. None means "not set". The result records in `explicit` which fields the
    source or the user set (a size the weights did not choose is checked against the backbone)."""
    decided, explicit = defaults, set()
    for values in (source or {}, user or {}):
        given = {key: value for key, value in values.items() if value is not None}
        decided = decided.override(**given)
        explicit.update(given)
    return replace(decided, explicit=tuple(sorted(explicit)))


def decide_for(datamodule: Any, defaults: Preprocessing) -> Preprocessing:
    """`decide_preprocessing` on `defaults` with the data module's source settings and explicit
    values, handed to the data module (`use_preprocessing`); returned, for the model to get the same."""
    decided = decide_preprocessing(defaults, datamodule.source_preprocessing(), datamodule.overrides)
    datamodule.use_preprocessing(decided)
    return decided
