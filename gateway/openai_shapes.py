"""The OpenAI chat request shape we validate before anything is scored or forwarded."""

from __future__ import annotations

from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.errors import ClientError
from gateway.texts import MEDIA_PARTS, TEXT_PARTS


class ContentPart(BaseModel):
    """A content part: a text type from the map in `texts` (scored) or a media type (forwarded).
    Any other type is refused: what it means to the model cannot be known, so it cannot be scored."""

    model_config = ConfigDict(extra="allow")
    type: StrictStr

    @model_validator(mode="after")
    def _known_type(self) -> ContentPart:
        key = TEXT_PARTS.get(self.type)
        if key is not None:
            if not isinstance(getattr(self, key, None), str):
                raise ValueError(f"a part of type '{self.type}' needs a string '{key}'")
        elif self.type not in MEDIA_PARTS:
            known = ", ".join(sorted([*TEXT_PARTS, *MEDIA_PARTS]))
            raise ValueError(f"part type '{self.type}' is not one GuardGate can score or forward; "
                             f"use one of {known}")
        return self


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: StrictStr
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content_shape(cls, v: Any) -> Any:
        if v is not None and not isinstance(v, (str, list)):
            raise ValueError("must be a string, an array of content parts, or null")
        return v


class ChatRequest(BaseModel):
    """The fields the gateway reads. Everything else is forwarded untouched (we forward the raw bytes)."""

    model_config = ConfigDict(extra="allow")
    model: StrictStr | None = None
    messages: list[Message] = Field(min_length=1)
    stream: StrictBool | None = False
    n: StrictInt | None = Field(None, ge=1, le=128)


def _param(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part in ("str", "none"):
            continue  # a pydantic union-branch label such as list[ContentPart], not part of the client's path
        else:
            out += ("." if out else "") + str(part)
    return out


def parse_chat_request(data: Any) -> ChatRequest:
    if not isinstance(data, dict):
        raise ClientError(400, "The request body must be a JSON object.")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as e:
        # With unions pydantic reports every branch; the deepest error is the one about the shape sent.
        first = max(e.errors(include_url=False), key=lambda err: len(err["loc"]))
        param = _param(tuple(first["loc"]))
        if first["type"] == "missing":
            msg = f"Missing required parameter: '{param}'."
        elif param == "messages" and first["type"] == "too_short":
            msg = "'messages' must contain at least one message."
        else:
            detail = first["msg"].removeprefix("Value error, ")
            msg = f"Invalid value for '{param}': {detail}."
        raise ClientError(400, msg, param=param, code="invalid_value" if first["type"] != "missing" else "missing_required_parameter") from None
