"""The connection guard of `mlflow models serve`: uvicorn's HTTP protocol with deadlines, and bodies read
against the served model's byte limit before MLflow's app sees them.

`mlflow models serve` runs uvicorn, which closes a keep-alive connection left idle after a response
(`--timeout-keep-alive`, 5 s) but has no deadline for a connection that never sends a request, nor for
request headers sent a byte at a time (each byte restarts its idle timer: slowloris), and MLflow's app
reads a body whole, whatever its size, before anything checks it. uvicorn takes its HTTP protocol class
from its `--http` setting, which the serve command passes on through the environment:

    UVICORN_HTTP=imgclf.connection:GuardedH11Protocol mlflow models serve -m ... --env-manager local

With it, for a served ImageClassifier (its limits are the `serve` section stored with the model):
- a connection that sends nothing is closed after uvicorn's keep-alive timeout, as after a response;
- a request's line and headers must arrive within `serve.header_timeout_s` of the connection opening (or
  of the previous response), however they trickle in; the connection is closed otherwise;
- a body over `serve.max_request_bytes` is refused (413, connection closed) from its Content-Length before
  a byte of it is read, and without one (chunked) reading stops at the limit; the body must arrive within
  MLflow's request timeout (`mlflow models serve -t`, 60 s by default) (408);
- the request's `abandoned` event (serving.ABANDONED) is set when the client goes away or the answer is
  given (MLflow's timeout answers 504 while the work goes on in a thread), so decoding stops.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import h11
from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
from uvicorn.protocols.http.h11_impl import H11Protocol

from imgclf.serving import ABANDONED, served_limits


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with a header deadline and `BodyLimit` in front of the app."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.app = BodyLimit(self.app)
        self.header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # uvicorn arms its idle timer only once a response is complete: arm it for the first request too.
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)
        self.arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the request's headers are in
            self.disarm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:  # waiting for the next one
            self.arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm_header_deadline()
        super().connection_lost(exc)

    def arm_header_deadline(self) -> None:
        limits = served_limits()
        self.disarm_header_deadline()
        if limits is not None:
            self.header_deadline = self.loop.call_later(limits.header_timeout_s, self.headers_too_slow)

    def disarm_header_deadline(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None

    def headers_too_slow(self) -> None:
        if not self.transport.is_closing():
            self.logger.info("closing a connection that sent no complete request headers in time")
            self.transport.close()


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: the request body read up to `serve.max_request_bytes` (from the served model's
    limits), then handed on whole; the request's abandoned event set when the client goes away or the
    app has answered."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        limits = served_limits()
        if scope["type"] != "http" or limits is None:
            return await self.app(scope, receive, send)
        limit = limits.max_request_bytes
        declared = content_length(scope["headers"])
        if declared is not None and (declared < 0 or declared > limit):
            size = "too long" if declared < 0 else f"{declared:,} bytes"
            message = f"the request body (Content-Length) is {size}, over the limit of {limit:,}"
            return await refuse(send, 413, "RESOURCE_EXHAUSTED", message)
        timeout = MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()
        try:
            body = await asyncio.wait_for(read_body(receive, limit), timeout)
        except BodyTooLarge:
            return await refuse(
                send, 413, "RESOURCE_EXHAUSTED", f"the request body is over the limit of {limit:,} bytes"
            )
        except (asyncio.TimeoutError, TimeoutError):
            return await refuse(send, 408, "DEADLINE_EXCEEDED", f"the request body did not arrive within {timeout} s")
        if body is None:  # the client went away
            return None
        abandoned, gone = threading.Event(), asyncio.Event()

        async def watch() -> None:  # the server says http.disconnect once the client is gone
            while (await receive())["type"] != "http.disconnect":
                pass
            abandoned.set()
            gone.set()

        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        watcher = asyncio.ensure_future(watch())
        token = ABANDONED.set(abandoned)
        try:
            await self.app(scope, replay, send)
        finally:
            abandoned.set()  # answered (or failed): work still running for it is wasted
            watcher.cancel()
            ABANDONED.reset(token)


def content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The declared body size; -1 for a value too long to be a size (h11 has checked it is digits)."""
    for name, value in headers:
        if name == b"content-length":
            return int(value) if len(value) <= 18 else -1
    return None


async def read_body(receive: Any, limit: int) -> bytes | None:
    """The whole body, None if the client goes away first; BodyTooLarge as soon as it passes `limit`."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def refuse(send: Any, status: int, code: str, message: str) -> None:
    """A short JSON error, and the connection closed: the rest of the body is never read."""
    body = json.dumps({"error_code": code, "message": message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
