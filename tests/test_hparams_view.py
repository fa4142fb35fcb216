"""TensorBoard's HParams view compares runs: the settings a researcher varies, the metrics that rank
them, sweep jobs named by their overrides; checked through TensorBoard's own HTTP API."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import run_cli
from finetune.hparams_view import METRICS, sanitise_run_name, select_hparams, tensorboard_version

SETTINGS = {"data/batch_size", "data/image_size", "data/source", "finetune/strategy", "model/head_lr_mult",
            "model/layer_decay", "model/name", "model/weights", "optimizer/class", "optimizer/lr",
            "optimizer/weight_decay", "scheduler/class", "seed", "trainer/max_epochs", "trainer/precision"}


def test_hparams_are_the_settings_a_researcher_varies_and_the_runs_own_overrides(make_cfg):
    cfg = make_cfg(["finetune=gradual", "model.optimizer.lr=0.01", "data.augment=false",
                    "data.skipped_csv=/tmp/skipped.csv", "callbacks.top_losses.k=3"])
    params = select_hparams(cfg, {"data.image_size": 40, "trainer.precision": "bf16-mixed"})
    gradual_knobs = {"finetune/unfreeze_at_epoch", "finetune/backbone_lr_mult", "finetune/train_bn", "finetune/bn"}
    # the override of a setting not in the list gets its own column; paths and callbacks do not
    assert set(params) == SETTINGS | gradual_knobs | {"data.augment"}, sorted(params)
    assert params["optimizer/lr"] == 0.01 and params["optimizer/class"] == "Adam"
    assert params["data/image_size"] == 40 and params["data/source"] == "shapes"
    assert params["trainer/precision"] == "bf16-mixed"  # what the run resolved, not the config's
    assert params["finetune/strategy"] == "gradual" and params["finetune/unfreeze_at_epoch"] == 1
    assert params["model/layer_decay"] == "null" and params["data.augment"] is False


def test_run_names_are_safe_directory_names_and_long_ones_stay_apart(make_cfg):
    make_cfg([])
    assert tensorboard_version() == ""  # a single run logs into tensorboard/ of its dated run dir
    assert sanitise_run_name("model=resnet34,data.root=/a b/c") == "model=resnet34,data.root=_a_b_c"
    long_a, long_b = sanitise_run_name("x=" + "a" * 300), sanitise_run_name("x=" + "a" * 299 + "b")
    assert len(long_a) == len(long_b) == 120 and long_a != long_b


# --- a real sweep, read back through TensorBoard's HTTP API ------------------------------------------
TINY = ["data=shapes", "data.train_size=32", "data.val_size=16", "data.test_size=16", "data.image_size=32",
        "data.resize_size=32", "data.num_workers=0", "data.batch_size=16", "model.weights=null",
        "trainer.precision=32-true", "trainer.max_epochs=1", "finetune=frozen", "callbacks.rich_progress_bar=null",
        "callbacks.prediction_grid=null", "callbacks.top_losses=null", "callbacks.confusion_matrix=null"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def _wait_for_runs(base: str, runs: int, server: subprocess.Popen, timeout_s: float = 90) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, server.stdout.read()
        try:
            tags = _get(f"{base}/data/plugin/scalars/tags")
            if len(tags) >= runs and all("test/acc" in t for t in tags.values()):
                return tags
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"TensorBoard at {base} did not load {runs} runs in {timeout_s}s")


@pytest.mark.slow
def test_a_two_job_sweep_in_tensorboards_hparams_view(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_cli("train.py", "-m", *TINY, "model.optimizer.lr=0.01,0.001", f"hydra.sweep.dir={sweep_dir}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert log.count("├── data") == 2 and log.count("├── trainer") == 2, log[-3000:]  # the tree, once a job
    assert log.count("parameters: 11,178,564 total, 2,052 trainable (0.02%) at epoch 0") == 2, log[-3000:]

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(sweep_dir), "--host", "127.0.0.1",
         "--port", str(port), "--reload_interval", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        base = f"http://127.0.0.1:{port}"
        tags = _wait_for_runs(base, 2, server)
        experiment = _get(f"{base}/data/plugin/hparams/experiment", {"experimentName": "", "includeMetrics": True})
        groups = _get(f"{base}/data/plugin/hparams/session_groups", {
            "experimentName": "", "startIndex": 0, "sliceSize": 10, "includeMetrics": True, "colParams": [],
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]})
    finally:
        server.terminate()
        server.wait(timeout=30)

    assert sorted(tags) == ["0/tensorboard/model.optimizer.lr=0.01", "1/tensorboard/model.optimizer.lr=0.001"]
    for run_tags in tags.values():
        assert {"params/total", "params/trainable", "params/trainable_fraction", *METRICS} <= set(run_tags)
    columns = {h["name"] for h in experiment["hparamInfos"]}
    frozen_knobs = {"finetune/feature_cache"}
    overrides = {"data.train_size", "data.val_size", "data.test_size", "data.resize_size", "data.num_workers"}
    assert columns == SETTINGS | frozen_knobs | overrides, sorted(columns)
    assert [m["name"]["tag"] for m in experiment["metricInfos"]] == list(METRICS)

    sessions = {g["sessions"][0]["name"]: g for g in groups["sessionGroups"]}
    assert set(sessions) == set(tags)
    for name, group in sessions.items():
        assert group["hparams"]["optimizer/lr"] == float(name.rsplit("=", 1)[1])
        values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        metrics = json.loads((sweep_dir / name.split("/")[0] / "metrics.json").read_text())
        assert set(values) == set(METRICS)
        for tag in METRICS:
            assert values[tag] == pytest.approx(metrics[tag], rel=1e-6), tag
        assert values["time/fit_s"] > 0

