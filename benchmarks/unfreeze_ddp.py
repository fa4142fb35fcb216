"""The frozen stage of progressive unfreezing under DDP costs what a frozen run costs.

    python benchmarks/unfreeze_ddp.py                 # 3 alternating pairs of 2-process DDP runs on the CPU

`finetune=gradual` keeps every parameter in its optimizer group from the start and rebuilds the DDP
wrapper at the unfreeze (README "Scaling out"); until then DDP's reducer holds the head alone,
as for `finetune=frozen`. Arms, each `trainer=ddp_cpu` (two gloo processes) on generated 64-px
shapes with a randomly initialised ResNet-18, timed from the start of training step W to the end
of the last step of the frozen epochs (`benchmarks/step_timer.py`'s callback, loaded by the runs):

- frozen: `finetune=frozen finetune.callback.feature_cache=false` (the head trains on images);
- gradual: `finetune=gradual` with the unfreeze after the timed epochs.

Last line: `ratio= spread=` (gradual's frozen-stage step time over frozen's; median and range of
the pairs; 1.0 = the redesign costs nothing while frozen).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from _common import ROOT, scratch_dir

from finetune.data.shapes import write_image_folder

ARMS = {
    "frozen": ["finetune=frozen", "finetune.callback.feature_cache=false"],
    "gradual": ["finetune=gradual", "finetune.callback.unfreeze_at_epoch=100"],
}


def run_arm(arm: str, root: Path, work: Path, epochs: int, warmup: int) -> float:
    out = work / f"{arm}-{len(list(work.iterdir()))}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, str(ROOT / "train.py"), "trainer=ddp_cpu", *ARMS[arm], "data=folder",
                    f"data.root={root}", "data.image_size=64", "data.resize_size=64", "data.batch_size=32",
                    "data.num_workers=0", "model.weights=null", f"trainer.max_epochs={epochs}", "test=false",
                    "callbacks=none", "logger=[]", "+trainer.enable_progress_bar=false",
                    "+trainer.enable_model_summary=false", "+trainer.enable_checkpointing=false",
                    "+callbacks.timer._target_=step_timer.RankZeroStepTimer", f"+callbacks.timer.warmup={warmup}",
                    f"+callbacks.timer.out={out}.json", f"hydra.run.dir={out}"],
                   check=True, env=env, capture_output=True, cwd=work)
    return json.loads(Path(f"{out}.json").read_text())["step_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start")
    args = parser.parse_args()
    work = scratch_dir("unfreeze-ddp-")
    root = write_image_folder(work / "shapes", {"train": args.per_class, "test": 4}, size=64)
    ratios = []
    for pair in range(args.pairs):
        order = ("frozen", "gradual") if pair % 2 == 0 else ("gradual", "frozen")
        times = {arm: run_arm(arm, root, work, args.epochs, args.warmup) for arm in order}
        ratios.append(times["gradual"] / times["frozen"])
        print(f"pair {pair}: frozen {times['frozen'] * 1e3:.1f} ms/step, gradual (frozen stage) "
              f"{times['gradual'] * 1e3:.1f} ms/step, ratio {ratios[-1]:.3f}", flush=True)
    print(f"ratio={statistics.median(ratios):.3f} spread={min(ratios):.3f}-{max(ratios):.3f}")


if __name__ == "__main__":
    main()
