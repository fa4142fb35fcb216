"""What the TensorBoard views cost: the same fit and test with and without them, side by side.

    python benchmarks/inspect_overhead.py                 # shapes at 48 px, ResNet-18, 2 epochs
    python benchmarks/inspect_overhead.py --size 224 --repeats 5

Both arms use the product's own config and TensorBoard logger; only the three views
(callbacks.prediction_grid, confusion_matrix, top_losses) are switched off in the baseline. The
arms alternate (A B B A ...) and the fastest run of each arm is compared (load from other
processes only ever adds time). The ratio uses this process's CPU time, which other processes on
a shared machine disturb far less than wall time (run with OMP_NUM_THREADS=1 there); wall times
are printed too. Small images make the epoch cheap, so the ratio is a worst case for the views.
Last line:
    fit_ratio=<with/without> test_ratio=<with/without>
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
from _common import product_config

from finetune.cli.train import build

VIEWS_OFF = ["callbacks.prediction_grid=null", "callbacks.confusion_matrix=null", "callbacks.top_losses=null"]


def timed_run(overrides: list[str], out_dir: Path) -> tuple[float, float, float, float]:
    """(fit CPU, test CPU, fit wall, test wall) seconds for one run with `overrides`."""
    cfg = product_config(overrides, out_dir)
    L.seed_everything(cfg.seed, workers=True)
    datamodule, model, trainer = build(cfg)
    cpu, wall = time.process_time(), time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    fit_cpu, fit_wall = time.process_time() - cpu, time.perf_counter() - wall
    cpu, wall = time.process_time(), time.perf_counter()
    trainer.test(model, datamodule=datamodule, verbose=False)
    return fit_cpu, time.process_time() - cpu, fit_wall, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=48, help="image size fed to the network")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=512)
    parser.add_argument("--eval-size", type=int, default=256, help="val and test images each")
    parser.add_argument("--repeats", type=int, default=3, help="runs per arm")
    args = parser.parse_args()
    common = [
        "data=shapes", f"data.train_size={args.train_size}", f"data.val_size={args.eval_size}",
        f"data.test_size={args.eval_size}", f"data.image_size={args.size}", f"data.resize_size={args.size}",
        f"data.native_size={max(64, args.size)}", "model.weights=null", f"trainer.max_epochs={args.epochs}",
        "callbacks.rich_progress_bar=null", "+trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
    ]
    arms = {"with views": common, "without views": common + VIEWS_OFF}
    times: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in arms}
    with tempfile.TemporaryDirectory() as tmp:
        timed_run(common + ["trainer.max_epochs=1"], Path(tmp) / "warmup")
        order = [name for i in range(args.repeats) for name in (list(arms) if i % 2 == 0 else list(arms)[::-1])]
        for i, name in enumerate(order):
            run = timed_run(arms[name], Path(tmp) / f"run{i}")
            times[name].append(run)
            print(f"{name:>14}: fit {run[0]:6.2f}s CPU ({run[2]:6.2f}s wall)  "
                  f"test {run[1]:5.2f}s CPU ({run[3]:5.2f}s wall)")
    best = {name: [min(t[k] for t in runs) for k in range(4)] for name, runs in times.items()}
    on, off = best["with views"], best["without views"]
    print(f"fastest fit: {on[0]:.2f}s CPU with views, {off[0]:.2f}s without (wall {on[2]:.2f}s / {off[2]:.2f}s; "
          f"{args.epochs} epochs of {args.train_size} + {args.eval_size} images at {args.size}px)")
    print(f"fastest test: {on[1]:.2f}s CPU with views, {off[1]:.2f}s without (wall {on[3]:.2f}s / {off[3]:.2f}s)")
    print(f"fit_ratio={on[0] / off[0]:.3f} test_ratio={on[1] / off[1]:.3f}")


if __name__ == "__main__":
    main()
