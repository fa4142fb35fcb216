"""The model side of the server: LitServe's worker process runs `ClassifierAPI`.

Each request is decoded and transformed exactly as predict.py reads a file (`model_inputs`: the
checkpoint's decoder, then its eval transform), and a batch goes through the model's own
`predict_step` (TTA views, then softmax(logits / temperature); `models.py`), so served
probabilities equal predict.py's. A bad image is an answer, not an exception: LitServe's batched loop fails every
request of a batch when `decode_request` or `encode_response` raises for one of them, so a bad
upload would fail the good requests batched with it (tests/test_serve.py shows it).
"""

from __future__ import annotations

import base64
import binascii
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import litserve as ls
import torch
from PIL import Image
from starlette.responses import JSONResponse

from finetune.data.image_files import model_inputs, read_image
from finetune.errors import FinetuneError
from finetune.serve.models import file_sha256, load_served
from finetune.serve.request_body import error_response


@dataclass(frozen=True)
class BadImage:
    """A request whose bytes are not a usable image: answered with `status` and `reason`."""

    status: int
    reason: str


class ClassifierAPI(ls.LitAPI):
    """Top-k calibrated probabilities for one image per request, batched by LitServe."""

    def __init__(self, source: dict[str, str | None], top_k: int, max_pixels: int, identity: str,
                 max_batch_size: int, batch_timeout: float) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.source, self.top_k, self.max_pixels, self.identity = source, top_k, max_pixels, identity

    def setup(self, device: str) -> None:
        path = Path(str(self.source["ckpt_path"] or self.source["onnx"])).expanduser()
        if file_sha256(path) != self.identity:  # replaced since the server hashed it for /info
            raise FinetuneError(f"{path} changed while the server started; start it again")
        self.model = load_served(**self.source, device=device)
        self.inputs = model_inputs([], self.model.preprocessing)  # predict's decoder and transform
        self.names = self.model.class_names
        self.top_k = max(1, min(self.top_k, len(self.names)))
        Image.MAX_IMAGE_PIXELS = self.max_pixels  # larger: refused before decoding (see decode_request)

    # No annotations on decode_request/encode_response: LitServe builds the endpoint from them
    # (none: the JSON body that request_body.ImageBody made, and whatever Response we return).
    def decode_request(self, request):
        try:
            data = base64.b64decode(request["image"], validate=True)
        except (TypeError, KeyError, binascii.Error):
            return BadImage(400, "the request holds no image")
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; here it is a refusal.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                image, reason = read_image(data, self.inputs.loader, self.inputs.transform, self.inputs.shape)
            except Image.DecompressionBombWarning as e:
                image, reason = None, str(e)
        if image is not None:
            return image
        if "decompression bomb" in reason:
            return BadImage(413, f"the image has more than the server's max_pixels={self.max_pixels} "
                                 "pixels (a decompression bomb?); send a smaller image")
        return BadImage(400, f"not a usable image: {reason}")

    def batch(self, inputs: list[torch.Tensor | BadImage]) -> list[torch.Tensor | BadImage]:
        return inputs  # stacked in predict, without the bad ones

    def predict(self, x: Any) -> Any:
        items = x if isinstance(x, list) else [x]  # max_batch_size=1: one input, no batch()
        good = [i for i, item in enumerate(items) if isinstance(item, torch.Tensor)]
        out = list(items)
        if good:
            probs = self.model.probabilities(torch.stack([items[i] for i in good]))
            for i, row in zip(good, probs):
                out[i] = row
        return out if isinstance(x, list) else out[0]

    def unbatch(self, output: list[Any]) -> list[Any]:
        return output

    def encode_response(self, output):
        if isinstance(output, BadImage):
            return error_response(output.status, output.reason)
        top_p, top_i = output.topk(self.top_k)
        return JSONResponse({
            "predictions": [{"label": self.names[i], "probability": p}
                            for p, i in zip(top_p.tolist(), top_i.tolist())],
            "checkpoint": f"sha256:{self.identity}",
        })
