"""`python export.py ckpt_path=PATH format=onnx|torchscript`: a deployable model plus a JSON that
says how to feed it, checked against PyTorch before it is handed over.

The JSON next to the model holds the class names and the preprocessing (resize, crop, mean, std,
interpolation) from the checkpoint, so a consumer never has to guess them; the parity check runs
the exported file (onnxruntime for ONNX) on a fresh batch of another size than the export sample,
which also proves the batch dimension is dynamic. With `check_input=FILE_OR_DIR` that batch is real
images, decoded and transformed exactly as predict.py and the run's evaluation read them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from finetune.cli.config_source import entry_point
from finetune.data.image_files import find_files, model_inputs
from finetune.data.transforms import Preprocessing
from finetune.errors import FinetuneError
from finetune.models.checkpoint import load_classifier
from finetune.models.exporters import FORMATS, export_model, run_exported
from finetune.output_errors import check_writable, writing

log = logging.getLogger("finetune")


def check_batch(cfg: DictConfig, p: Preprocessing, generator: torch.Generator) -> torch.Tensor:
    """The parity check's inputs: the first `check_batch_size` readable images of `check_input`
    through the model's own decoder and evaluation path (tiny images: native crop, then the
    per-batch upsampling), or random tensors without `check_input`."""
    size = cfg.check_batch_size
    if not cfg.get("check_input"):
        return torch.randn(size, 3, p.crop_size, p.crop_size, generator=generator)
    dataset = model_inputs(find_files(cfg.check_input), p)
    images = []
    for index in range(len(dataset)):
        _, image, _ = dataset[index]
        if image is not None:
            images.append(image)
        if len(images) == size:
            break
    if not images:
        raise FinetuneError(f"check_input={cfg.check_input} holds no readable images; "
                            "pass check_input=FILE_OR_DIR with images, or check_input=null")
    batch = torch.stack(images)
    return dataset.batch_transform(batch) if dataset.batch_transform is not None else batch


def output_paths(cfg: DictConfig) -> tuple[Path, Path]:
    """The model file and its JSON, checked before any work: a known format, nothing overwritten,
    a writable folder (a read-only or misspelt path is one line, not a traceback after the export)."""
    if cfg.format not in FORMATS:
        raise FinetuneError(f"format={cfg.format} is not supported; pass format={' or format='.join(FORMATS)}")
    target = Path(cfg.output) if cfg.get("output") else Path(cfg.paths.output_dir) / f"model{FORMATS[cfg.format]}"
    described = target.with_suffix(".json")
    for path in (target, described):
        if path.exists():
            raise FinetuneError(f"{path} exists; pass another output=PATH or move the file away")
    check_writable(target)
    return target, described


def export(cfg: DictConfig) -> dict:
    """Write the model and its JSON; returns the JSON's content (parity result included)."""
    target, described = output_paths(cfg)
    model = load_classifier(cfg.ckpt_path, trust=bool(cfg.get("trust_checkpoint")))
    p = model.preprocessing
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(cfg.sample_batch_size, 3, p.crop_size, p.crop_size, generator=generator)
    check = check_batch(cfg, p, generator)

    # The parity reference divides by the temperature explicitly; the exported graph has it folded
    # into the head, so a fold that went wrong fails the check.
    temperature = model.temperature
    with torch.no_grad():
        expected = model(check) / temperature
    model.fold_temperature()
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        export_model(model, cfg.format, target, sample)
    got = run_exported(cfg.format, target, check)
    parity = {"passed": bool(torch.allclose(got, expected, atol=cfg.atol, rtol=cfg.rtol)),
              "max_abs_diff": float((got - expected).abs().max()), "atol": cfg.atol, "rtol": cfg.rtol,
              "batch_size": len(check), "against": f"PyTorch {torch.__version__}",
              "inputs": str(cfg.check_input) if cfg.get("check_input") else "random normal"}
    info = describe(cfg, model, target, temperature, parity)
    with writing(described):
        described.write_text(json.dumps(info, indent=2) + "\n")
    report(target, described, parity)
    return info


def describe(cfg: DictConfig, model, target: Path, temperature: float, parity: dict) -> dict:
    """The JSON next to the model: what goes in, what comes out, where it came from."""
    p = model.preprocessing
    return {
        "format": cfg.format,
        "file": target.name,
        "checkpoint": str(Path(cfg.ckpt_path).expanduser().resolve()),
        "architecture": model.hparams.get("name"),
        "input": {"name": "images", "shape": ["batch", 3, p.crop_size, p.crop_size], "dtype": "float32",
                  "layout": "NCHW, RGB, (pixel / 255 - mean) / std"},
        "output": {"name": "logits", "shape": ["batch", len(model.class_names)],
                   "note": f"the network's logits divided by the temperature ({temperature:.6g}, fitted on "
                           "the validation split); softmax gives calibrated class probabilities"},
        "temperature": temperature,
        # Temperatures fitted on test-time-augmented logits (tta=hflip): a server averaging the
        # views rescales the averaged logits from `temperature` to these.
        "tta_temperatures": dict(getattr(model, "tta_temperatures", {}) or {}),
        "class_names": list(model.class_names),
        "preprocessing": preprocessing_steps(p),
        "parity": parity,
    }


def preprocessing_steps(p: Preprocessing) -> dict:
    """The preprocessing as values and as the steps a consumer must repeat, tiny images included."""
    return {
        "resize_size": p.resize_size, "crop_size": p.crop_size, "interpolation": p.interpolation,
        "mean": list(p.mean), "std": list(p.std), "draft_decode": p.draft_decode,
        "steps": decode_step(p) + "resize the short side to resize_size, center-crop crop_size, "
                 "scale to [0, 1], normalise",
        "tiny_images": "an image whose longest side is at most crop_size / 2 (as eval and predict.py read "
                       "it): resize the short side to the longest side sampled among the images, center-crop the same fraction "
                       "(crop_size / resize_size), upsample to crop_size (interpolation, antialiased), "
                       "then scale and normalise",
    }


def report(target: Path, described: Path, parity: dict) -> None:
    """Print what was written and the parity verdict; a failed check is an error (files kept)."""
    max_diff, atol = parity["max_abs_diff"], parity["atol"]
    print(f"wrote {target} and {described.name}")
    print(f"parity check {'passed' if parity['passed'] else 'FAILED'}: max |exported - pytorch| = "
          f"{max_diff:.2e} on {parity['batch_size']} images (atol={atol}, rtol={parity['rtol']})")
    if not parity["passed"]:
        raise FinetuneError(
            f"the exported {target} differs from PyTorch by up to {max_diff:.2e} (atol={atol}); "
            "files kept for inspection; a real bug unless atol was set very tight"
        )


def decode_step(p: Preprocessing) -> str:
    """How the model's images were decoded, as the first of the JSON's preprocessing steps."""
    if not p.draft_decode:
        return "decode fully to RGB, "
    return (f"decode to RGB, JPEGs whose short side is at least {2 * max(p.resize_size, p.crop_size)} "
            "at 1/2, 1/4 or 1/8 scale (Pillow's draft mode, libjpeg DCT scaling; the short side "
            f"kept >= {max(p.resize_size, p.crop_size)}), ")


main = entry_point('export', export)


if __name__ == "__main__":
    main()
