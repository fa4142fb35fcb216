"""What TensorBoard's HParams tab shows: the settings a researcher varies, the metrics that compare
runs, and a sweep job's run named by its overrides.

The whole resolved config stays in the run dir (`.hydra/config.yaml`); HParams gets only the
columns that tell runs apart (callback internals and paths would push them off screen).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

# The metrics column, in this order; one a run never logs (test=false) stays empty, not 0.
FIT_TIME = "time/fit_s"  # seconds in trainer.fit, logged by finetune.cli.train
METRICS = ("val/acc_best", "test/acc", "test/loss", "test/ece", FIT_TIME)

# Column name -> config key, for the settings every run has.
COLUMNS = {
    "model/name": "model.name",
    "model/weights": "model.weights",
    "data/image_size": "data.image_size",
    "data/batch_size": "data.batch_size",
    "finetune/strategy": "finetune.name",
    "model/head_lr_mult": "model.head_lr_mult",
    "model/layer_decay": "model.layer_decay",
    "trainer/precision": "trainer.precision",
    "trainer/max_epochs": "trainer.max_epochs",
    "seed": "seed",
}
# Sections whose scalar settings are all knobs of one choice: column prefix -> config key.
KNOB_SECTIONS = {"finetune": "finetune.callback", "optimizer": "model.optimizer", "scheduler": "model.scheduler"}
# Overrides that say where things are or how a run is kept, not what it trains.
NOT_SETTINGS = re.compile(r"^(hydra|paths|callbacks|logger|resume|ckpt_path|slurm)(\.|$)|(dir|root|path|file|csv)$")
RUN_NAME_CHARS = re.compile(r"[^A-Za-z0-9_=,.+@-]")
MAX_RUN_NAME = 120


def select_hparams(cfg: DictConfig, resolved: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The HParams columns of a run: COLUMNS, each strategy/optimizer/scheduler knob, the data
    source, and the run's own overrides of anything else. `resolved`: what the run decided in
    place of a config value, by config key (`data.image_size`: the crop size it really feeds, the
    weights' own when the config's is null; `trainer.precision` for `auto`); the config is read as
    Hydra composed it."""
    resolved = resolved or {}

    def value(key: str) -> Any:
        return resolved[key] if key in resolved else OmegaConf.select(cfg, key, default=None)

    params = {column: value(key) for column, key in COLUMNS.items()}
    params["data/source"] = data_source(cfg)
    covered = {*COLUMNS.values(), "data", "model", "finetune"}  # group choices: the columns above say them
    for prefix, key in KNOB_SECTIONS.items():
        section = OmegaConf.select(cfg, key, default=None)
        if prefix != "finetune":
            params[f"{prefix}/class"] = _class_name(section)
        for knob, knob_value in _knobs(section):
            params[f"{prefix}/{knob}"] = knob_value
            covered.add(f"{key}.{knob}")
    for key, override in _overrides():
        if key not in covered and not NOT_SETTINGS.search(key):
            selected = value(key)
            params[key] = selected if _is_scalar(selected) and selected is not None else override
    return {k: _displayable(v) for k, v in sorted(params.items())}


def data_source(cfg: DictConfig) -> str | None:
    """The data config chosen (`data=hotdog`), else the DataModule's class name."""
    choice = _hydra_select("runtime.choices.data")
    return str(choice) if choice else _class_name(cfg.get("data"))


def log_hparams(loggers: Iterable[Logger], params: dict[str, Any], metrics: Iterable[str] = METRICS) -> None:
    """`params` to every logger; TensorBoard also gets the HParams summaries that make `metrics` its
    metrics column. No placeholder values are logged (Lightning's way logs 0 at step 0, which
    TensorBoard would show for a metric the run never reaches)."""
    for lg in loggers:
        lg.log_hyperparams(params)
        if isinstance(lg, TensorBoardLogger):
            _write_hparams_summaries(lg, params, list(metrics))


