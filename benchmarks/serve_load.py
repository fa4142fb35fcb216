"""Load on `python -m finetune.serve`: dynamic batching against one request at a time, on loopback.

Two servers of the same checkpoint run side by side: `batched` (max_batch_size=--max-batch-size,
batch_timeout=--batch-timeout) and `single` (max_batch_size=1). --clients concurrent clients (one
keep-alive connection each) post photos for --seconds per arm, split into --rounds rounds that
alternate the arms, so a busy neighbour on a shared machine slows both arms alike; each round
gives a ratio, and the spread of those ratios is printed. A share (--bad-share) of the requests is
deliberately bad (not an image, a truncated JPEG) and must get a 4xx; anything else (a good photo
without a 200, a bad one without a 4xx, a 5xx, a dropped connection) is an error. The servers'
memory (RSS of each server's process tree, as PSS: HTTP process and model worker) is read after a warm-up
and at the end. Throughput is good answers (200) per second that arrived within each round's
seconds. Clients are capped at 64 and seconds at 600, and the run stops by itself.

The model only needs the right size: ResNet-18 with random weights at 224 (--model), as a
checkpoint with 10 classes. The photos are 640x480 JPEGs (noisy colour gradients).

    python benchmarks/serve_load.py [--clients 16] [--seconds 60] [--rounds 6]

Last line: `batched_rps= single_rps= ratio= p99_ms= errors= rss_growth=` (p99 of the batched
arm; errors over both arms; rss_growth the larger of the two servers', end over start - 1).
"""

from __future__ import annotations

import argparse
import http.client
import io
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import psutil
from _common import ROOT, scratch_dir
from PIL import Image

from finetune.models.classifier import ImageClassifier

sys.path.insert(0, str(ROOT / "tests"))
from serve_helpers import HOST, served

MAX_CLIENTS, MAX_SECONDS = 64, 600


def make_checkpoint(name: str, path: Path) -> Path:
    """A checkpoint the server loads like a trained one: `name` with random weights, 10 classes."""
    model = ImageClassifier(name=name, weights=None, num_classes=10, class_names=[f"class_{i}" for i in range(10)])
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    return path


def photos(n: int, size: tuple[int, int] = (640, 480)) -> list[bytes]:
    out = []
    for seed in range(n):
        rng = np.random.default_rng(seed)
        w, h = size
        yy, xx = np.mgrid[0:h, 0:w]
        pixels = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255], -1) * rng.uniform(0.5, 1, 3)
        pixels = (pixels + rng.normal(0, 30, pixels.shape)).clip(0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)  # seconds, good requests answered 200
    requests: int = 0  # all answered (or failed) requests, bad ones included
    in_time: int = 0  # good requests answered 200 before their round's deadline: the throughput
    errors: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def client(port: int, deadline: float, bodies: list[tuple[bytes, bool]], offset: int, tally: Tally) -> None:
    """Post bodies[offset::...] round robin until `deadline` on one keep-alive connection."""
    connection, i = None, offset
    while time.monotonic() < deadline:
        body, good = bodies[i % len(bodies)]
        i += 1
        start = time.perf_counter()
        try:
            connection = connection or http.client.HTTPConnection(HOST, port, timeout=60)
            connection.request("POST", "/predict", body, {"Content-Type": "image/jpeg"})
            response = connection.getresponse()
            response.read()
            ok = response.status == 200 if good else 400 <= response.status < 500
        except (OSError, http.client.HTTPException):
            ok, connection = False, None
        elapsed = time.perf_counter() - start
        with tally.lock:
            tally.requests += 1
            tally.errors += not ok
            if ok and good:
                tally.latencies.append(elapsed)
                tally.in_time += time.monotonic() <= deadline


def load(port: int, clients: int, seconds: float, bodies: list[tuple[bytes, bool]], tally: Tally) -> float:
    """`clients` threads for `seconds`; returns the good answers per second within those seconds
    (the requests still in flight at the deadline are waited for, and count for errors only)."""
    before = tally.in_time
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=client, args=(port, deadline, bodies, k * 7, tally)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return (tally.in_time - before) / seconds


def rss(pid: int) -> int:
    """Resident memory of the process `pid` and all its descendants, in bytes: their PSS (each
    shared page split between its sharers), since LitServe's HTTP process is forked from the
    main one and plain RSS would count the pages they share twice."""
    process = psutil.Process(pid)
    return sum(p.memory_full_info().pss for p in [process, *process.children(recursive=True)])


