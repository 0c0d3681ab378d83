"""The ASGI layer every HTTP request passes first: API key, request-body limit, request counter.

Written as plain ASGI (not Starlette's BaseHTTPMiddleware) so that the endpoints receive the server's own `receive`
channel: that is what lets a non-streaming request see its client disconnect (`http.disconnect`) and cancel.
"""

import json
import secrets

from starlette.exceptions import HTTPException

DEFAULT_MAX_BODY_BYTES = 4 << 20  # a full-context prompt of any model we serve is far below this
OPEN_PATHS = {"/health"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    """The OpenAI error envelope. ASCII JSON: a message quoting the client's input (a lone surrogate, say) still
    encodes."""
    err = {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param, "code": code}
    return json.dumps({"error": err}).encode()


class Gate:
    def __init__(self, app, st, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.app, self.st, self.max_body_bytes = app, st, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        status = [None]

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.st.api_key and scope["path"] not in OPEN_PATHS and not self._key_ok(headers):
                return await _reply(counted_send, 401, "Incorrect or missing API key (send 'Authorization: "
                                    "Bearer KEY').", code="invalid_api_key")
            length = headers.get(b"content-length", b"0")
            if not length.isdigit() or int(length) > self.max_body_bytes:
                return await _reply(counted_send, 413, self._too_large(), code="request_too_large")
            await self.app(scope, self._limited(receive), counted_send)
        finally:
            route = getattr(scope.get("route"), "path", None)
            endpoint = route or ("auth" if status[0] == 401 else "other")
            self.st.metrics.requests.labels(endpoint, str(status[0] or 0)).inc()

    def _key_ok(self, headers: dict) -> bool:
        given = headers.get(b"authorization", b"")
        token = given[7:] if given[:7].lower() == b"bearer " else b""
        return secrets.compare_digest(token, self.st.api_key.encode())

    def _too_large(self) -> str:
        return f"request body larger than {self.max_body_bytes} bytes (--max-body-bytes)"

    def _limited(self, receive):
        """`receive` that refuses a body growing past the limit (chunked uploads carry no content-length)."""
        seen = [0]

        async def limited():
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.max_body_bytes:
                    raise HTTPException(413, self._too_large())
            return message

        return limited


async def _reply(send, status: int, message: str, code: str):
    body = error_body(status, message, code=code)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
