"""Every text a chat request or answer carries, in one map.

The request side: each message is one text. System, developer, user, tool (and any other non-assistant
role) texts are scored in the card's prompt template; an assistant message in the history is scored in its
response template with the user turn before it, exactly as the gateway scored that answer when it released
it. The answer side: everything a reader of a choice would see, in one text per choice.

A field is either in the map (scored), known to carry no text (ids, roles, media), or unknown: an unknown
message or answer field is scored as text (its strings, keys included); an unknown content-part type is
refused with a 400 naming it, because its meaning to the model cannot be known.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.errors import ClientError
from gateway.guard.base import GuardInput

# Content-part types that carry text, and the field that holds it (what vLLM's chat parser reads).
TEXT_PARTS: dict[str, str] = {"text": "text", "input_text": "text", "output_text": "text",
                              "thinking": "thinking", "refusal": "refusal", "tool_reference": "name"}
# Content-part types forwarded unscored: media, reported in `x-guard-non-text`.
MEDIA_PARTS = frozenset({"image_url", "input_image", "input_audio", "audio_url", "video_url", "file",
                         "input_file", "image_embeds", "audio_embeds"})
# Message fields that carry no text a model reads as such.
MESSAGE_METADATA = frozenset({"role", "tool_call_id"})  # identifiers (checked), not text
# Answer fields in the map, in the order a stream sends them; the order of the scored text.
ANSWER_FIELDS = ("reasoning_content", "reasoning", "content", "refusal", "audio", "tool_calls", "function_call")
ANSWER_METADATA = frozenset({"role"})
# Choice fields around the message: any other (a completions-style `text`, `stop_reason`'s stop string, a
# vendor field) is scored too.
CHOICE_FIELDS = frozenset({"index", "logprobs", "finish_reason"})  # and `message` (whole) or `delta` (streamed)
# Top-level fields of a completion or chunk; the strings of any other are scored with every choice in it.
ENVELOPE_FIELDS = frozenset({"id", "object", "created", "model", "system_fingerprint", "choices", "usage",
                             "service_tier", "obfuscation"})
# Request fields outside `messages` whose text the model reads (tool and schema descriptions, predicted
# output, vLLM's RAG documents, per-request chat template and its variables): each scored as one prompt text.
REQUEST_TEXT_FIELDS = ("tools", "functions", "response_format", "prediction", "documents", "chat_template",
                       "chat_template_kwargs")
# Roles, ids, types and finish reasons are passed on unscored, so they may only look like identifiers.
_IDENTIFIER = re.compile(r"[A-Za-z0-9_.:\-]{0,128}")

Scope = Literal["conversation", "last_user_turn"]


class BadShape(ValueError):
    """An answer field has a shape we cannot read, so cannot score."""


def check_identifier(value: Any, where: str) -> None:
    """Raises BadShape unless `value` is absent or a short identifier (it is released unscored)."""
    if value is not None and not (isinstance(value, str) and _IDENTIFIER.fullmatch(value)):
        raise BadShape(f"{where} is not an identifier (at most 128 of A-Z a-z 0-9 _ . : -)")


def strings(value: Any) -> Iterator[str]:
    """Every string in a JSON value, dict keys included, depth first (without recursion: JSON may nest
    a thousand levels deep)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            yield v
        elif isinstance(v, dict):
            for k, item in reversed(v.items()):
                stack.append(item)
                stack.append(str(k))
        elif isinstance(v, list):
            stack.extend(reversed(v))


def _join(parts: list[str]) -> str:
    return "\n".join(p for p in parts if p)


# ----- the request -----

def _part_text(part: Mapping[str, Any]) -> str | None:
    """A content part's text; None for media. Validation (`openai_shapes`) refused every other type."""
    key = TEXT_PARTS.get(part.get("type"))  # type: ignore[arg-type]
    return part.get(key) if key else None


