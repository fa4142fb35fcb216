"""Progressive unfreezing under DDP: layers that join later are averaged across ranks like the rest.

Lightning's `BaseFinetuning` freezes in `setup`, before DDP wraps the model, and DDP's reducer only
knows the parameters that required grad at that moment (Lightning issue #20340): after the
unfreeze each rank would train its own backbone. Two gloo processes on the CPU show it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import run_cli
from test_finetuning import TINY

TESTS = Path(__file__).resolve().parent


@pytest.mark.slow  # DDP: two processes
@pytest.mark.parametrize("strategy", [
    ["finetune=gradual", "finetune.callback.unfreeze_at_epoch=1"],
    ["finetune=lp_ft", "finetune.callback.lp_epochs=1"],
])
def test_layers_unfrozen_later_stay_identical_on_every_rank(tmp_path, strategy):
    out = tmp_path / "sums"
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    result = run_cli("train.py", "trainer=ddp_cpu", *TINY, *strategy, "trainer.max_epochs=3", "test=false",
                     "model.optimizer.lr=0.01", "+callbacks.sums._target_=ddp_probe.WeightChecksums",
                     f"+callbacks.sums.out={out}", cwd=tmp_path, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [e["epoch"] for e in ranks[0]] == [0, 1, 2]
    # Epoch 0: the backbone frozen on both; from epoch 1 on it trains, and stays one model.
    assert ranks[0][0]["trainable"] == 0
    assert ranks[0][2]["trainable"] > 10
    assert ranks[0][1]["backbone"] != ranks[0][0]["backbone"] != ranks[0][2]["backbone"]
    for r0, r1 in zip(*ranks):
        assert (r0["backbone"], r0["head"]) == (r1["backbone"], r1["head"]), r0["epoch"]
