"""Jobs that run at once never share a run dir or build a cache entry twice, and a job killed while
writing a cache entry or a checkpoint never leaves half of one that a later run trusts. Real
processes started together (tests/concurrency_helpers.py makes them meet), real SIGKILLs."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_cli
from fake_data import make_hotdog_tree
from finetune.data.resized_cache import cache_path, resized_copy
from finetune.data.shapes import write_image_folder

TESTS = Path(__file__).resolve().parent
HELPERS = TESTS / "concurrency_helpers.py"
TINY = ["data=shapes", "data.train_size=64", "data.val_size=32", "data.test_size=32",
        "data.image_size=32", "data.resize_size=32", "data.num_workers=0", "model.weights=null",
        "trainer.precision=32-true"]


def child_env(**extra: str) -> dict[str, str]:
    """This environment, with tests/ importable (the helpers) in front of the network guard."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": path, **extra}


def start(*argv: str | Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *map(str, argv)], cwd=cwd, env=child_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(procs: list[subprocess.Popen]) -> list[str]:
    """Each process's stdout + stderr, once all have exited 0."""
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, (out + err)[-3000:]
        outputs.append(out + err)
    return outputs


@pytest.mark.slow  # two trainings side by side: about 20 s on two free cores
def test_two_runs_started_in_the_same_second_get_two_run_dirs_and_both_finish(tmp_path):
    # Both runs wait in a Hydra callback until the same moment, just before Hydra names the run dir.
    together = ["+hydra.callbacks.start_together._target_=concurrency_helpers.StartTogether",
                f"+hydra.callbacks.start_together.folder={tmp_path / 'ready'}"]
    runs = [start(ROOT / "train.py", *TINY, "debug=fast", "callbacks=none", *together, cwd=tmp_path)
            for _ in range(2)]
    finish(runs)

    run_dirs = sorted(p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir())
    assert len(run_dirs) == 2, run_dirs
    assert run_dirs[0].name[:8] == run_dirs[1].name[:8], run_dirs  # named in the same second
    for run_dir in run_dirs:
        assert "test/acc" in json.loads((run_dir / "metrics.json").read_text())
        assert (run_dir / "train.log").read_text().count("classes: ") == 1  # its own log only


@pytest.mark.slow  # two processes
def test_two_processes_building_the_same_resized_copy_at_once_build_it_once(tmp_path):
    root = write_image_folder(tmp_path / "src", {"train": 40}, size=96)  # 160 images
    cache = tmp_path / "cache"
    builders = [start(HELPERS, "resized", root, cache, 40, tmp_path / "ready", 2, cwd=tmp_path)
                for _ in range(2)]
    outputs = finish(builders)

    assert sum(out.count("caching 160 images") for out in outputs) == 1, outputs
    assert sum(out.count("waiting for another process") for out in outputs) == 1, outputs
    entries = {line for out in outputs for line in out.splitlines() if line.startswith("entry ")}
    assert len(entries) == 1, entries
    entry = Path(entries.pop().split(" ", 1)[1])
    assert len(list(entry.rglob("*.png"))) == 160
    assert [p for p in cache.iterdir() if not p.name.endswith(".lock")] == [entry]


def write_hotdog_zip(path: Path, work: Path, per_class: int) -> str:
    """A zip laid out like d2l's hotdog.zip; returns its SHA-1."""
    tree = make_hotdog_tree(work, per_class=per_class)
    with zipfile.ZipFile(path, "w") as zf:
        for file in sorted(tree.rglob("*.png")):
            zf.write(file, file.relative_to(work).as_posix())
    return hashlib.sha1(path.read_bytes()).hexdigest()


@pytest.fixture
def counting_server(tmp_path):
    """Serve `tmp_path/www` on 127.0.0.1; yields (folder, base_url, paths requested)."""
    www = tmp_path / "www"
    www.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            requests.append(self.path)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield www, f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow  # two processes
