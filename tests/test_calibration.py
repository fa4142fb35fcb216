"""Temperature scaling: fitted on validation, stored per checkpoint, used by test, predict and
export, and never changing a prediction."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from conftest import compose_train
from finetune.callbacks.calibration import (
    TemperatureScaling,
    expected_calibration_error,
    fit_temperature,
)
from finetune.cli.export import export
from finetune.cli.predict import predict
from finetune.cli.train import build, train
from finetune.data.image_files import find_files, model_inputs
from finetune.errors import FinetuneError
from finetune.models.checkpoint import load_classifier
from finetune.models.exporters import run_exported

RUN = ["model.weights=null", "callbacks.rich_progress_bar=null", "callbacks.prediction_grid=null",
       "data.num_workers=0", "data.image_size=32", "data.resize_size=32", "data.batch_size=16",
       "trainer.precision=32-true", "trainer.max_epochs=2"]


def overconfident(n: int = 4000, classes: int = 5, scale: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits z whose softmax is calibrated by construction (labels are drawn from it), times `scale`."""
    generator = torch.Generator().manual_seed(0)
    z = 2 * torch.randn(n, classes, generator=generator)
    targets = torch.multinomial(z.softmax(dim=-1), 1, generator=generator).squeeze(1)
    return scale * z, targets


def test_the_fitted_temperature_undoes_deliberate_overconfidence_without_changing_argmax():
    logits, targets = overconfident()
    temperature = fit_temperature(logits, targets)
    assert temperature == pytest.approx(10.0, rel=0.1)
    assert F.cross_entropy(logits / temperature, targets) < 0.5 * F.cross_entropy(logits, targets)
    assert expected_calibration_error(logits, targets, temperature) < 0.3 * expected_calibration_error(logits, targets)
    assert torch.equal((logits / temperature).argmax(-1), logits.argmax(-1))