def content_texts(content: Any) -> list[str]:
    """The texts of a message's content: the string, or its text parts in order."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [t for p in content if isinstance(p, dict) and isinstance(t := _part_text(p), str)]
    return []


def message_text(message: Mapping[str, Any]) -> str:
    """What one non-assistant message says: its name, its content, and any field not in the map."""
    parts = [message["name"]] if isinstance(message.get("name"), str) else []
    parts += content_texts(message.get("content"))
    for key, value in message.items():
        if key not in MESSAGE_METADATA and key not in ("name", "content"):
            parts += strings(value)
    return _join(parts)


def media_parts(messages: list[Mapping[str, Any]]) -> list[str]:
    """The media part types the request carries (forwarded unscored)."""
    return sorted({p["type"] for m in messages if isinstance(m.get("content"), list)
                   for p in m["content"] if isinstance(p, dict) and p.get("type") in MEDIA_PARTS})


@dataclass
class RequestTexts:
    """What the prompt stage scores for one request, and the user turn an answer to it is scored with."""

    inputs: list[GuardInput] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # where each text is: "messages[2]", "tools"
    context: str = ""  # the last user turn: the [User] of the answer's response template
    media: list[str] = field(default_factory=list)


def request_texts(body: Mapping[str, Any], scope: Scope = "conversation") -> RequestTexts:
    """The texts of a validated chat request (see `openai_shapes.parse_chat_request`)."""
    messages: list[Mapping[str, Any]] = body["messages"]
    out = RequestTexts(media=media_parts(messages))
    last_user = ""
    seen: set[GuardInput] = set()

    def add(label: str, item: GuardInput) -> None:
        if item not in seen and (item.assistant if item.stage == "response" else item.user):
            seen.add(item)
            out.inputs.append(item)
            out.labels.append(label)

    for i, message in enumerate(messages):
        try:
            check_identifier(message.get("role"), "its role")
            check_identifier(message.get("tool_call_id"), "its tool_call_id")
        except BadShape as e:
            raise ClientError(400, f"Invalid value for 'messages[{i}]': {e}.", param=f"messages[{i}]",
                              code="invalid_value") from None
        if message.get("role") == "assistant":
            if scope == "conversation":
                try:
                    answer = answer_text(message)
                except BadShape as e:
                    raise ClientError(400, f"Invalid value for 'messages[{i}]': "
                                           f"{str(e).replace('message.', 'its ', 1)}.", param=f"messages[{i}]",
                                      code="invalid_value") from None
                add(f"messages[{i}]", GuardInput("response", last_user, answer))
            continue
        text = message_text(message)
        if message.get("role") == "user":
            last_user = text
        if scope == "conversation":
            add(f"messages[{i}]", GuardInput("prompt", text))
    out.context = last_user
    if scope == "last_user_turn":  # the last user message (or the last message, if no user spoke)
        add("messages", GuardInput("prompt", last_user or message_text(messages[-1])))
    else:
        for name in REQUEST_TEXT_FIELDS:
            if body.get(name) is not None:
                add(name, GuardInput("prompt", _join(list(strings(body[name])))))
    return out


# ----- the answer -----

def _call_text(fn: Any, where: str) -> str:
    if not isinstance(fn, dict):
        raise BadShape(f"{where} is not an object")
    name, args = fn.get("name") or "", fn.get("arguments") or ""
    if not isinstance(name, str) or not isinstance(args, str):
        raise BadShape(f"{where} has a name or arguments that are not strings")
    return f"{name}({args})"


def answer_text(message: Mapping[str, Any]) -> str:
    """Everything in an assistant message a reader would see, as one text. Raises BadShape."""
    parts: list[str] = []
    check_identifier(message.get("role"), "message.role")
    for key in ("reasoning_content", "reasoning", "refusal"):
        value = message.get(key)
        if value is not None and not isinstance(value, str):
            raise BadShape(f"message.{key} is not a string")
    parts += [message.get("reasoning_content") or "", message.get("reasoning") or ""]
    content = message.get("content")
    if isinstance(content, list):
        for part in content:  # some providers answer with content parts
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") in TEXT_PARTS:
                parts += strings(part.get(TEXT_PARTS[part["type"]]))
            else:  # any other part: every string in it
                parts += strings(part)
    elif isinstance(content, str):
        parts.append(content)
    elif content is not None:
        raise BadShape("message.content is neither a string, a list nor null")
    parts.append(message.get("refusal") or "")
    audio = message.get("audio")
    if audio is not None:
        if not isinstance(audio, dict) or not isinstance(audio.get("transcript") or "", str):
            raise BadShape("message.audio is not an object with a string transcript")
        check_identifier(audio.get("id"), "message.audio.id")
        parts.append(audio.get("transcript") or "")
    calls = message.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise BadShape("message.tool_calls is not a list")
        for j, call in enumerate(calls):
            if not isinstance(call, dict):
                raise BadShape(f"message.tool_calls[{j}] is not an object")
            check_identifier(call.get("id"), f"message.tool_calls[{j}].id")
            check_identifier(call.get("type"), f"message.tool_calls[{j}].type")
            if call.get("function") is not None:
                parts.append(_call_text(call["function"], f"message.tool_calls[{j}].function"))
            parts += (s for k, v in call.items() if k not in ("id", "type", "index", "function") for s in strings(v))
    if message.get("function_call") is not None:
        parts.append(_call_text(message["function_call"], "message.function_call"))
    for key, value in message.items():
        if key not in ANSWER_FIELDS and key not in ANSWER_METADATA:
            parts += strings(value)
    return _join(parts)


def choice_answer(choice: Any, position: int) -> tuple[int, str]:
    """A whole (non-streamed) choice's index and answer text. Raises BadShape."""
    if not isinstance(choice, dict):
        raise BadShape(f"choices[{position}] is not an object")
    index = choice.get("index", position)
    if not isinstance(index, int) or isinstance(index, bool):
        raise BadShape(f"choices[{position}].index is not an integer")
    check_identifier(choice.get("finish_reason"), f"choices[{position}].finish_reason")
    message = choice.get("message")
    if message is not None and not isinstance(message, dict):
        raise BadShape(f"choices[{position}].message is not an object")
    text = answer_text(message) if message else ""
    outside = (s for k, v in choice.items() if k not in CHOICE_FIELDS and k != "message" for s in strings(v))
    return index, _join([text, *outside])


def withhold_choice(choice: dict[str, Any]) -> None:
    """Blank a blocked choice in place: no text, no tool calls, no logprobs, finish_reason content_filter."""
    if isinstance(choice.get("message"), dict):
        choice["message"] = {"role": choice["message"].get("role", "assistant"), "content": None}
    for key in [k for k in choice if k not in CHOICE_FIELDS and k != "message"]:
        del choice[key]
    choice["logprobs"] = None
    choice["finish_reason"] = "content_filter"