def test_two_processes_fetching_the_hotdog_data_at_once_download_and_extract_it_once(tmp_path, counting_server):
    www, base, requests = counting_server
    sha1 = write_hotdog_zip(www / "hotdog.zip", tmp_path / "work", per_class=30)
    data_dir = tmp_path / "data"
    fetchers = [start(HELPERS, "hotdog", data_dir, f"{base}/hotdog.zip", sha1, tmp_path / "ready", 2,
                      cwd=tmp_path) for _ in range(2)]
    outputs = finish(fetchers)

    assert requests == ["/hotdog.zip"]
    assert sum(out.count("extracting ") for out in outputs) == 1, outputs
    assert sum(out.count("waiting for another process") for out in outputs) == 1, outputs
    assert len(list((data_dir / "hotdog").rglob("*.png"))) == 120
    assert sorted(p.name for p in data_dir.iterdir() if not p.name.endswith(".lock")) == ["hotdog", "hotdog.zip"]


@pytest.mark.slow  # kills a process
def test_a_resized_copy_killed_while_being_written_is_never_used_and_is_rebuilt(tmp_path, caplog):
    root = write_image_folder(tmp_path / "src", {"train": 100}, size=128)  # 400 images
    cache = tmp_path / "cache"
    builder = start(HELPERS, "resized", root, cache, 40, cwd=tmp_path)
    while not (cache.is_dir() and any(any(p.rglob("*.png")) for p in cache.iterdir() if p.is_dir())):
        assert builder.poll() is None, "the copy was done before it could be killed: make it bigger"
        time.sleep(0.01)
    builder.send_signal(signal.SIGKILL)
    builder.wait(timeout=60)
    assert builder.returncode == -signal.SIGKILL

    target = cache_path(root, cache, 40)
    assert not target.exists()  # no half copy where a run would take it for the whole one
    with caplog.at_level(logging.INFO, logger="finetune"):
        assert resized_copy(root, cache, 40) == target
    assert "caching 400 images" in caplog.text
    assert len(list(target.rglob("*.png"))) == 400
    assert [p for p in cache.iterdir() if not p.name.endswith(".lock")] == [target]  # the killed one's staging is gone


@pytest.mark.slow  # kills an end-to-end run
def test_a_checkpoint_write_killed_midway_keeps_the_previous_last_ckpt(tmp_path):
    # Lightning's own save goes through a temp file in TMPDIR that is then moved over last.ckpt:
    # from another file system (a node's local /tmp, the run dir on shared storage) the move is a
    # copy into last.ckpt. /dev/shm (tmpfs) is another file system than tmp_path here.
    shm = Path("/dev/shm")
    tmpdir = Path(tempfile.mkdtemp(dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path))
    try:
        # KillDuringSave: SIGKILL at the second save (end of epoch 1), once the write has begun.
        result = run_cli("train.py", *TINY, "trainer.max_epochs=3", "test=false", "logger=csv",
                         "callbacks.model_checkpoint=null", "callbacks.prediction_grid=null",
                         "callbacks.rich_progress_bar=null",
                         "+callbacks.kill_during_save._target_=concurrency_helpers.KillDuringSave",
                         cwd=tmp_path, env={"PYTHONPATH": child_env()["PYTHONPATH"], "TMPDIR": str(tmpdir)})
        assert result.returncode == -signal.SIGKILL, (result.stdout + result.stderr)[-3000:]
        [last] = (tmp_path / "outputs").glob("*/*/checkpoints/last.ckpt")
        checkpoint = torch.load(last, map_location="cpu", weights_only=False)
        assert checkpoint["epoch"] == 0  # the first save, whole
        assert [p.name for p in last.parent.glob("*.ckpt")] == ["last.ckpt"]  # the half one is no .ckpt
        assert list(tmpdir.iterdir()) == []  # and no stray copy of a checkpoint in TMPDIR
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


@pytest.mark.parametrize("trainer", sorted(p.stem for p in (ROOT / "conf" / "trainer").glob("*.yaml")))
def test_every_trainer_config_saves_checkpoints_atomically(make_cfg, trainer):
    plugins = make_cfg([f"trainer={trainer}"]).trainer.get("plugins") or []
    assert "finetune.run.checkpoint_io.AtomicCheckpointIO" in [p.get("_target_") for p in plugins]
