"""Write a classifier as ONNX or TorchScript and run the written file back, for the parity check.

ONNX goes through PyTorch's torch.export-based exporter (Lightning's `to_onnx`) as one
self-contained file; TorchScript through tracing (`to_torchscript`), which upstream has
deprecated in favour of torch.export but which C++/mobile runtimes still load.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning as L
import torch

from finetune.errors import FinetuneError

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
ONNX_PACKAGES = "format=onnx needs onnx, onnxscript and onnxruntime: pip install -e '.[export]'"


def export_model(model: L.LightningModule, fmt: str, path: Path, sample: torch.Tensor) -> None:
    model.eval()
    if fmt == "onnx":
        try:
            import onnxscript  # noqa: F401 - the dynamo exporter needs it
        except ImportError as e:
            raise FinetuneError(ONNX_PACKAGES) from e
        for name in ("onnxscript", "onnx_ir"):  # their per-pass INFO lines would bury the verdict
            logging.getLogger(name).setLevel(logging.WARNING)
        model.to_onnx(
            path, (sample,), dynamo=True, external_data=False, input_names=["images"],
            output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
        )
    else:
        with warnings.catch_warnings():
            # TorchScript's deprecation (torch's and Lightning's) is stated in the README instead.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            model.to_torchscript(path, method="trace", example_inputs=sample)


@torch.no_grad()
def run_exported(fmt: str, path: Path, images: torch.Tensor) -> torch.Tensor:
    """Logits from the exported file itself, not from the module it came from."""
    if fmt == "onnx":
        try:
            import onnxruntime
        except ImportError as e:
            raise FinetuneError(ONNX_PACKAGES) from e
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu")(images)
