"""The product's Trainer.fit against a plain PyTorch loop doing the same work.

Same model (ResNet-18 as ImageClassifier, the resolved precision and memory format), the same
in-memory batches, the same optimizer and number of steps; the Trainer keeps the product's default
callbacks and TensorBoard logger. After one untimed warm-up run (oneDNN builds its kernels once
per process), the steady-state time of the same step window is compared; the two run alternately,
twice each, and the faster of each counts (other processes share the CPU).

    python benchmarks/overhead.py [--steps 12] [--size 160]      last line: overhead=<ratio>
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from _common import StepTimer, product_config, scratch_dir
from torch.utils.data import DataLoader

from finetune.train import build

WARMUP = 3


def batches(n: int, batch: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 4, (batch,), generator=g))
            for _ in range(n)]


def with_trainer(data, steps: int) -> float:
    out = scratch_dir("overhead-")
    cfg = product_config(["model.weights=null", f"+trainer.max_steps={steps}", "+trainer.limit_val_batches=0",
                          "test=false"], out)
    _, model, trainer = build(cfg)
    timer = StepTimer(WARMUP)
    trainer.callbacks.append(timer)
    trainer.fit(model, train_dataloaders=DataLoader(data, batch_size=None))
    return timer.end - timer.start


def plain_loop(data, steps: int) -> float:
    out = scratch_dir("overhead-")
    cfg = product_config(["model.weights=null"], out)
    _, model, _ = build(cfg)  # the same model and resolved precision
    optimizer = model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    bf16 = cfg.trainer.precision.startswith("bf16")
    model.train()
    for step, (images, targets) in enumerate(data[:steps]):
        if step == WARMUP:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    data = batches(args.steps, args.batch, args.size)
    plain_loop(data, args.steps)  # oneDNN builds its kernels for each shape once per process
    lightning, plain = [], []
    for _ in range(2):
        plain.append(plain_loop(data, args.steps))
        lightning.append(with_trainer(data, args.steps))
    timed = (args.steps - WARMUP) * args.batch
    print(f"plain loop: {timed / min(plain):.1f} img/s   Trainer.fit: {timed / min(lightning):.1f} img/s "
          f"({args.steps - WARMUP} timed steps of {args.batch} at {args.size}px, runs: plain {plain}, "
          f"trainer {lightning})")
    print(f"overhead={min(lightning) / min(plain):.3f}")


if __name__ == "__main__":
    main()