def workload(n_photos: int, bad_share: float) -> list[tuple[bytes, bool]]:
    good = photos(n_photos)
    bodies = [(b, True) for b in good]
    n_bad = round(len(bodies) * bad_share / (1 - bad_share)) if bad_share > 0 else 0
    bad = [b"this is not an image", good[0][: len(good[0]) // 3]]
    bodies += [(bad[k % 2], False) for k in range(n_bad)]
    rng = np.random.default_rng(0)
    return [bodies[k] for k in rng.permutation(len(bodies))]


def run(args: argparse.Namespace) -> None:
    work = scratch_dir("serve-load-")
    ckpt = make_checkpoint(args.model, work / "model.ckpt")
    bodies = workload(args.photos, args.bad_share)
    batched_arm = [f"max_batch_size={args.max_batch_size}", f"batch_timeout={args.batch_timeout}"]
    arms = {"batched": batched_arm, "single": ["max_batch_size=1", "batch_timeout=0"]}
    tallies = {name: Tally() for name in arms}
    rounds = {name: [] for name in arms}
    with served(ckpt, work / "batched", *arms["batched"]) as (b_port, b_proc), \
         served(ckpt, work / "single", *arms["single"]) as (s_port, s_proc):
        ports, procs = {"batched": b_port, "single": s_port}, {"batched": b_proc, "single": s_proc}
        for name in arms:  # warm-up: first batches allocate; not counted
            load(ports[name], args.clients, args.warmup, bodies, Tally())
        rss_start = {name: rss(procs[name].pid) for name in arms}
        per_round = args.seconds / args.rounds
        for r in range(args.rounds):
            for name in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
                rounds[name].append(load(ports[name], args.clients, per_round, bodies, tallies[name]))
        rss_end = {name: rss(procs[name].pid) for name in arms}
    report(args, tallies, rounds, rss_start, rss_end)


def report(args: argparse.Namespace, tallies: dict[str, Tally], rounds: dict[str, list[float]],
           rss_start: dict[str, int], rss_end: dict[str, int]) -> None:
    print(f"{args.model} at 224, {args.clients} clients, {args.seconds:g} s per arm in {args.rounds} rounds, "
          f"{args.bad_share:.0%} bad requests; batched: max_batch_size={args.max_batch_size}, "
          f"batch_timeout={args.batch_timeout:g}s")
    print(f"{'arm':8} {'good/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'requests':>9} {'RSS start':>10} {'RSS end':>9}")
    rps, p99 = {}, {}
    for name, t in tallies.items():
        rps[name] = statistics.mean(rounds[name])
        q = np.percentile(np.array(t.latencies) * 1000, [50, 99]) if t.latencies else [float("nan")] * 2
        p99[name] = q[1]
        print(f"{name:8} {rps[name]:7.1f} {q[0]:8.0f} {q[1]:8.0f} {t.errors:7d} {t.requests:9d} "
              f"{rss_start[name] / 2**20:8.0f}MB {rss_end[name] / 2**20:7.0f}MB")
    ratios = [b / s for b, s in zip(rounds["batched"], rounds["single"])]
    print(f"ratio per round: {' '.join(f'{r:.2f}' for r in ratios)} (min {min(ratios):.2f}, max {max(ratios):.2f})")
    growth = max(rss_end[n] / rss_start[n] - 1 for n in tallies)
    errors = sum(t.errors for t in tallies.values())
    print(f"batched_rps={rps['batched']:.1f} single_rps={rps['single']:.1f} "
          f"ratio={rps['batched'] / rps['single']:.2f} p99_ms={p99['batched']:.0f} errors={errors} "
          f"rss_growth={growth:.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60, help="per arm, over all rounds")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=float, default=5, help="seconds per arm before RSS start")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout", type=float, default=0.01)
    parser.add_argument("--bad-share", type=float, default=0.05)
    parser.add_argument("--photos", type=int, default=19)
    args = parser.parse_args()
    if not 1 <= args.clients <= MAX_CLIENTS or not 0 < args.seconds <= MAX_SECONDS or args.rounds < 1:
        parser.error(f"--clients must be 1..{MAX_CLIENTS}, --seconds in (0, {MAX_SECONDS}], --rounds >= 1")
    if not 0 <= args.bad_share < 1:
        parser.error("--bad-share must be in [0, 1)")
    run(args)


if __name__ == "__main__":
    main()
