"""`python train.py ...`: compose the config, fit, then test the best checkpoint."""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig

from finetune.callbacks.param_counts import ParameterCounts
from finetune.callbacks.time_budget import TimeBudget
from finetune.cli.config_source import entry_point
from finetune.cli.lr_finder import tune_learning_rate
from finetune.config_checks import check_input_size, check_numbers, check_options
from finetune.data.preprocessing import decide_for
from finetune.data.transforms import Preprocessing
from finetune.errors import FinetuneError
from finetune.finetuning.sizing import size_from_data
from finetune.hparams_view import FIT_TIME
from finetune.models import weights as weights_lib
from finetune.run import run_lock
from finetune.run.distributed import is_global_zero, one_run_for_all_ranks
from finetune.run.requeue import RequeueOnSignal
from finetune.run.resume import (
    METRICS,
    Start,
    checkpoint_problem,
    decide_start,
    prepare_argv,
    write_record,
)
from finetune.run.safe_checkpoint import load_checkpoint
from finetune.runtime import (
    instantiate_all,
    instantiate_loggers,
    log_hyperparameters,
    print_config_tree,
    print_metrics,
    resolve_speed_settings,
)

log = logging.getLogger("finetune")
# metrics.json: the values of the fit's last epoch, kept apart from the tested checkpoint's val/* and test/*.
LAST_EPOCH = "last_epoch/"


def build(cfg: DictConfig, resuming: bool = False,
          purge_step: int | None = None) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """Data, model and trainer from config; the data decides the head size and class names. The
    weights are resolved once and the preprocessing decided once, and both data and model get it.
    `resuming`: the loggers continue a run, whose hparams metric placeholder (step 0) is already
    logged; `purge_step`: the step TensorBoard hides the stopped run's later steps from."""
    datamodule = hydra.utils.instantiate(cfg.data)
    spec = weights_lib.resolve(cfg.model.name, cfg.model.weights)
    preprocessing = decide_for(datamodule, spec.preprocessing)
    sized = {}
    if cfg.get("sizing"):  # the recipe's resolution, schedule length and MixUp from the data
        plan = size_from_data(cfg, datamodule, eval_size=preprocessing.crop_size)
        preprocessing = plan.apply(datamodule, preprocessing)
        sized = {"max_epochs": plan.max_epochs}
        log.info("%s", plan.line)
    model = hydra.utils.instantiate(cfg.model, _partial_=True)(
        num_classes=datamodule.num_classes, class_names=datamodule.classes, preprocessing=preprocessing.as_dict(),
        weights_spec=spec)
    check_sizes(model, preprocessing)
    log.info("classes: %s | preprocessing: %s", datamodule.classes, preprocessing)
    speed = resolve_speed_settings(cfg, model)
    print_config_tree(cfg)

    callbacks = instantiate_all(cfg.get("callbacks"))
    if cfg.get("finetune") and cfg.finetune.get("callback"):
        callbacks.append(strategy_callback(cfg))
    callbacks.append(ParameterCounts())  # after the strategy's callback: it counts what that one froze
    if cfg.get("budget_minutes") is not None:
        callbacks.append(TimeBudget(cfg.budget_minutes))
    loggers = instantiate_loggers(cfg.get("logger"), purge_step)
    plugins, slurm_callbacks = slurm_requeue(cfg)
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks + slurm_callbacks,
                                                 logger=loggers or False, **speed.trainer_kwargs(), **sized,
                                                 **({"plugins": plugins} if plugins else {}))
    log_hyperparameters(cfg, loggers, {"data.image_size": preprocessing.crop_size, **speed.resolved()},
                        resuming=resuming)
    return datamodule, model, trainer


def check_sizes(model: L.LightningModule, p: Preprocessing) -> None:
    """The sizes the data config set (not the weights' own, which need no check) fit the backbone."""
    if "crop_size" in p.explicit:
        check_input_size(model.backbone, p.crop_size, channels_last=model.channels_last)
    if "train_crop_size" in p.explicit:
        check_input_size(model.backbone, p.train_size, key="data.train_image_size", channels_last=model.channels_last)


def strategy_callback(cfg: DictConfig) -> L.Callback:
    """The fine-tuning strategy's callback (`finetune.callback`)."""
    if "_target_" not in cfg.finetune.callback:
        raise FinetuneError(
            f"finetune.callback has settings ({', '.join(cfg.finetune.callback)}) but no _target_: they belong "
            f"to another strategy than finetune={cfg.finetune.get('name')} (an experiment's knobs after "
            "switching finetune=...); remove them with ~finetune.callback.KEY or keep the experiment's strategy")
    return hydra.utils.instantiate(cfg.finetune.callback)