def _write_hparams_summaries(logger: TensorBoardLogger, params: dict[str, Any], metrics: list[str]) -> None:
    from torch.utils.tensorboard.summary import hparams

    # Ranks other than 0 get Lightning's DummyExperiment, whose every method returns None.
    writer = logger.experiment._get_file_writer() if logger.experiment is not None else None
    if writer is None:
        return
    for summary in hparams(params, dict.fromkeys(metrics, 0.0)):  # values unused: only names are written
        writer.add_summary(summary)
    writer.flush()


def tensorboard_version() -> str:
    """The TensorBoard run (version dir) of this run: a sweep job's is named by its overrides, e.g.
    `model=resnet34,model.optimizer.lr=0.001`; a single run logs straight into `tensorboard/`
    (""), its run dir `outputs/<date>/<time>` naming it."""
    if getattr(_hydra_select("mode"), "name", None) != "MULTIRUN":
        return ""
    job = list(_overrides())
    swept = _swept_keys()
    chosen = [(k, v) for k, v in job if k in swept] or [(k, v) for k, v in job if not NOT_SETTINGS.search(k)]
    name = ",".join(f"{k}={v}" for k, v in chosen) or f"job{_hydra_select('job.num')}"
    return sanitise_run_name(name)


def sanitise_run_name(name: str) -> str:
    """A file-system-safe directory name: characters outside letters, digits and `_=,.+@-` become
    `_`; a long name is cut and ends in a hash of the whole, so two long names stay apart."""
    safe = RUN_NAME_CHARS.sub("_", name).strip(".") or "_"
    if len(safe) > MAX_RUN_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        safe = f"{safe[:MAX_RUN_NAME - 9]}-{digest}"
    return safe


OmegaConf.register_new_resolver("finetune_tensorboard_version", tensorboard_version, replace=True)


def _swept_keys() -> set[str]:
    """Keys a sweep varies: the sweeper's search space (`hydra.sweeper.params`, Optuna's) and the
    sweep command's sweep overrides (`lr=0.1,0.01`, `range(...)`), read with Hydra's own parser
    from the multirun.yaml Hydra saved in the sweep dir (the job's sys.argv is its own by now)."""
    keys = {str(k) for k in (_hydra_select("sweeper.params") or {})}
    saved = Path(str(_hydra_select("sweep.dir"))) / "multirun.yaml"
    if not saved.is_file():
        return keys
    command = OmegaConf.select(OmegaConf.load(saved), "hydra.overrides.task", default=None) or []
    try:
        parsed = OverridesParser.create().parse_overrides([str(o) for o in command])
    except HydraException:
        return keys
    return keys | {o.key_or_group for o in parsed if o.is_sweep_override()}


def _overrides() -> Iterable[tuple[str, str]]:
    """This job's command-line overrides as (key, value); `+`/`++` prefixes dropped, deletions skipped."""
    for override in _hydra_select("overrides.task") or []:
        key, sep, value = str(override).partition("=")
        if sep and not key.startswith("~"):
            yield key.lstrip("+"), value


def _hydra_select(key: str) -> Any:
    if not HydraConfig.initialized():
        return None
    return OmegaConf.select(HydraConfig.get(), key, default=None, throw_on_missing=False)


def _knobs(section: Any) -> Iterable[tuple[str, Any]]:
    """The scalar settings of a config section, `_target_` and paths left out."""
    if not isinstance(section, DictConfig):
        return []
    return [(k, v) for k, v in section.items_ex(resolve=True)
            if not str(k).startswith("_") and _is_scalar(v) and not NOT_SETTINGS.search(str(k))]


def _class_name(section: Any) -> str:
    target = section.get("_target_") if isinstance(section, DictConfig) else None
    return str(target).rsplit(".", 1)[-1] if target else "none"


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _displayable(value: Any) -> bool | int | float | str:
    """TensorBoard's HParams takes numbers, bools and strings; null shows as `null`."""
    if value is None:
        return "null"
    return value if isinstance(value, (bool, int, float, str)) else str(value)
