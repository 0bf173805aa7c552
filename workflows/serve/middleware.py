"""ASGI middleware of the ingress: the API key and the body limit, both answered before FastAPI reads a body."""

from __future__ import annotations

import hmac
import json
import os

API_KEY_ENV = "MAV_API_KEY"
MAX_BODY_BYTES = 64 * 1024          # a request is a prompt and a few numbers
MAX_UPLOAD_BYTES = 32 * 1024 * 1024  # POST /v1/edits: a clip and its form fields


def _path(scope: dict) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


async def send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """Answer a whole ASGI request with ``body`` as JSON."""
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


class ApiKeyMiddleware:
    """With ``MAV_API_KEY`` set in the replica's environment, ``/v1/*`` needs ``Authorization: Bearer <key>``.

    The comparison takes constant time; the key is never logged or echoed.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        key = os.environ.get(API_KEY_ENV)
        if scope["type"] == "http" and key and _path(scope).startswith("/v1/"):
            given = b""
            for name, value in scope.get("headers", ()):
                if name == b"authorization" and value[:7].lower() == b"bearer ":
                    given = value[7:].strip()
            if not hmac.compare_digest(given, key.encode()):
                await send_json(send, 401, {"error": "missing or wrong API key (Authorization: Bearer <key>)"},
                                [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Bodies over ``max_bytes`` (``paths`` maps a path to its own limit) answer 413, whether announced by
    Content-Length or streamed."""

    def __init__(self, app, max_bytes: int, paths: dict[str, int] | None = None) -> None:
        self.app = app
        self.default = max_bytes
        self.paths = dict(paths or {})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.paths.get(_path(scope).rstrip("/"), self.default)
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and (not value.isdigit() or int(value) > limit):
                await self._too_large(send, limit)
                return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                await self._too_large(send, limit)
                return
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send, limit: int) -> None:
        await send_json(send, 413, {"error": f"request body over {limit} bytes"})
