"""What `POST /predict` accepts, checked in the HTTP process before anything reaches the model.

LitServe hands its workers `await request.json()` (or a parsed form, whose spooled upload file
does not survive the trip to the worker process once it is on disk), so a raw image body would
be a 500 there. This ASGI middleware takes one image as the raw body (`Content-Type: image/*` or
`application/octet-stream`) or as the first file of a multipart upload, refuses what is too big,
empty or of another content type with a one-line JSON 4xx, and passes the image on as the JSON
`{"image": base64}` that `api.ClassifierAPI.decode_request` reads.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

RAW_TYPES = ("image/", "application/octet-stream")
HOW = ("send one image as the raw body (Content-Type: image/jpeg, image/png, ... or "
       "application/octet-stream) or as a multipart upload (curl -F file=@photo.jpg)")


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def error_response(status: int, message: str) -> JSONResponse:
    """The one shape of every refusal: `{"error": "<one line>"}`."""
    return JSONResponse({"error": " ".join(message.split())}, status_code=status)


class ImageBody:
    """Pure ASGI middleware for `POST path`: the body becomes `{"image": base64}` or a 4xx."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, path: str = "/predict") -> None:
        self.app, self.max_bytes, self.path = app, max_bytes, path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            image = await self._image(scope, receive)
        except BadRequest as e:
            await error_response(e.status, str(e))(scope, receive, send)
            return
        body = json.dumps({"image": base64.b64encode(image).decode("ascii")}).encode()
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await self.app({**scope, "headers": headers}, _replay(body, receive), send)

    async def _image(self, scope: Scope, receive: Receive) -> bytes:
        headers = dict(scope["headers"])
        content_type = headers.get(b"content-type", b"").decode("latin-1").lower()
        if not content_type.startswith((*RAW_TYPES, "multipart/form-data")):
            raise BadRequest(415, f"content type {content_type or 'none'!r} is not accepted: {HOW}")
        body = await self._body(headers, receive)
        if content_type.startswith("multipart/form-data"):
            body = await _first_file(scope, body)
        if not body:
            raise BadRequest(400, f"the request holds no image (empty body): {HOW}")
        return body

    async def _body(self, headers: dict[bytes, bytes], receive: Receive) -> bytes:
        too_big = BadRequest(413, f"the upload is over the max_bytes={self.max_bytes} limit; send a "
                                  "smaller image or start the server with a larger max_bytes=")
        declared = headers.get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise too_big
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise BadRequest(400, "the client disconnected before the body was complete")
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                raise too_big
            more = message.get("more_body", False)
        return b"".join(chunks)


async def _first_file(scope: Scope, body: bytes) -> bytes:
    """The bytes of the first file field of a multipart body (the field's name does not matter)."""
    request = Request({k: v for k, v in scope.items() if k != "app"}, _replay(body, None))
    try:
        form = await request.form(max_files=1, max_fields=16)
    except Exception as e:  # python-multipart's and Starlette's parse errors alike
        raise BadRequest(400, f"unreadable multipart body ({e}): {HOW}") from e
    try:
        files = [v for v in form.values() if isinstance(v, UploadFile)]
        if not files:
            raise BadRequest(400, f"the multipart body holds no file field: {HOW}")
        return await files[0].read()
    finally:
        await form.close()


def _replay(body: bytes, receive: Receive | None) -> Any:
    """A `receive` that gives `body` once, then waits on the real one (for the disconnect)."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if receive is None:
            return {"type": "http.disconnect"}
        return await receive()

    return replay
