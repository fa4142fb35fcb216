"""`python -m finetune.cli.prefetch` against a server on 127.0.0.1: what it fetches, an offline run
reads; what it cannot reach, it names."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torchvision

from fake_data import make_hotdog_tree
from finetune.cli.prefetch import prefetch
from finetune.data.hotdog import HotdogDataModule
from finetune.models import create_backbone

ROOT = Path(__file__).resolve().parents[1]


def serve_hotdog_and_weights(www: Path, work: Path) -> tuple[str, torch.nn.Module]:
    """hotdog.zip (as d2l lays it out) and a ResNet-18 state dict in `www`; returns the zip's SHA-1."""
    make_hotdog_tree(work, per_class=2)
    shutil.make_archive(str(www / "hotdog"), "zip", root_dir=work, base_dir="hotdog")
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), www / "resnet18-served.pth")
    return hashlib.sha1((www / "hotdog.zip").read_bytes()).hexdigest(), reference


def test_prefetch_fills_the_caches_an_offline_run_reads(make_cfg, http_server, tmp_path, monkeypatch, capsys):
    www, base = http_server
    sha1, reference = serve_hotdog_and_weights(www, tmp_path / "work")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights_url = f"{base}/resnet18-served.pth"
    cfg = make_cfg(["data=hotdog", f"data.url={base}/hotdog.zip", f"data.sha1={sha1}",
                    "model=resnet18", f"model.weights={weights_url}"])

    results = prefetch(cfg)

    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-served.pth"
    data_dir = Path(cfg.paths.data_dir) / "hotdog"
    assert [r.where for r in results] == [str(cached), str(data_dir.resolve())]
    out = capsys.readouterr().out
    assert str(cached) in out and str(data_dir.resolve()) in out
    # The server goes away; the training side still finds everything.
    for f in www.iterdir():
        f.unlink()
    backbone = create_backbone("resnet18", weights_url)
    assert torch.equal(backbone.module.conv1.weight, reference.conv1.weight)
    datamodule = HotdogDataModule(root=cfg.paths.data_dir, url=f"{base}/hotdog.zip", sha1=sha1, num_workers=0)
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert len(datamodule.datasets["train"]) + len(datamodule.datasets["val"]) == 4


def test_offline_prefetch_names_every_url_it_could_not_reach(http_server, tmp_path):
    _, base = http_server  # serves an empty folder: every file is a 404
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-m", "finetune.cli.prefetch", "data=hotdog", f"data.url={base}/hotdog.zip",
         "model=resnet18", f"model.weights={base}/missing.pth", f"paths.data_dir={tmp_path / 'data'}",
         f"hydra.run.dir={tmp_path / 'run'}"],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"could not reach {base}/missing.pth" in result.stdout
    assert f"could not reach {base}/hotdog.zip" in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{base}/missing.pth, {base}/hotdog.zip" in errors[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "hotdog").exists()
