"""`python export.py ckpt_path=PATH format=onnx|torchscript`: a deployable model plus a JSON that
says how to feed it, checked against PyTorch before it is handed over.

The JSON next to the model holds the class names and the preprocessing (resize, crop, mean, std,
interpolation) from the checkpoint, so a consumer never has to guess them; the parity check runs
the exported file (onnxruntime for ONNX) on a fresh batch of another size than the export sample,
which also proves the batch dimension is dynamic.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from finetune.errors import FinetuneError
from finetune.models.checkpoint import load_classifier
from finetune.models.exporters import FORMATS, export_model, run_exported
from finetune.runtime import user_errors_as_one_line

log = logging.getLogger("finetune")
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def export(cfg: DictConfig) -> dict:
    """Write the model and its JSON; returns the JSON's content (parity result included)."""
    if cfg.format not in FORMATS:
        raise FinetuneError(f"format={cfg.format} is not supported; pass format={' or format='.join(FORMATS)}")
    target = Path(cfg.output) if cfg.get("output") else Path(cfg.paths.output_dir) / f"model{FORMATS[cfg.format]}"
    described = target.with_suffix(".json")
    for path in (target, described):
        if path.exists():
            raise FinetuneError(f"{path} exists; pass another output=PATH or move the file away")
    model = load_classifier(cfg.ckpt_path)
    p = model.preprocessing
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(cfg.sample_batch_size, 3, p.crop_size, p.crop_size, generator=generator)
    check = torch.randn(cfg.check_batch_size, 3, p.crop_size, p.crop_size, generator=generator)

    target.parent.mkdir(parents=True, exist_ok=True)
    export_model(model, cfg.format, target, sample)
    with torch.no_grad():
        expected = model(check)
    got = run_exported(cfg.format, target, check)
    max_diff = float((got - expected).abs().max())
    passed = bool(torch.allclose(got, expected, atol=cfg.atol, rtol=cfg.rtol))

    info = {
        "format": cfg.format,
        "file": target.name,
        "checkpoint": str(Path(cfg.ckpt_path).expanduser().resolve()),
        "architecture": model.hparams.get("name"),
        "input": {"name": "images", "shape": ["batch", 3, p.crop_size, p.crop_size], "dtype": "float32",
                  "layout": "NCHW, RGB, (pixel / 255 - mean) / std"},
        "output": {"name": "logits", "shape": ["batch", len(model.class_names)],
                   "note": "softmax gives class probabilities"},
        "class_names": list(model.class_names),
        "preprocessing": {
            "resize_size": p.resize_size, "crop_size": p.crop_size, "interpolation": p.interpolation,
            "mean": list(p.mean), "std": list(p.std),
            "steps": "resize the short side to resize_size, center-crop crop_size, scale to [0, 1], normalise",
        },
        "parity": {"passed": passed, "max_abs_diff": max_diff, "atol": cfg.atol, "rtol": cfg.rtol,
                   "batch_size": cfg.check_batch_size, "against": f"PyTorch {torch.__version__}"},
    }
    described.write_text(json.dumps(info, indent=2) + "\n")
    verdict = "passed" if passed else "FAILED"
    print(f"wrote {target} and {described.name}")
    print(f"parity check {verdict}: max |exported - pytorch| = {max_diff:.2e} on {cfg.check_batch_size} "
          f"images (atol={cfg.atol}, rtol={cfg.rtol})")
    if not passed:
        raise FinetuneError(
            f"the exported {target} differs from PyTorch by up to {max_diff:.2e} (atol={cfg.atol}); "
            "files kept for inspection; a real bug unless atol was set very tight"
        )
    return info


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
@user_errors_as_one_line
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
