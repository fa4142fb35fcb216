"""What a run costs before its first step as the folder grows: time and peak memory per stage.

    python benchmarks/scale.py                    # N = 10k and 100k images (about 20 min here)
    python benchmarks/scale.py --sizes 10000 50000 --stages listing checks_cold checks_warm startup
    python benchmarks/scale.py --sizes 10000 100000 1000000   # ImageNet-sized: ~6 GB in --work
    python benchmarks/scale.py --sizes 100000 1000000 --repeat 3 --stages baseline listing checks_cold checks_warm startup

For each N, folders of N small real JPEGs (48 px, ~1 kB, in max(10, N/1000) class folders, plus a
test split of N/20) are written under --work (default: a temp dir, deleted after), then each stage
runs alone in its own child process, so its peak RSS (`wait4`'s ru_maxrss: the process and the
workers it reaped) is its own:

    baseline      importing torch and the package (what every stage's RSS includes)
    listing       walking train/ and test/ (`list_images`)
    checks_cold   the bad-file check with no memo (every file decoded at 1/8 scale)
    checks_warm   the same with the memo of the cold run (every file stat'ed only)
    startup       data=folder with a warm memo: listing, checks, val split, loaders, first batch
    add_one       startup after one file was added (one file checked, the memo appended to)
    cache         data.cache=true: building the resized copy (images 48 -> 32 px)
    streaming     python -m finetune.cli.optimize (LitData conversion of every split)
    frozen        finetune=frozen's feature extraction (mobilenet_v2, no weights, 32 px, the run's
                  `build` and `FeatureCache`, no loader workers) for the train split, cold: its
                  time and peak RSS over its start (`extract MiB`: only a batch is held, the rest
                  streams to `feature_cache/`), where the features live (`disk`: memory-mapped
                  from the entry's .npy; `memory`: a tensor in RAM), their size on disk, and the
                  warm read of the same entry

Per stage: seconds, the process's peak RSS (MiB, imports included), what the stage itself added
(its peak over its RSS at the start, measured after resetting the peak with /proc/self/clear_refs;
for the CLI stage `streaming` the peak over the import `baseline`; for `frozen` the extraction's
peak over its start), and the cost per image; growth is the
per-image time at this N over the one at the previous N (1.0: linear; stages under 0.5 s are left
out of the worst). The last line is the warm start-up (`startup`) per 100k images at the largest N:

    n_max= startup_s_per_100k= rss_mb_per_100k= worst_growth=

The machine is shared: figures drift by +-20% from run to run; compare ratios, not seconds.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["baseline", "listing", "checks_cold", "checks_warm", "startup", "add_one", "cache", "streaming", "frozen"]
REPEATED = ["listing", "checks_warm", "startup"]  # they leave nothing behind that changes the next run
TINY = ["model=mobilenet_v2", "model.weights=null", "data.image_size=32", "data.resize_size=32",
        "data.batch_size=256", "trainer.precision=32-true"]


def jpeg_variants(count: int = 64, side: int = 48) -> list[bytes]:
    from PIL import Image

    rng = random.Random(0)
    out = []
    for _ in range(count):
        image = Image.effect_noise((side, side), rng.uniform(20, 80)).convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
        out.append(buffer.getvalue())
    return out


def generate(root: Path, n: int) -> Path:
    """`n` train and n/20 test JPEGs in max(10, n/1000) class folders under `root`."""
    variants = jpeg_variants()
    classes = max(10, n // 1000)
    for split, count in (("train", n), ("test", max(classes, n // 20))):
        for c in range(classes):
            (root / split / f"c{c:04d}").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            path = root / split / f"c{i % classes:04d}" / f"{i:07d}.jpg"
            path.write_bytes(variants[i % len(variants)])
    return root


def run_stage(stage: str, root: Path, work: Path) -> dict:
    """`stage` in a child process: wall seconds, peak RSS of it and its reaped workers."""
    out = work / f"{stage}.json"
    cmd = [sys.executable, __file__, "--child", stage, "--root", str(root), "--work", str(work), "--out", str(out)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    with open(work / f"{stage}.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"stage {stage} failed; see {work / f'{stage}.log'}")
    result = json.loads(out.read_text()) if out.exists() else {}
    result.update(wall_s=seconds, rss_mb=usage.ru_maxrss / 1024)
    return result


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _reset_peak() -> float:
    """Reset this process's peak RSS (Linux: clear_refs 5), so importing torch, which peaks higher
    than a small stage, is not what the stage reports; returns the RSS now."""
    import finetune.data.folder  # noqa: F401  imported before the reset

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def _peak_mb() -> float:
    """The stage's peak RSS: this process's since the reset, or a reaped worker's or CLI's if higher."""
    import resource

    return max(_status_mb("VmHWM"), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


# --- what each child runs ----------------------------------------------------------------------
def _datamodule(root: Path, work: Path, **kwargs):
    from finetune.data.folder import FolderDataModule

    return FolderDataModule(root=str(root), cache_dir=str(work / "cache"), image_size=32, resize_size=32,
                            batch_size=256, num_workers=0, max_bad_fraction=1.0, **kwargs)


def child(stage: str, root: Path, work: Path) -> dict:
    import logging

    import finetune.data.folder  # noqa: F401  imports are not part of any stage's time
    from finetune.data.file_walk import list_images

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    t0 = time.perf_counter()
    if stage == "baseline":
        return {"stage_s": 0.0}
    if stage == "listing":
        return {"images": len(list_images(root)), "stage_s": time.perf_counter() - t0}
    if stage in ("checks_cold", "checks_warm"):
        if stage == "checks_cold":
            shutil.rmtree(work / "cache", ignore_errors=True)
        dm = _datamodule(root, work)
        dm.listing()
        t1 = time.perf_counter()
        bad = dm.unreadable()
        return {"bad": len(bad), "listing_s": t1 - t0, "stage_s": time.perf_counter() - t1}
    if stage in ("startup", "add_one"):
        if stage == "add_one":
            shutil.copy(next((root / "train").glob("*/*.jpg")), root / "train" / "c0000" / "added.jpg")
        dm = _datamodule(root, work)
        dm.setup("fit")
        next(iter(dm.train_dataloader()))
        return {"images": len(dm.datasets["train"]) + len(dm.datasets["val"]), "stage_s": time.perf_counter() - t0}
    if stage == "cache":
        dm = _datamodule(root, work, cache=True)
        dm.num_workers = 2  # the copy is built by loader workers, as a run with data.num_workers=2 would
        dm.unreadable()
        t1 = time.perf_counter()
        copy = dm.image_root()
        return {"copy": str(copy), "stage_s": time.perf_counter() - t1}
    if stage == "streaming":
        return _cli(["-m", "finetune.cli.optimize", "data=folder", f"data.root={root}",
                     f"output={work / 'litdata'}", *TINY], work, t0)
    if stage == "frozen":
        return _frozen(root, work)
    raise SystemExit(f"unknown stage {stage}")


def _frozen(root: Path, work: Path) -> dict:
    """Cold feature extraction of the train split as `finetune=frozen` does it, then a warm read."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from finetune.cli.train import build
    from finetune.finetuning import FeatureCache
    from finetune.finetuning.feature_cache import MappedFeatures

    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    overrides = ["data=folder", f"data.root={root}", "finetune=frozen", *TINY, "data.augment=false",
                 "data.num_workers=0", "data.max_bad_fraction=1.0", "callbacks=none", "logger=csv"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "src" / "finetune" / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = cfg.paths.output_dir = cfg.paths.log_dir = str(run)
        cfg.hydra.job.num = 0
        cfg.paths.data_dir = str(run / "data")
    HydraConfig().set_config(cfg)
    t0 = time.perf_counter()
    dm, model, trainer = build(cfg)
    trainer.strategy.connect(model)
    dm.setup("fit")
    setup_s = time.perf_counter() - t0
    cache_dir = run / "data" / "feature_cache"
    start_mb = _reset_peak()
    t1 = time.perf_counter()
    features = FeatureCache(model.backbone, trainer, str(cache_dir), name=model.hparams.get("name")).features(dm, "train")
    extract_s = time.perf_counter() - t1
    extract_mb = _status_mb("VmHWM") - start_mb
    on_disk = isinstance(features, MappedFeatures)
    t2 = time.perf_counter()
    again = FeatureCache(model.backbone, trainer, str(cache_dir), name=model.hparams.get("name")).features(dm, "train")
    warm_s = time.perf_counter() - t2
    assert len(again) == len(features)
    return {"stage_s": extract_s, "setup_s": setup_s, "warm_read_s": warm_s, "extract_mb": extract_mb,
            "images": len(features), "features_on": "disk" if on_disk else "memory",
            "feature_mb": features.tensors[0].nbytes / 2**20,
            "feature_mb_on_disk": sum(p.stat().st_size for p in cache_dir.rglob("*") if p.is_file()) / 2**20}


def _cli(args: list[str], work: Path, t0: float) -> dict:
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    subprocess.run([sys.executable, *args, f"hydra.run.dir={run}", f"paths.data_dir={run / 'data'}"],
                   cwd=work, check=True, stdout=sys.stderr)
    return {"stage_s": time.perf_counter() - t0}


# --- the table ---------------------------------------------------------------------------------
def _net_mb(stage: str, r: dict, stages: dict) -> float:
    """What the stage added to memory: its peak over its start (in-process stages), or the CLI's
    peak over the import baseline (streaming: its own process imports torch again), or the
    extraction's peak over its start (frozen: building the model is not a cost per image)."""
    if "extract_mb" in r:
        return max(0.0, r["extract_mb"])
    if "peak_mb" in r and stage != "streaming":
        return max(0.0, r["peak_mb"] - r["start_mb"])
    return max(0.0, r["rss_mb"] - stages.get("baseline", {}).get("rss_mb", 0.0))


def table(results: dict[int, dict[str, dict]]) -> tuple[list[str], float]:
    lines = ["| stage | N | wall s | stage s | peak RSS MiB | ms/image | stage MiB | kB/image | growth |",
             "|---|---|---|---|---|---|---|---|---|"]
    worst, previous = 1.0, {}
    for n, stages in sorted(results.items()):
        for stage, r in stages.items():
            net = _net_mb(stage, r, stages)
            per_image = r["stage_s"] / n * 1000
            growth = per_image / previous[stage] if previous.get(stage) else None
            if growth is not None and r["stage_s"] > 0.5:  # sub-second stages are noise, not growth
                worst = max(worst, growth)
            previous[stage] = per_image
            extra = (f" (features on {r['features_on']}: {r['feature_mb']:.0f} MiB; {r['feature_mb_on_disk']:.0f} MiB "
                     f"in feature_cache/; warm read {r['warm_read_s']:.1f} s)" if "features_on" in r else "")
            runs = r.get("stage_s_runs", [])
            spread = f" ({runs[0]:.1f}-{runs[-1]:.1f})" if len(runs) > 1 else ""
            lines.append(f"| {stage}{extra} | {n} | {r['wall_s']:.1f} | {r['stage_s']:.1f}{spread} | {r['rss_mb']:.0f} | "
                         f"{per_image:.3f} | {net:.0f} | {net * 1024 / n:.2f} | "
                         f"{'-' if growth is None else f'{growth:.2f}'} |")
    return lines, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000],
                        help="numbers of train images; 1000000 needs ~6 GB of disk and about an hour")
    parser.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES)
    parser.add_argument("--repeat", type=int, default=1,
                        help=f"run each of {', '.join(REPEATED)} this many times; the median counts, the range is shown")
    parser.add_argument("--work", type=Path, default=None, help="where the folders go (default: a temp dir)")
    parser.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        start_mb = _reset_peak()
        result = child(args.child, args.root, args.work)
        result.update(start_mb=start_mb, peak_mb=_peak_mb())
        args.out.write_text(json.dumps(result))
        return
    base = Path(tempfile.mkdtemp(prefix="scale-", dir=args.work))
    results: dict[int, dict[str, dict]] = {}
    try:
        for n in args.sizes:
            work = base / str(n)
            start = time.perf_counter()
            root = generate(work / "data", n)
            print(f"N={n}: wrote the folders in {time.perf_counter() - start:.0f} s", flush=True)
            results[n] = {}
            for stage in args.stages:
                runs = sorted((run_stage(stage, root, work) for _ in range(args.repeat if stage in REPEATED else 1)),
                              key=lambda r: r["stage_s"])
                results[n][stage] = {**runs[len(runs) // 2], "stage_s_runs": [r["stage_s"] for r in runs]}
                print(f"N={n} {stage}: {json.dumps(results[n][stage])}", flush=True)
            shutil.rmtree(work, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    lines, worst = table(results)
    print("\n".join(lines))
    n_max = max(results)
    startup = results[n_max].get("startup")
    per_100k = 100_000 / n_max
    print(f"n_max={n_max} startup_s_per_100k={startup['stage_s'] * per_100k:.1f} "
          f"rss_mb_per_100k={_net_mb('startup', startup, results[n_max]) * per_100k:.0f} worst_growth={worst:.2f}"
          if startup else f"n_max={n_max} startup_s_per_100k=- rss_mb_per_100k=- worst_growth={worst:.2f}")


if __name__ == "__main__":
    main()
