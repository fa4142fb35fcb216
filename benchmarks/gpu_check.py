"""One-shot GPU check: the figures a lent GPU machine should give, in one command, under 8 minutes.

    python benchmarks/gpu_check.py                       # on a CUDA machine; without one: skipped, exit 0
    python benchmarks/gpu_check.py --device cpu --tiny   # every stage at toy sizes: the code paths only

Stages, each started only while the time budget (--budget, 480 s) lasts and cut at its own limit:
  synthetic  ResNet-50 training images/s at 224 on in-memory batches (no input pipeline), for fp32,
             bf16-mixed, bf16-mixed + channels_last (and, last, + torch.compile)
  folder     the same from a JPEG ImageFolder tree generated into a temp dir (the product's loader)
  ema        prints the device of the EMA average (callbacks.ema) at the first step: the module's,
             never the CPU during GPU training
  quickstart `python train.py experiment=quickstart trainer=gpu` in a subprocess: test accuracy
             and wall time through the real entry point
  ddp        the quickstart with trainer=ddp over every GPU (two or more; trainer=ddp_cpu on CPU)
  frozen     benchmarks/frozen_cache.py on the GPU (cached against uncached frozen recipe)
The compile runs go last: compiling takes a minute or more, and the budget skips them first.
--tiny: ResNet-18, 32 px, 2 timed steps, 2-image data sets, 1 epoch; on CPU torch.compile is skipped
(its compile time is the whole run) unless --compile-on-cpu.

Output: a progress line per figure as it is measured, `skipped: <stage> (<why>)` for a stage that
did not run, `failed: <stage> ...` with the tail of its output for one that broke (exit status 1),
then `== summary ==` and one line per figure, `name=value unit` (img/s, %, s, x).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from _common import ROOT, StepTimer, product_config, scratch_dir
from throughput import in_memory_batches
from torch.utils.data import DataLoader

from finetune.cli.train import build
from finetune.data.shapes import write_image_folder
from finetune.hardware import compile_problem
from finetune.run.resume import METRICS

SUMMARY_HEADER = "== summary =="


@dataclass(frozen=True)
class Sizes:
    """How big each stage is: the real check, or --tiny (the code paths only, in seconds on a CPU)."""

    model: str = "resnet50"
    image: int = 224
    resize: int = 256
    batch: int = 128
    warmup: int = 8
    timed: int = 24
    jpeg_size: int = 256
    jpegs_per_class: int = 256  # 4 classes: 8 batches an epoch, the loader's workers persist
    quickstart: tuple[str, ...] = ()
    frozen: tuple[str, ...] = ("--train-per-class", "100", "--test-per-class", "50", "--epochs", "5")


TINY = Sizes(
    model="resnet18", image=32, resize=32, batch=4, warmup=1, timed=2, jpeg_size=32, jpegs_per_class=3,
    quickstart=("trainer.max_epochs=1", "data.train_size=16", "data.val_size=8", "data.test_size=8",
                "data.batch_size=8", "data.image_size=32", "data.resize_size=32"),
    frozen=("--model", "resnet18", "--weights", "null", "--image-size", "32", "--epochs", "1"),
)


class Budget:
    """The whole check's time: a stage starts only if enough is left, and runs at most to its cap."""

    def __init__(self, seconds: float) -> None:
        self.start = time.monotonic()
        self.deadline = self.start + seconds

    def used(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def limit(self, cap: float, need: float) -> float | None:
        """Seconds the next stage may take, or None when fewer than `need` are left."""
        left = self.left()
        return None if left < need else min(cap, left)


class Report:
    """Figures, skipped and failed stages, printed as they come and again as the summary."""

    def __init__(self) -> None:
        self.figures: dict[str, tuple[float, str]] = {}
        self.failed: list[str] = []

    def add(self, name: str, value: float, unit: str) -> None:
        self.figures[name] = (value, unit)
        print(f"  {name}: {value:.4g} {unit}", flush=True)

    def skip(self, stage: str, why: str) -> None:
        print(f"skipped: {stage} ({why})", flush=True)

    def fail(self, stage: str, why: str) -> None:
        self.failed.append(stage)
        print(f"failed: {stage} {why}", flush=True)

    def print_summary(self) -> None:
        print(SUMMARY_HEADER)
        for name, (value, unit) in self.figures.items():
            print(f"{name}={value:.2f} {unit}" if unit != "img/s" else f"{name}={value:.1f} {unit}")
        if self.failed:
            print("failed stages: " + ", ".join(self.failed))


class Deadline(L.Callback):
    """Stops fit at the end of the first batch past `deadline` (time.monotonic), so a slow stage
    cannot eat the budget of those after it."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if time.monotonic() > self.deadline:
            trainer.should_stop = True


def variants(device: str) -> list[tuple[str, list[str]]]:
    """(figure suffix, overrides) for each precision / memory format / compile setting."""
    half = "bf16" if device != "cuda" or torch.cuda.is_bf16_supported() else "fp16"
    mixed = f"trainer.precision={'bf16' if half == 'bf16' else '16'}-mixed"
    nchw, nhwc = "model.channels_last=false", "model.channels_last=true"
    return [
        ("fp32", ["trainer.precision=32-true", nchw, "model.compile=false"]),
        (half, [mixed, nchw, "model.compile=false"]),
        (f"{half}_cl", [mixed, nhwc, "model.compile=false"]),
        (f"{half}_cl_compile", [mixed, nhwc, "model.compile=true"]),
    ]


def train_rate(overrides: list[str], sizes: Sizes, synthetic: bool, seconds: float, work: Path) -> float | None:
    """Training images/s over the timed steps (None: the time ran out before the first timed step).
    synthetic: in-memory batches; else the data module's own loader over the folder in `overrides`."""
    steps = sizes.warmup + sizes.timed
    datamodule, model, trainer = build(fit_config(overrides, sizes, steps, work))
    for key in ("channels_last", "compile"):  # a setting dropped on the way would mislabel the figure
        asked = f"model.{key}=true" in overrides
        if bool(model.hparams.get(key)) != asked:
            raise RuntimeError(f"model.{key}={str(asked).lower()} asked, the model has {model.hparams.get(key)}")
    timer = StepTimer(sizes.warmup)
    trainer.callbacks.extend([timer, Deadline(time.monotonic() + seconds)])
    if synthetic:
        trainer.fit(model, train_dataloaders=synthetic_batches(steps, sizes, datamodule.num_classes))
    else:
        trainer.fit(model, datamodule=datamodule)
    del datamodule, model, trainer
    gc.collect()  # the loader's persistent workers and the GPU memory go before the next run
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return timer.rate if timer.start is not None and timer.end is not None else None


def fit_config(overrides: list[str], sizes: Sizes, steps: int, work: Path):
    """A bare training run of `steps` steps: no validation, checkpoints, callbacks or loggers."""
    return product_config([
        "data=folder", f"model={sizes.model}", "model.weights=null", f"data.image_size={sizes.image}",
        f"data.resize_size={sizes.resize}", f"data.batch_size={sizes.batch}", "trainer.min_epochs=0",
        "trainer.max_epochs=1000", f"+trainer.max_steps={steps}", "+trainer.limit_val_batches=0",
        "+trainer.enable_checkpointing=false", "+trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false", "callbacks=none", "logger=[]", *overrides,
    ], work)


def ema_devices(overrides: list[str], sizes: Sizes, work: Path) -> tuple[set[str], str]:
    """(the devices of the EMA average's tensors, the module's device) at the first training step.
    Lightning copies the module for the average before the strategy moves it to the GPU; an average
    left on the CPU would copy the weights to the host at every step."""
    from finetune.callbacks.ema import EMA

    datamodule, model, trainer = build(fit_config(overrides, sizes, 1, work))
    ema, seen = EMA(decay=0.9), {}

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            average = ema._average_model
            seen["average"] = {str(t.device) for t in [*average.parameters(), *average.buffers()]}
            seen["module"] = str(pl_module.device)

    trainer.callbacks.extend([ema, Record()])
    trainer.fit(model, train_dataloaders=synthetic_batches(1, sizes, datamodule.num_classes))
    return seen["average"], seen["module"]


def synthetic_batches(steps: int, sizes: Sizes, classes: int) -> DataLoader:
    """`steps` batches cycling over 4 random ones (pinned on CUDA, as the product's loader pins)."""
    distinct = in_memory_batches(min(steps, 4), sizes.batch, classes)
    if sizes.image != 224:
        distinct = [(torch.nn.functional.interpolate(x, size=sizes.image), y) for x, y in distinct]
    if torch.cuda.is_available():
        distinct = [(x.pin_memory(), y.pin_memory()) for x, y in distinct]
    return DataLoader([distinct[i % len(distinct)] for i in range(steps)], batch_size=None)


def run_command(cmd: list[str], seconds: float) -> tuple[int | None, str, float]:
    """(exit status or None when cut at `seconds`, output, wall seconds). The command runs in its own
    process group so that a cut also ends the processes it started (DDP ranks, loader workers)."""
    start = time.monotonic()
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as proc:
        try:
            output, _ = proc.communicate(timeout=seconds)
            rc: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            rc = None
        except BaseException:  # Ctrl-C: its own session does not get the terminal's SIGINT
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    return rc, output, time.monotonic() - start


def quickstart(trainer: str, sizes: Sizes, seconds: float, run_dir: Path) -> tuple[float, float]:
    """(test accuracy in %, wall seconds) of `python train.py experiment=quickstart trainer=...`."""
    cmd = [sys.executable, str(ROOT / "train.py"), "experiment=quickstart", f"trainer={trainer}",
           f"hydra.run.dir={run_dir}", "resume=never", *sizes.quickstart]
    rc, output, wall = run_command(cmd, seconds)
    check_exit(rc, output, seconds)
    metrics = json.loads((run_dir / METRICS).read_text())
    return 100 * metrics["test/acc"], wall


def frozen_cache(trainer: str, sizes: Sizes, seconds: float, data_root: Path | None) -> dict[str, float]:
    """benchmarks/frozen_cache.py's last line (speedup=.. acc_cached=.. ...) as a dict."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "frozen_cache.py"), "--trainer", trainer, *sizes.frozen,
           *(["--data-root", str(data_root)] if data_root else [])]
    rc, output, _ = run_command(cmd, seconds)
    check_exit(rc, output, seconds)
    last = output.strip().splitlines()[-1]
    return {key: float(value) for key, value in (pair.split("=") for pair in last.split())}


def check_exit(rc: int | None, output: str, seconds: float) -> None:
    tail = "\n".join(output.strip().splitlines()[-15:])
    if rc is None:
        raise TimeoutError(f"cut at its {seconds:.0f} s limit; last output:\n{tail}")
    if rc != 0:
        raise RuntimeError(f"exit status {rc}; last output:\n{tail}")


def stage(report: Report, budget: Budget, name: str, cap: float, need: float, work: Callable[[float], None]) -> None:
    """Run `work(seconds)` if the budget allows; a failure is reported and the next stage runs."""
    seconds = budget.limit(cap, need)
    if seconds is None:
        report.skip(name, f"time budget: {max(budget.left(), 0):.0f} s left, the stage needs ~{need:.0f} s")
        return
    print(f"-- {name} (at most {seconds:.0f} s; {budget.used():.0f} s into the check)", flush=True)
    try:
        work(seconds)
    except Exception as error:  # noqa: BLE001 - one broken stage must not hide the others' figures
        traceback.print_exc()
        report.fail(name, f"({type(error).__name__}: {error})")


def throughput_stages(report: Report, budget: Budget, args: argparse.Namespace, sizes: Sizes, root: Path,
                      work: Path, compile_runs: bool) -> None:
    """The synthetic and folder runs without compile, or (compile_runs) the compile ones."""
    for source in ("synthetic", "folder"):
        for suffix, overrides in variants(args.device):
            if suffix.endswith("_compile") != compile_runs:
                continue
            name = f"{source}_{suffix}"
            if compile_runs and (why := compile_skip_reason(args)):
                report.skip(name, why)
                continue
            trainer = "gpu" if args.device == "cuda" else "cpu"

            def measure(seconds: float, name=name, overrides=overrides, source=source, trainer=trainer) -> None:
                rate = train_rate([f"trainer={trainer}", f"data.root={root}", *overrides], sizes,
                                  source == "synthetic", seconds, work / name)
                if rate is None:
                    report.skip(name, f"its {seconds:.0f} s ran out before the first timed step")
                else:
                    report.add(name, rate, "img/s")

            cap, need = (args.compile_cap, 45) if compile_runs else (args.run_cap, 15)
            stage(report, budget, name, cap, need if not args.tiny else 1, measure)


def compile_skip_reason(args: argparse.Namespace) -> str | None:
    if args.device == "cpu" and args.tiny and not args.compile_on_cpu:
        return "torch.compile on CPU in --tiny mode: compiling would be the whole run (--compile-on-cpu runs it)"
    problem = compile_problem(args.device)
    return f"model.compile would be ignored: {problem}" if problem else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: exercise every stage in seconds")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check")
    parser.add_argument("--run-cap", type=float, default=45.0, help="seconds at most per throughput run")
    parser.add_argument("--compile-cap", type=float, default=150.0, help="seconds at most per compiled run")
    parser.add_argument("--stage-cap", type=float, default=150.0,
                        help="seconds at most for the quickstart, DDP and frozen-cache stages each")
    parser.add_argument("--compile-on-cpu", action="store_true", help="with --device cpu --tiny: compile too")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: skipped: no CUDA device visible (run it on a GPU machine; "
              "--device cpu --tiny exercises the code paths)")
        return 0
    budget, report, sizes = Budget(args.budget), Report(), TINY if args.tiny else Sizes()
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    device = f"{gpus} x {torch.cuda.get_device_name(0)}" if gpus else f"CPU ({os.cpu_count()} cores)"
    print(f"gpu_check: {device}, torch {torch.__version__}; {sizes.model} at {sizes.image} px, "
          f"batch {sizes.batch}, {sizes.timed} timed steps after {sizes.warmup}; budget {args.budget:.0f} s",
          flush=True)
    work = scratch_dir("gpu-check-")
    root = write_image_folder(work / "jpegs", {"train": sizes.jpegs_per_class, "test": 2},
                              size=sizes.jpeg_size, suffix=".jpg")
    throughput_stages(report, budget, args, sizes, root, work, compile_runs=False)

    def run_quickstart(seconds: float, name: str, trainer: str) -> None:
        acc, wall = quickstart(trainer, sizes, seconds, work / name)
        report.add(f"{name}_test_acc", acc, "%")
        report.add(f"{name}_wall", wall, "s")

    def check_ema(seconds: float) -> None:
        average, module = ema_devices([f"trainer={'gpu' if gpus else 'cpu'}", f"data.root={root}"], sizes, work / "ema")
        print(f"  ema_average_device: {', '.join(sorted(average))} (module: {module})", flush=True)
        if average != {module}:
            raise RuntimeError(f"the EMA average is on {sorted(average)}, the module on {module}")

    stage(report, budget, "ema", args.stage_cap, 10 if not args.tiny else 1, check_ema)
    stage(report, budget, "quickstart", args.stage_cap, 30, lambda s: run_quickstart(s, "quickstart", "gpu" if gpus else "cpu"))
    if gpus == 1:
        report.skip("ddp", "one GPU visible; DDP needs two or more")
    else:
        stage(report, budget, "ddp", args.stage_cap, 45, lambda s: run_quickstart(s, "ddp", "ddp" if gpus else "ddp_cpu"))

    def run_frozen(seconds: float) -> None:
        result = frozen_cache("gpu" if gpus else "cpu", sizes, seconds, root if args.tiny else None)
        report.add("frozen_cache_speedup", result["speedup"], "x")
        report.add("frozen_cache_acc_cached", 100 * result["acc_cached"], "%")
        report.add("frozen_cache_acc_uncached", 100 * result["acc_uncached"], "%")

    stage(report, budget, "frozen_cache", args.stage_cap, 45, run_frozen)
    throughput_stages(report, budget, args, sizes, root, work, compile_runs=True)
    report.print_summary()
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
