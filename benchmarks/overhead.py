"""The product's Trainer.fit against a plain PyTorch loop doing the same work.

Same model (ResNet-18 as ImageClassifier, the resolved precision and memory format), the same
in-memory batches, the same optimizer and number of steps; the Trainer keeps the product's default
callbacks and TensorBoard logger.

Both arms are timed over the same span: from the start of step `warmup` to the start of step
`warmup + steps`, where a step starts once its batch is in hand (the Trainer's
`on_train_batch_start`, the top of the plain loop's body). So each timed step carries everything
done between two batches (optimizer step, logging, callbacks, progress bar, fetching the next
batch) in both arms. One untimed run of each arm first (oneDNN builds its kernels, TensorBoard is
imported once per process); then `--repeat` pairs run alternately (plain/Trainer, Trainer/plain,
...), each pair gives a ratio, and the median ratio is reported with its min-max spread across
pairs (other processes share the CPU; a pair sees the same conditions).

    python benchmarks/overhead.py [--steps 60] [--warmup 5] [--repeat 5] [--size 160]
    last line: overhead=<median Trainer/plain time> spread=<min>-<max>
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time

import lightning as L
import torch
import torch.nn.functional as F
from _common import product_config, scratch_dir
from torch.utils.data import DataLoader

from finetune.cli.train import build

Batch = tuple[torch.Tensor, torch.Tensor]


def batches(n: int, batch: int, size: int) -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 4, (batch,), generator=g))
            for _ in range(n)]


class StepStarts(L.Callback):
    """perf_counter at the start of every training step (its batch already fetched)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.times.append(time.perf_counter())


def span(starts: list[float], warmup: int, steps: int) -> float:
    """Seconds from the start of step `warmup` to the start of step `warmup + steps`."""
    if len(starts) <= warmup + steps:
        raise RuntimeError(f"only {len(starts)} step starts recorded, need {warmup + steps + 1}")
    return starts[warmup + steps] - starts[warmup]


def with_trainer(data: list[Batch], warmup: int, steps: int) -> float:
    """The product's Trainer.fit (default callbacks and logger) on `data`."""
    out = scratch_dir("overhead-")
    cfg = product_config(["model.weights=null", f"+trainer.max_steps={warmup + steps + 1}",
                          "+trainer.limit_val_batches=0", "test=false"], out)
    _, model, trainer = build(cfg)
    clock = StepStarts()
    trainer.callbacks.append(clock)
    trainer.fit(model, train_dataloaders=DataLoader(data, batch_size=None))
    shutil.rmtree(out, ignore_errors=True)  # its checkpoints: ~45 MB a run
    return span(clock.times, warmup, steps)


def plain_loop(data: list[Batch], warmup: int, steps: int) -> float:
    """The same model, optimizer and precision in a hand-written loop."""
    cfg = product_config(["model.weights=null"], scratch_dir("overhead-"))
    _, model, _ = build(cfg)  # the same model and resolved precision
    optimizer = model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    bf16 = str(cfg.trainer.precision).startswith("bf16")
    model.train()
    starts = []
    for images, targets in data[: warmup + steps + 1]:
        starts.append(time.perf_counter())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return span(starts, warmup, steps)


def spread(ratios: list[float]) -> str:
    return f"{min(ratios):.3f}-{max(ratios):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each run")
    parser.add_argument("--repeat", type=int, default=5, help="alternating pairs of runs")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    data = batches(args.warmup + args.steps + 1, args.batch, args.size)
    # Untimed: oneDNN kernels, first-use imports and allocator growth, once per process.
    plain_loop(data, 0, 1)
    with_trainer(data, 0, 1)

    plain, lightning = [], []
    for i in range(args.repeat):
        arms = [(plain, plain_loop), (lightning, with_trainer)]
        for times, arm in arms if i % 2 == 0 else arms[::-1]:
            times.append(arm(data, args.warmup, args.steps))
            print(f"  pair {i}: {arm.__name__} {args.steps * args.batch / times[-1]:.1f} img/s", flush=True)
    ratios = [t / p for t, p in zip(lightning, plain)]
    timed = args.steps * args.batch
    print(f"plain loop: {timed / statistics.median(plain):.1f} img/s   "
          f"Trainer.fit: {timed / statistics.median(lightning):.1f} img/s (medians; {args.steps} timed "
          f"steps of {args.batch} at {args.size}px after {args.warmup}, {args.repeat} alternating pairs)")
    print("per-pair Trainer/plain time: " + " ".join(f"{r:.3f}" for r in ratios))
    print(f"overhead={statistics.median(ratios):.3f} spread={spread(ratios)}")


if __name__ == "__main__":
    main()
