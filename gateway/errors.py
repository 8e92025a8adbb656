"""One error hierarchy, and the one place that turns an error into an OpenAI-shaped response or SSE event.

    GatewayError
    ├── ClientError        4xx: what the client sent, and what to fix
    ├── UpstreamError      502 / 504: the upstream could not be reached, was too slow, or was unreadable
    ├── GuardUnavailable   503: the guard failed and the policy fails closed
    └── Overloaded         503 with Retry-After: too many requests in flight
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from starlette.responses import Response


class GatewayError(Exception):
    """A request's end, with the status and OpenAI error fields it is answered with."""

    def __init__(self, status: int, message: str, *, type: str, code: str | None = None,
                 param: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        return error_body(self.message, type=self.type, code=self.code, param=self.param)

    def response(self, headers: Mapping[str, str] | None = None) -> Response:
        return Response(self.body(), status_code=self.status, media_type="application/json",
                        headers={**(headers or {}), **self.headers})

    def event(self) -> bytes:
        """The same error once a stream's headers are sent: the openai SDK raises APIError on it."""
        return b"data: " + self.body() + b"\n\n"


class ClientError(GatewayError):
    """Something the client sent that we refuse (4xx)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None) -> None:
        super().__init__(status, message, type=type, code=code, param=param)


class UpstreamError(GatewayError):
    """The upstream could not be reached, did not answer in time, or answered what cannot be scored."""

    def __init__(self, status: int, message: str, *, code: str) -> None:
        super().__init__(status, message, type="upstream_error", code=code)


class GuardUnavailable(GatewayError):
    """The guard failed and the policy fails closed."""

    def __init__(self, stage: str, kind: str) -> None:
        outcome = ("the request was not completed" if stage == "prompt"
                   else "the answer (or the rest of it) was withheld")
        super().__init__(503, f"The guard model is unavailable ({kind}); {outcome} because this policy fails "
                              "closed.", type="guard_error", code="guard_unavailable")
        self.stage, self.kind = stage, kind


class Overloaded(GatewayError):
    """More requests in flight than the gateway is configured to hold."""

    def __init__(self, retry_after_s: int = 1) -> None:
        super().__init__(503, "The gateway is at its limit of requests in flight; retry shortly.",
                         type="server_error", code="overloaded", headers={"retry-after": str(retry_after_s)})


def error_body(message: str, *, type: str, code: str | None = None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


def error_response(status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                   param: str | None = None, headers: Mapping[str, str] | None = None) -> Response:
    return Response(error_body(message, type=type, code=code, param=param), status_code=status,
                    media_type="application/json", headers=dict(headers or {}))
