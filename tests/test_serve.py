"""`python -m finetune.serve`: a checkpoint trained here, served over real HTTP on 127.0.0.1.

One server (tta=hflip, dynamic batching with a batch window wide enough that concurrent requests
share a batch) answers the module's tests: parity with predict.py, bad requests, batches that mix
good and bad images, /info and /health, and the page in headless Chromium; a second one serves
the same checkpoint exported to ONNX.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import compose_train
from finetune.cli.export import export
from finetune.cli.predict import predict
from finetune.cli.train import train
from finetune.data.image_files import find_files
from finetune.models.checkpoint import load_classifier
from finetune.serve.app import exposure_warning
from serve_helpers import post_image, request, served
from test_decoding import photo

pytest.importorskip("litserve", reason="the serve extra is not installed: pip install -e '.[serve]'")

RUN = ["data=folder", "model.weights=null", "callbacks.rich_progress_bar=null",
       "callbacks.prediction_grid=null", "data.num_workers=0", "data.image_size=32",
       "data.resize_size=32", "data.batch_size=16", "trainer.precision=32-true", "trainer.max_epochs=1"]
# Wide enough that the concurrent requests of a test land in one batch.
BATCHING = ["max_batch_size=8", "batch_timeout=0.3"]

# Tests that use the server are slow: a real training run and a server start (10-60 s on 2 cores).
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def ckpt(shapes_folder, tmp_path_factory) -> Path:
    """A one-epoch run on the shapes (calibrate=true: the checkpoint carries a fitted temperature)."""
    out = tmp_path_factory.mktemp("serve_run")
    # The server runs with tta=hflip: calibration also fits the temperature of hflip-averaged logits.
    train(compose_train([f"data.root={shapes_folder}", *RUN, "callbacks.calibration.tta=hflip"], out_dir=out))
    (best,) = (out / "checkpoints").glob("epoch_*.ckpt")
    assert load_classifier(best).temperature != 1.0  # so the parity test sees it applied
    return best


@pytest.fixture(scope="module")
def images(shapes_folder, tmp_path_factory) -> Path:
    """Shapes (PNG) and photos (JPEG, decoded at reduced scale as the checkpoint says) to predict."""
    root = tmp_path_factory.mktemp("serve_images")
    for path in sorted((shapes_folder / "test").rglob("*.png"))[::4]:
        shutil.copy(path, root / f"{path.parent.name}_{path.name}")
    for seed in range(3):
        photo(root / f"photo_{seed}.jpg", seed=seed)
    return root


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory) -> int:
    with served(ckpt, tmp_path_factory.mktemp("served"), "tta=hflip", "top_k=10", *BATCHING) as (port, _):
        yield port


def predicted_by_predict_py(ckpt: Path, images: Path, out: Path) -> dict[str, dict[str, float]]:
    predict(compose_train([f"ckpt_path={ckpt}", f"input={images}", "tta=hflip"], out, config_name="predict"))
    with open(out / "predictions.csv") as f:
        return {Path(row["path"]).name: {k[5:]: float(v) for k, v in row.items() if k.startswith("prob_")}
                for row in csv.DictReader(f)}


def served_probabilities(answer: dict) -> dict[str, float]:
    return {p["label"]: p["probability"] for p in answer["predictions"]}


@slow
def test_served_probabilities_equal_predict_py(server, ckpt, images, tmp_path):
    expected = predicted_by_predict_py(ckpt, images, tmp_path / "predict")
    files = find_files(images)
    with ThreadPoolExecutor(8) as pool:  # concurrent: served in batches, as under load
        answers = list(pool.map(lambda f: post_image(server, f.read_bytes(), "image/jpeg"), files))
    identity = f"sha256:{hashlib.sha256(ckpt.read_bytes()).hexdigest()}"
    for path, (status, answer) in zip(files, answers):
        assert status == 200 and answer["checkpoint"] == identity, answer
        got, want = served_probabilities(answer), expected[path.name]
        assert got.keys() == want.keys()
        assert max(abs(got[c] - want[c]) for c in want) < 1e-5, (path.name, got, want)
    # And as a multipart upload, one at a time.
    status, answer = post_image(server, files[0].read_bytes(), "image/png", multipart=True)
    assert status == 200 and served_probabilities(answer) == pytest.approx(expected[files[0].name], abs=1e-5)


@slow
def test_an_exported_onnx_file_serves_the_same_probabilities(ckpt, images, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnx=PATH needs onnxruntime (the export extra)")
    onnx = tmp_path / "deploy" / "model.onnx"
    export(compose_train([f"ckpt_path={ckpt}", "format=onnx", f"output={onnx}"], tmp_path / "export",
                         config_name="export"))
    expected = predicted_by_predict_py(ckpt, images, tmp_path / "predict")
    with served(onnx, tmp_path / "served", "tta=hflip", "top_k=10", source="onnx") as (port, _):
        answers = {f.name: post_image(port, f.read_bytes(), "image/jpeg") for f in find_files(images)}
        info = json.loads(request(port, "GET", "/info")[1])["model"]
    assert info["format"] == "onnx" and info["temperature"] == pytest.approx(load_classifier(ckpt).temperature)
    for name, (status, answer) in answers.items():
        assert status == 200 and answer["checkpoint"] == f"sha256:{hashlib.sha256(onnx.read_bytes()).hexdigest()}"
        got, want = served_probabilities(answer), expected[name]
        assert max(abs(got[c] - want[c]) for c in want) < 1e-5, (name, got, want)


@slow
def test_info_and_health_describe_the_checkpoint(server, ckpt):
    status, body = request(server, "GET", "/health")
    assert (status, body) == (200, b"ok")
    status, body = request(server, "GET", "/info")
    model = load_classifier(ckpt)
    info = json.loads(body)["model"]
    assert status == 200
    assert info["classes"] == list(model.class_names) and info["name"] == model.hparams["name"]
    assert info["temperature"] == pytest.approx(model.temperature) and info["tta"] == "hflip"
    assert info["preprocessing"] == json.loads(json.dumps(model.preprocessing.as_dict()))
    assert info["checkpoint"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()


def png_claiming(width: int, height: int) -> bytes:
    """A 67-byte PNG whose header says width x height: a decompression bomb's first line."""
    data = bytearray(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR"
                     + struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    data += struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    idat = zlib.compress(b"\x00\x00")
    data += struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    return bytes(data + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND")))


def bad_requests(good: bytes) -> dict[str, tuple[bytes, str, bool, int]]:
    """name: (body, content type, multipart, expected status)."""
    return {
        "not an image": (b"this is not an image", "image/png", False, 400),
        "truncated image": (good[: len(good) // 2], "image/jpeg", False, 400),
        "truncated upload": (good[: len(good) // 2], "image/jpeg", True, 400),
        "decompression bomb": (png_claiming(30000, 30000), "image/png", False, 413),
        "over the size limit": (b"\xff" * (10_000_000 + 1), "image/jpeg", False, 413),
        "empty body": (b"", "image/jpeg", False, 400),
        "empty upload": (b"", "image/jpeg", True, 400),
        "json": (b'{"image": "x"}', "application/json", False, 415),
        "form": (b"a=b", "application/x-www-form-urlencoded", False, 415),
    }


@slow
def test_bad_requests_get_a_one_line_4xx_and_the_next_good_request_succeeds(server, images):
    good = (images / "photo_0.jpg").read_bytes()
    for name, (body, content_type, multipart, expected) in bad_requests(good).items():
        status, answer = post_image(server, body, content_type, multipart=multipart)
        assert status == expected, (name, status, answer)
        assert isinstance(answer, dict) and set(answer) == {"error"}, (name, answer)
        assert answer["error"] and "\n" not in answer["error"], (name, answer)
        status, answer = post_image(server, good, "image/jpeg")
        assert status == 200 and answer["predictions"], (name, answer)


@slow
def test_a_bad_image_does_not_fail_the_good_ones_batched_with_it(server, images):
    """LitServe fails a whole batch when decode_request raises for one request of it."""
    good = (images / "photo_1.jpg").read_bytes()
    bodies = [good, b"not an image", good, good[:200]] * 2
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: post_image(server, b, "image/jpeg"), bodies))
    statuses = [status for status, _ in answers]
    assert statuses == [200, 400, 200, 400] * 2, answers


def test_binding_beyond_loopback_is_said_out_loud():
    for host in ("127.0.0.1", "localhost", "::1"):
        assert exposure_warning(host) is None
    for host in ("0.0.0.0", "::", "192.168.1.5"):
        assert "reachable from other machines" in exposure_warning(host)


@pytest.mark.parametrize(("args", "named"), [(["ckpt_path={tmp}/nope.ckpt"], "nope.ckpt"),
                                             (["onnx={tmp}/nope.onnx"], "nope.onnx"),
                                             ([], "ckpt_path=PATH")])
def test_a_missing_model_is_one_line(tmp_path, args, named):
    result = subprocess.run([sys.executable, "-m", "finetune.serve", *(a.format(tmp=tmp_path) for a in args),
                             f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and named in lines[0], result.stderr


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")


@slow
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                    reason="headless Chromium not installed: apt-get install chromium chromium-driver (make install does as root)")
def test_the_page_shows_the_top_class_of_an_uploaded_photo(server, images):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the serve extra) is not installed")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    photo_path = images / "photo_2.jpg"
    _, answer = post_image(server, photo_path.read_bytes(), "image/jpeg")
    expected = answer["predictions"][0]
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    try:
        driver.get(f"http://127.0.0.1:{server}/")
        driver.find_element(By.ID, "file").send_keys(str(photo_path))
        rows = WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "tr.prediction"))
        label, percent = (cell.text for cell in rows[0].find_elements(By.TAG_NAME, "td")[:2])
        assert label == expected["label"]
        assert percent == f"{100 * expected['probability']:.1f}%"
        assert driver.find_element(By.ID, "error").text == ""
    finally:
        driver.quit()