def slurm_requeue(cfg: DictConfig) -> tuple[list, list[L.Callback]]:
    """Plugins and callbacks for a SLURM batch job: on `cfg.slurm.requeue_signal` it saves
    `hpc_ckpt_<n>.ckpt` in the run dir and requeues itself (finetune.run.requeue); the requeued job runs
    in the same run dir (finetune.run.resume) and continues from that checkpoint."""
    slurm = cfg.get("slurm")
    if not slurm or not slurm.get("auto_requeue", True) or not SLURMEnvironment.detect():
        return [], []
    name = str(slurm.get("requeue_signal", "SIGUSR1")).upper()
    try:
        requeue_signal = signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
    except KeyError:
        raise FinetuneError(f"slurm.requeue_signal={name} is not a signal: use SIGUSR1 or SIGTERM, "
                            f"as in #SBATCH --signal=USR1@90") from None
    configured = [hydra.utils.instantiate(p) if isinstance(p, DictConfig) else p
                  for p in cfg.trainer.get("plugins") or []]
    # Lightning's own requeue works inside the signal handler; RequeueOnSignal waits for a batch end.
    return [*configured, SLURMEnvironment(auto_requeue=False)], [RequeueOnSignal(requeue_signal)]


def tensorboard_purge_step(cfg: DictConfig, ckpt_path: str | Path) -> int:
    """A resumed run logs into the same TensorBoard run; steps the stopped run logged after its
    checkpoint are logged again, so TensorBoard is told to hide the stale ones from this step on
    (SummaryWriter's purge_step, given to the loggers when they are built) and each step shows once."""
    loop = load_checkpoint(ckpt_path, trust=bool(cfg.get("trust_checkpoint")))["loops"]["fit_loop"]
    step = loop["epoch_loop.state_dict"]["_batches_that_stepped"]
    batches = loop.get("epoch_loop.batch_progress", {}).get("current", {})
    if batches.get("processed", 0) > batches.get("completed", 0):
        step += 1  # saved in on_train_batch_end, before Lightning counted the batch (it does on restart)
    return step


def keep_tuned_lr(model: L.LightningModule, ckpt_path: str | Path) -> None:
    """`tune_lr=true` on resume: the optimizer restored from the checkpoint keeps the rate the run
    found, so no new search runs (it could only claim to apply its suggestion); the model's
    optimizer config takes the checkpoint's rate, so later checkpoints say what trains."""
    saved = load_checkpoint(ckpt_path).get("hyper_parameters", {})
    lr = (saved.get("optimizer") or {}).get("lr")  # the optimizer's config (finetune.models.factory_config)
    factory = model.hparams.get("optimizer")
    if lr is not None and isinstance(factory, dict):
        factory["lr"] = lr
    log.info("tune_lr=true: the learning-rate finder is not run on resume; the optimizer restored from %s "
             "keeps its learning rate (%s)", ckpt_path, lr)


def train(cfg: DictConfig, ckpt_path: str | Path | None = None) -> dict[str, float]:
    """Fit and test as `cfg` says, continuing from `ckpt_path` (or `cfg.ckpt_path`) when given;
    returns the final metrics (the sweeper's objective among them)."""
    check_numbers(cfg)
    check_options(cfg)
    ckpt_path = ckpt_path or cfg.get("ckpt_path")
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    if ckpt_path:
        problem = checkpoint_problem(Path(ckpt_path), trust=bool(cfg.get("trust_checkpoint")))
        if problem:
            raise FinetuneError(f"ckpt_path={ckpt_path} cannot be resumed from ({problem}); pass a checkpoint "
                                "written by train.py (RUN_DIR/checkpoints/*.ckpt)")
    purge_step = tensorboard_purge_step(cfg, ckpt_path) if ckpt_path else None
    datamodule, model, trainer = build(cfg, resuming=bool(ckpt_path), purge_step=purge_step)
    if ckpt_path and hasattr(datamodule, "resume_split_from"):
        datamodule.resume_split_from(ckpt_path)  # validate on the images the run validated on
    if cfg.get("tune_lr") and ckpt_path:
        keep_tuned_lr(model, ckpt_path)
    elif cfg.get("tune_lr"):
        tune_learning_rate(trainer, model, datamodule, save_dir=cfg.paths.output_dir, **cfg.get("lr_finder", {}))

    # Checkpoints are data (finetune.run.safe_checkpoint): read with the weights-only unpickler.
    weights_only = not cfg.get("trust_checkpoint")
    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=weights_only)
    fit_time = time.perf_counter() - started  # this process's fit (a resumed run: since resuming)
    for lg in trainer.loggers:
        lg.log_metrics({FIT_TIME: fit_time}, step=trainer.global_step)
        lg.save()  # the CSV logger writes on save, and its last save was at the end of fit
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    metrics = final_metrics({k: float(v) for k, v in trainer.callback_metrics.items()}, best)
    metrics[FIT_TIME] = fit_time

    if cfg.get("test"):
        metrics.update(final_test(trainer, model, datamodule, best, cfg.get("tta"), weights_only))
    if trainer.is_global_zero:
        report(metrics, best, Path(cfg.paths.output_dir))
    return metrics


