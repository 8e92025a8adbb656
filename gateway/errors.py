"""The one place that builds OpenAI-shaped error responses."""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from starlette.responses import Response


class ClientError(Exception):
    """Something the client sent that we refuse, with the status and OpenAI error fields to answer with."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param


def error_body(message: str, *, type: str, code: str | None = None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


def error_response(status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                   param: str | None = None, headers: Mapping[str, str] | None = None) -> Response:
    return Response(error_body(message, type=type, code=code, param=param), status_code=status,
                    media_type="application/json", headers=dict(headers or {}))


def from_client_error(e: ClientError, headers: Mapping[str, str] | None = None) -> Response:
    return error_response(e.status, e.message, type=e.type, code=e.code, param=e.param, headers=headers)
