"""`python -m finetune.serve ckpt_path=PATH`: a trained classifier behind HTTP, with LitServe.

`api.py` is the model side (LitServe's worker process: decode, dynamic batches, calibrated
probabilities, exactly as predict.py computes them; `models.py`: a checkpoint, or an ONNX file
from export.py run by onnxruntime), `request_body.py` the HTTP side (size,
content type, multipart: what can be refused before the model sees it), `app.py` the server and
the entry point, `page.html` the page at `GET /`. Needs the `serve` extra (LitServe).
"""