def final_test(trainer: L.Trainer, model: L.LightningModule, datamodule: L.LightningDataModule, best: str,
              tta: str | None, weights_only: bool) -> dict[str, float]:
    """test/* of the best checkpoint (with `tta`), or of the current weights when there is none."""
    if not best:
        log.warning("no best checkpoint (fast_dev_run or no ModelCheckpoint): testing the current weights")
    model.set_tta(tta)
    trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=weights_only)
    if best:
        log.info("best checkpoint: %s", best)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}


def report(metrics: dict[str, float], best: str, run_dir: Path) -> None:
    """Two tables, one per set of weights (the tested checkpoint's validation and test; the last
    epoch's), and metrics.json, which the sweep summary (finetune.run.sweep_summary) reads."""
    tested = f"best checkpoint {Path(best).name}" if best else "final weights"
    print_metrics(f"{tested}: validation and test", {k: v for k, v in metrics.items() if k.split("/")[0] in ("val", "test")})
    print_metrics("last epoch (not tested)", {k[len(LAST_EPOCH):]: v for k, v in metrics.items() if k.startswith(LAST_EPOCH)})
    (run_dir / METRICS).write_text(json.dumps(metrics, indent=2))


def final_metrics(fit_metrics: dict[str, float], best: str) -> dict[str, float]:
    """What metrics.json holds, every value labelled with the weights it belongs to: `val/*` of the
    best checkpoint (saved with it, temperature included), which is the one tested (`test/*`);
    what the fit ended with under `last_epoch/` (train/* and the last validation); `val/acc_best`
    is the whole run's best. Without a best checkpoint the final weights are tested, so `val/*`
    are the last validation's."""
    metrics = {f"{LAST_EPOCH}{k}": v for k, v in fit_metrics.items() if k != "val/acc_best"}
    if "val/acc_best" in fit_metrics:
        metrics["val/acc_best"] = fit_metrics["val/acc_best"]
    if not best:
        metrics.update({k: v for k, v in fit_metrics.items() if k.startswith("val/")})
        return metrics
    saved = load_checkpoint(best).get("val_metrics")
    if saved is None:
        log.warning("%s predates saved validation metrics: metrics.json has the last epoch's (last_epoch/val/*) "
                    "but no val/* for the tested checkpoint", best)
        return metrics
    metrics.update({k: float(v) for k, v in saved.items() if k != "val/acc_best"})
    return metrics


def train_or_resume(cfg: DictConfig) -> dict[str, float]:
    """`train` in the run dir as `cfg.resume` and the dir's own record say: afresh, from the dir's
    newest readable checkpoint, or not at all when this run already finished there. Rank zero holds
    the run dir's lock throughout (finetune.run.run_lock): one training process per run dir."""
    run_dir = Path(cfg.paths.output_dir)
    if not is_global_zero():
        return _train_or_resume(cfg, run_dir)
    with run_lock.locked(run_dir):
        return _train_or_resume(cfg, run_dir)


def _train_or_resume(cfg: DictConfig, run_dir: Path) -> dict[str, float]:
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    start = Start(ckpt_path=Path(cfg.ckpt_path)) if cfg.get("ckpt_path") else \
        decide_start(run_dir, overrides, cfg.get("resume"), trust=bool(cfg.get("trust_checkpoint")))
    if start.finished:
        log.info("%s: this run already finished (its metrics: %s); nothing to train. Train more with "
                 "resume=%s trainer.max_epochs=N, or again with resume=never", run_dir, run_dir / METRICS, run_dir)
        metrics_file = run_dir / METRICS
        return json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    if start.ckpt_path:
        log.info("resuming %s from %s", run_dir, start.ckpt_path)
    if is_global_zero():
        write_record(run_dir, overrides, finished=False)
    metrics = train(cfg, ckpt_path=start.ckpt_path)
    if is_global_zero():
        write_record(run_dir, overrides, finished=True)
    return metrics


def objective(cfg: DictConfig) -> float | None:
    """Train (or resume) with every DDP rank in this one run; `optimized_metric`'s value for a sweeper."""
    with one_run_for_all_ranks():
        metrics = train_or_resume(cfg)
    metric = cfg.get("optimized_metric")
    return metrics.get(metric) if metric else None


hydra_main = entry_point("train", objective)


def main() -> float | None:
    """`python train.py ...`: `resume=RUN_DIR` and a SLURM job's run dir become Hydra overrides
    before Hydra reads the command line (it picks the run dir before any config code runs)."""
    try:
        sys.argv = prepare_argv(sys.argv)
    except FinetuneError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    return hydra_main()


if __name__ == "__main__":
    main()