@pytest.fixture(scope="module")
def run(shapes_folder, tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """A real two-epoch run on the shapes folder with the default callbacks (calibrate=true)."""
    out = tmp_path_factory.mktemp("calibrated_run")
    # Also a temperature for tta=hflip (fitted on hflip-averaged validation logits); train's own test stays plain.
    metrics = train(compose_train(["data=folder", f"data.root={shapes_folder}", *RUN, "callbacks.calibration.tta=hflip"],
                                  out_dir=out))
    return out, metrics


def best_of(out: Path) -> Path:
    (best,) = (out / "checkpoints").glob("epoch_*.ckpt")
    return best


def test_training_fits_a_temperature_per_checkpoint_and_tests_with_the_best_ones(run, shapes_folder):
    out, metrics = run
    for key in ("val/ece", "val/ece_calibrated", "val/temperature", "test/ece", "test/ece_calibrated"):
        assert key in metrics
    hparams = torch.load(best_of(out), map_location="cpu", weights_only=False)["hyper_parameters"]
    temperature = hparams["temperature"]
    assert temperature != 1.0
    model = load_classifier(best_of(out))
    assert model.temperature == temperature
    # test/ece_calibrated is the best checkpoint's weights with the best checkpoint's temperature.
    datamodule, _, _ = build(compose_train(["data=folder", f"data.root={shapes_folder}", *RUN], out / "again"))
    datamodule.setup("test")
    logits, targets = [], []
    with torch.no_grad():
        for images, labels in datamodule.test_dataloader():
            logits.append(model(images))
            targets.append(labels)
    logits, targets = torch.cat(logits), torch.cat(targets)
    assert metrics["test/ece_calibrated"] == pytest.approx(expected_calibration_error(logits, targets, temperature), abs=1e-5)
    assert metrics["test/ece"] == pytest.approx(expected_calibration_error(logits, targets), abs=1e-5)
    assert (out / "reliability_diagram.png").stat().st_size > 1000
    events = b"".join(p.read_bytes() for p in (out / "tensorboard").rglob("events.out.tfevents.*"))
    assert b"test/reliability_diagram" in events


def test_a_loaded_checkpoint_brings_its_temperature_and_older_ones_mean_one(run):
    model = load_classifier(best_of(run[0]))
    model.on_load_checkpoint({"hyper_parameters": {"temperature": 3.0}})
    assert model.temperature == 3.0 and model.hparams["temperature"] == 3.0
    model.on_load_checkpoint({"hyper_parameters": {}})
    assert model.temperature == 1.0


def test_a_ten_times_overconfident_model_gets_a_ten_times_higher_temperature(run, shapes_folder):
    """Validation with the callback on the real model, then on the same model with its logits x10:
    the NLL is minimised at exactly 10x the temperature, and the NLL at T=1 was worse."""
    model = load_classifier(best_of(run[0]))
    datamodule, _, _ = build(compose_train(["data=folder", f"data.root={shapes_folder}", *RUN], run[0] / "v"))
    fitted = []
    for scale in (1.0, 10.0):
        scaled = copy.deepcopy(model)
        with torch.no_grad():
            scaled.head[-1].weight.mul_(scale)
            scaled.head[-1].bias.mul_(scale)
        trainer = L.Trainer(callbacks=[TemperatureScaling()], logger=False, enable_progress_bar=False,
                            enable_model_summary=False)
        (result,) = trainer.validate(scaled, datamodule=datamodule, verbose=False)
        fitted.append(scaled.temperature)
        assert result["val/temperature"] == pytest.approx(scaled.temperature)
        assert result["val/ece_calibrated"] <= result["val/ece"] + 1e-6
    assert fitted[1] == pytest.approx(10 * fitted[0], rel=1e-3)
    datamodule.setup("validate")
    images, targets = map(torch.cat, zip(*datamodule.val_dataloader()))
    with torch.no_grad():
        logits = 10 * model(images)
    assert F.cross_entropy(logits / fitted[1], targets) < F.cross_entropy(logits, targets)


def test_predict_probabilities_use_the_temperature_and_keep_the_argmax(run, tmp_path, shapes_folder):
    best = best_of(run[0])
    model = load_classifier(best)
    out = tmp_path / "out"
    predict(compose_train([f"ckpt_path={best}", f"input={shapes_folder / 'test'}", "top_k=1"], out,
                          config_name="predict"))
    with open(out / "predictions.csv") as f:
        rows = {row["path"]: row for row in csv.DictReader(f)}
    dataset = model_inputs(find_files(shapes_folder / "test"), model.preprocessing)
    paths, images, _ = zip(*(dataset[i] for i in range(len(dataset))))
    with torch.no_grad():
        logits = model(torch.stack(images))
    calibrated = (logits / model.temperature).softmax(-1)
    for path, probs, raw in zip(paths, calibrated, logits):
        row = rows[str(path)]
        got = torch.tensor([float(row[f"prob_{c}"]) for c in model.class_names])
        assert torch.allclose(got, probs, atol=1e-4)
        assert row["label"] == model.class_names[int(raw.argmax())]
    assert not torch.allclose(calibrated, logits.softmax(-1), atol=1e-3)  # the temperature mattered


def test_the_exported_model_carries_the_temperature(run, tmp_path):
    best = best_of(run[0])
    model = load_classifier(best)
    target = tmp_path / "model.pt"
    info = export(compose_train([f"ckpt_path={best}", "format=torchscript", f"output={target}"], tmp_path,
                                config_name="export"))
    assert info["temperature"] == model.temperature != 1.0 and info["parity"]["passed"]
    assert json.loads(target.with_suffix(".json").read_text())["temperature"] == model.temperature
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(images) / model.temperature
    assert torch.allclose(run_exported("torchscript", target, images), expected, atol=1e-4)


def test_calibrate_false_leaves_the_temperature_at_one(shapes_folder, tmp_path):
    metrics = train(compose_train(["data=folder", f"data.root={shapes_folder}", *RUN, "trainer.max_epochs=1",
                                   "calibrate=false", "test=false", "logger=csv"], tmp_path))
    assert "val/temperature" not in metrics and "val/ece" in metrics
    hparams = torch.load(best_of(tmp_path), map_location="cpu", weights_only=False)["hyper_parameters"]
    assert hparams["temperature"] == 1.0


def test_predict_tta_hflip_averages_the_logits_of_both_views(run, tmp_path, shapes_folder):
    best = best_of(run[0])
    model = load_classifier(best)
    out = tmp_path / "out"
    predict(compose_train([f"ckpt_path={best}", f"input={shapes_folder / 'test'}", "top_k=1", "tta=hflip"], out,
                          config_name="predict"))
    with open(out / "predictions.csv") as f:
        rows = {row["path"]: row for row in csv.DictReader(f)}
    dataset = model_inputs(find_files(shapes_folder / "test"), model.preprocessing)
    paths, images, _ = zip(*(dataset[i] for i in range(len(dataset))))
    images = torch.stack(images)
    with torch.no_grad():
        plain, mirrored = model(images), model(images.flip(-1))
    expected = ((plain + mirrored) / 2 / model.hparams["tta_temperatures"]["hflip"]).softmax(-1)
    got = torch.stack([torch.tensor([float(rows[str(p)][f"prob_{c}"]) for c in model.class_names]) for p in paths])
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(got, (plain / model.temperature).softmax(-1), atol=1e-3)  # TTA mattered


def test_eval_tta_hflip_tests_on_both_views(run, tmp_path, shapes_folder):
    from finetune.cli.evaluate import evaluate
    best = best_of(run[0])
    data = ["data=folder", f"data.root={shapes_folder}", "data.num_workers=0", "trainer.precision=32-true"]
    plain = evaluate(compose_train([f"ckpt_path={best}", "logger=[]", *data], tmp_path / "plain", config_name="eval"))
    both = evaluate(compose_train([f"ckpt_path={best}", "logger=[]", "tta=hflip", *data], tmp_path / "tta",
                                  config_name="eval"))
    # The test loss is the loss of the averaged logits of each test image and its mirror image.
    model = load_classifier(best)
    dataset = model_inputs(find_files(shapes_folder / "test"), model.preprocessing)
    _, images, _ = zip(*(dataset[i] for i in range(len(dataset))))
    images = torch.stack(images)
    targets = torch.tensor([model.class_names.index(Path(p).parent.name) for p, _, _ in
                            (dataset[i] for i in range(len(dataset)))])
    with torch.no_grad():
        plain_logits, mirrored = model(images), model(images.flip(-1))
    assert plain["test/loss"] == pytest.approx(float(F.cross_entropy(plain_logits, targets)), abs=1e-4)
    assert both["test/loss"] == pytest.approx(float(F.cross_entropy((plain_logits + mirrored) / 2, targets)), abs=1e-4)
    assert plain["test/loss"] != pytest.approx(both["test/loss"], abs=1e-4)
    with pytest.raises(Exception, match="tta=vflip"):
        model.set_tta("vflip")


def test_the_tta_temperature_is_fitted_on_tta_averaged_validation_logits(run, shapes_folder):
    """tta=hflip averages the logits of each image and its mirror image: a temperature fitted on
    plain logits does not calibrate those. The checkpoint carries one fitted on the averaged
    validation logits, and test/predict with tta=hflip use it."""
    model = load_classifier(best_of(run[0]))
    plain_t, tta_t = model.temperature, model.hparams["tta_temperatures"]["hflip"]
    datamodule, _, _ = build(compose_train(["data=folder", f"data.root={shapes_folder}", *RUN], run[0] / "tta"))
    datamodule.setup("validate")
    images, targets = map(torch.cat, zip(*datamodule.val_dataloader()))
    with torch.no_grad():
        plain, mirrored = model(images), model(images.flip(-1))
    assert plain_t == pytest.approx(fit_temperature(plain, targets), rel=1e-3)
    assert tta_t == pytest.approx(fit_temperature((plain + mirrored) / 2, targets), rel=1e-3)
    assert tta_t != pytest.approx(plain_t, rel=1e-3)
    model.set_tta("hflip")
    assert model.applied_temperature == tta_t
    model.set_tta(None)
    assert model.applied_temperature == plain_t


def test_tta_on_a_checkpoint_calibrated_only_for_plain_logits_is_one_line(run):
    model = load_classifier(best_of(run[0]))
    model.on_load_checkpoint({"hyper_parameters": {"temperature": 2.0}})  # as written before the fix
    with pytest.raises(FinetuneError, match="tta=hflip.*plain"):
        model.set_tta("hflip")
    model.on_load_checkpoint({"hyper_parameters": {}})  # calibrate=false: T = 1 means nothing to fit
    model.set_tta("hflip")
    assert model.applied_temperature == 1.0
