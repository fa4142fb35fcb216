"""`python -m finetune.serve ckpt_path=PATH` (or `onnx=PATH.onnx`): build the LitServe server and run it.

The checkpoint is loaded once here, before any process starts, so a bad path or tta= is one
line and exit 2; the worker loads it again for itself. Its sha256 is the checkpoint's identity
in every answer, so a client can tell which weights answered.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from finetune.cli.config_source import entry_point
from finetune.errors import FinetuneError
from finetune.serve.models import file_sha256, load_served

log = logging.getLogger("finetune")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def model_info(cfg: DictConfig) -> dict[str, Any]:
    """What `GET /info` says about the model (under "model"); loading also checks the paths and tta."""
    served = load_served(cfg.ckpt_path, cfg.onnx, cfg.tta)
    path = Path(str(cfg.ckpt_path or cfg.onnx)).expanduser().resolve()
    return {
        **served.info, "classes": served.class_names, "preprocessing": served.preprocessing.as_dict(),
        "checkpoint": {"path": str(path), "sha256": file_sha256(path)},
        "batching": {"max_batch_size": cfg.max_batch_size, "batch_timeout": cfg.batch_timeout},
        "limits": {"max_bytes": cfg.max_bytes, "max_pixels": cfg.max_pixels},
    }


def build_server(cfg: DictConfig) -> Any:
    """The LitServer for `cfg` (not yet running)."""
    try:
        import litserve as ls
    except ImportError as e:
        raise FinetuneError("serving needs LitServe: pip install -e '.[serve]' (make install does)") from e
    from starlette.responses import HTMLResponse

    from finetune.serve.api import ClassifierAPI
    from finetune.serve.request_body import ImageBody

    if cfg.max_batch_size < 1 or cfg.batch_timeout < 0 or cfg.max_bytes < 1 or cfg.max_pixels < 1:
        raise FinetuneError("max_batch_size, max_bytes and max_pixels must be >= 1 and batch_timeout >= 0")
    info = model_info(cfg)
    source = {"ckpt_path": cfg.ckpt_path, "onnx": cfg.onnx, "tta": cfg.tta}
    api = ClassifierAPI(source, cfg.top_k, cfg.max_pixels, info["checkpoint"]["sha256"],
                        cfg.max_batch_size, cfg.batch_timeout)
    server = ls.LitServer(api, accelerator=cfg.accelerator, devices=1, timeout=cfg.timeout,
                          model_metadata=info, middlewares=[(ImageBody, {"max_bytes": cfg.max_bytes})])
    page = resources.files("finetune.serve").joinpath("page.html").read_text()
    # LitServe's own "/" says "litserve running"; the page replaces it.
    server.app.router.routes = [r for r in server.app.router.routes if getattr(r, "path", None) != "/"]
    server.app.add_api_route("/", lambda: HTMLResponse(page), methods=["GET"])
    return server


def exposure_warning(host: str) -> str | None:
    """What to say out loud when `host` is not loopback: other machines can reach the server."""
    if host in LOOPBACK:
        return None
    return (f"host={host}: the server is reachable from other machines, with no authentication; "
            "host=127.0.0.1 keeps it on this machine")


def serve(cfg: DictConfig) -> None:
    server = build_server(cfg)
    if warning := exposure_warning(cfg.host):
        log.warning(warning)
    log.info("serving %s on http://%s:%s (max_batch_size=%d, batch_timeout=%gs)", cfg.ckpt_path or cfg.onnx,
             cfg.host, cfg.port, cfg.max_batch_size, cfg.batch_timeout)
    server.run(host=cfg.host, port=cfg.port, num_api_servers=1, generate_client_file=False,
               log_level=cfg.log_level)


main = entry_point('serve', serve)


if __name__ == "__main__":
    main()
