"""Server-sent events: reading an upstream chat stream, collecting each choice's text, and
rewriting the stream so that a blocked choice releases nothing but its content_filter finish."""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.texts import (
    ANSWER_METADATA,
    CHOICE_FIELDS,
    ENVELOPE_FIELDS,
    BadShape,
    answer_text,
    check_identifier,
    strings,
)

# An event ends at a blank line: two line ends in a row, each CRLF, LF or CR (a CR is not the start of a CRLF).
_EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
_LINE = re.compile(rb"\r\n|\n|\r")
# Fields other than data are passed on as they came: only short ids, event names and comments (keep-alives).
_META_FIELD = re.compile(rb"(?:event|id|retry)(?::[ ]?[A-Za-z0-9_.:\-]{0,128})?|:[^\r\n]{0,128}")
MAX_EVENT_BYTES = 4 * 1024 * 1024


class StreamProtocolError(Exception):
    """The upstream stream carried data we cannot read, so cannot score."""


@dataclass(slots=True)
class SSEEvent:
    raw: bytes  # the event as received, with its blank-line terminator: re-emitted byte for byte when unchanged
    data: str | None  # the joined data lines; None for a comment-only event (a keep-alive)
    json: Any = None  # the parsed data, when it is JSON

    @property
    def is_done(self) -> bool:
        return self.data is not None and self.data.strip() == "[DONE]"


def _parse_event(raw: bytes) -> SSEEvent:
    data_lines = []
    for line in _LINE.split(raw):
        if line.startswith(b"data:"):
            value = line[5:]
            data_lines.append(value[1:] if value.startswith(b" ") else value)
        elif line and not _META_FIELD.fullmatch(line):
            # A line an SSE client may still show (a bare JSON body, a long comment or event name): we
            # cannot tell which choice it belongs to, so it cannot be scored.
            raise StreamProtocolError("upstream sent an SSE line that is neither data, a short field nor a "
                                      "short comment")
    if not data_lines:
        return SSEEvent(raw, None)
    data = b"\n".join(data_lines)
    event = SSEEvent(raw, data.decode("utf-8", errors="replace"))
    if not event.is_done:
        try:
            event.json = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise StreamProtocolError("upstream sent an SSE data line that is not JSON") from None
    return event


class SSEParser:
    """Incremental: feed bytes as they arrive, get whole events back."""

    def __init__(self) -> None:
        self._buf = b""
        self._scanned = 0  # the buffer before this holds no event end: never searched again
        self._started = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if not self._started and chunk:
            self._started = True
            chunk = chunk.removeprefix(b"\xef\xbb\xbf")  # a leading BOM, which SSE clients drop
        self._buf += chunk
        events: list[SSEEvent] = []
        while True:
            m = _EVENT_END.search(self._buf, max(0, self._scanned - 3))
            if not m:
                self._scanned = len(self._buf)
                if len(self._buf) > MAX_EVENT_BYTES:
                    raise StreamProtocolError(f"upstream sent an SSE event over {MAX_EVENT_BYTES} bytes")
                return events
            raw, self._buf = self._buf[: m.end()], self._buf[m.end():]
            self._scanned = 0
            if raw.strip():
                events.append(_parse_event(raw))

    def close(self) -> list[SSEEvent]:
        """Whatever is left when the upstream closes (a final event without its blank line)."""
        rest, self._buf = self._buf, b""
        return [_parse_event(rest + b"\n\n")] if rest.strip() else []


_DELTA_STRINGS = ("reasoning_content", "reasoning", "refusal")


@dataclass(slots=True)
class _ChoiceText:
    """One choice's answer so far, field by field, as the deltas built it."""

    fields: dict[str, list[str]] = field(default_factory=dict)  # reasoning, content, refusal, transcript, extras
    tool_calls: dict[int, dict[str, list[str]]] = field(default_factory=dict)
    function_call: dict[str, list[str]] = field(default_factory=dict)
    size: int = 0  # characters received so far, all fields together: what windows are measured in
    finished: bool = False

    def append(self, name: str, text: str) -> None:
        if text:
            self.fields.setdefault(name, []).append(text)
            self.size += len(text)

    def append_call(self, slot: dict[str, list[str]], fn: Any, where: str) -> None:
        if not isinstance(fn, dict):
            raise StreamProtocolError(f"upstream sent a {where} that is not an object")
        for name in ("name", "arguments"):
            value = fn.get(name)
            if value is not None and not isinstance(value, str):
                raise StreamProtocolError(f"upstream sent a {where}.{name} that is not a string")
            if value:
                slot.setdefault(name, []).append(value)
                self.size += len(value)

    def as_message(self) -> dict[str, Any]:
        """The answer so far as a whole message: `answer_text` of it is what a non-streamed answer gives."""
        def joined(parts: dict[str, list[str]], name: str) -> str:
            return "".join(parts.get(name, ()))
        message: dict[str, Any] = {name: "".join(parts) for name, parts in self.fields.items()}
        if "transcript" in message:
            message["audio"] = {"transcript": message.pop("transcript")}
        message["tool_calls"] = [{"function": {"name": joined(c, "name"), "arguments": joined(c, "arguments")}}
                                 for _, c in sorted(self.tool_calls.items())]
        if self.function_call:
            message["function_call"] = {"name": joined(self.function_call, "name"),
                                        "arguments": joined(self.function_call, "arguments")}
        return message


def choice_index(choice: dict[str, Any]) -> int:
    """A streamed choice's index (absent or null: 0), the one reading used by scoring and by release."""
    return _int(choice.get("index"), 0, "choice index")


def _int(value: Any, default: int, where: str) -> int:
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise StreamProtocolError(f"upstream sent a {where} that is not a non-negative integer")
    return value


def _add_delta(acc: _ChoiceText, delta: Any) -> None:
    """Every text of one delta, by the map in `texts`; a known field of the wrong shape is unreadable."""
    if not isinstance(delta, dict):
        raise StreamProtocolError("upstream sent a choice delta that is not an object")
    for key, value in delta.items():
        if value is None:
            continue
        if key in ANSWER_METADATA:
            check_identifier(value, f"delta.{key}")
            continue
        if key in _DELTA_STRINGS:
            if not isinstance(value, str):
                raise StreamProtocolError(f"upstream sent a delta.{key} that is not a string")
            acc.append(key, value)
        elif key == "content":
            if isinstance(value, str):
                acc.append("content", value)
            elif isinstance(value, list):  # content parts, as some providers stream them
                acc.append("content", answer_text({"content": value}))
            else:
                raise StreamProtocolError("upstream sent a delta.content that is neither a string nor a list")
        elif key == "audio":
            if not isinstance(value, dict) or not isinstance(value.get("transcript") or "", str):
                raise StreamProtocolError("upstream sent a delta.audio that is not an object")
            check_identifier(value.get("id"), "delta.audio.id")
            acc.append("transcript", value.get("transcript") or "")
        elif key == "tool_calls":
            if not isinstance(value, list):
                raise StreamProtocolError("upstream sent a delta.tool_calls that is not a list")
            for call in value:
                if not isinstance(call, dict):
                    raise StreamProtocolError("upstream sent a tool call delta that is not an object")
                check_identifier(call.get("id"), "tool call id")
                check_identifier(call.get("type"), "tool call type")
                slot = acc.tool_calls.setdefault(_int(call.get("index"), 0, "tool call index"), {})
                if call.get("function") is not None:
                    acc.append_call(slot, call["function"], "tool call function")
                for k, v in call.items():
                    if k not in ("index", "id", "type", "function"):
                        acc.append(k, "".join(strings(v)))
        elif key == "function_call":
            acc.append_call(acc.function_call, value, "delta.function_call")
        else:  # not in the map: scored as text all the same
            acc.append(key, "".join(strings(value)))


class ChoiceTexts:
    """Accumulates what each choice of a stream has said so far, by the answer map in `texts`."""

    def __init__(self) -> None:
        self._choices: dict[int, _ChoiceText] = {}

    def add(self, event: SSEEvent) -> dict[int, tuple[int, bool]]:
        """Take one event; for each choice it carries: (that choice's size after it, whether it finished it).
        Raises StreamProtocolError for a chunk whose shape cannot be read (so its text cannot be scored)."""
        try:
            return self._add(event)
        except BadShape as e:
            raise StreamProtocolError(f"upstream sent an unreadable chunk ({e})") from None

    def _add(self, event: SSEEvent) -> dict[int, tuple[int, bool]]:
        chunk = event.json
        touched: dict[int, tuple[int, bool]] = {}
        if event.data is None or event.is_done:
            return touched
        if not isinstance(chunk, dict):
            raise StreamProtocolError("upstream sent a stream event that is not a JSON object")
        if "error" in chunk:  # its message is the upstream's text, not ours to pass on unscored
            raise StreamProtocolError("upstream reported an error in the stream")
        choices = chunk.get("choices")
        if choices is not None and not isinstance(choices, list):
            raise StreamProtocolError("upstream sent 'choices' that is not a list")
        # Text outside the choices belongs to none of them: it is scored with each choice of its chunk.
        envelope_text = "".join(s for k, v in chunk.items() if k not in ENVELOPE_FIELDS for s in strings(v))
        if envelope_text and not choices:
            choices = [{"index": 0}]
        for choice in choices or []:
            if not isinstance(choice, dict):
                raise StreamProtocolError("upstream sent a choice that is not an object")
            index = choice_index(choice)
            check_identifier(choice.get("finish_reason"), "finish_reason")
            acc = self._choices.setdefault(index, _ChoiceText())
            acc.append("envelope", envelope_text)
            if choice.get("delta") is not None:
                _add_delta(acc, choice["delta"])
            if choice.get("message") is not None:  # some servers repeat the whole message in a chunk
                if not isinstance(choice["message"], dict):
                    raise StreamProtocolError("upstream sent a choice message that is not an object")
                try:
                    acc.append("message", answer_text(choice["message"]))
                except BadShape as e:
                    raise StreamProtocolError(f"upstream sent an unreadable choice message ({e})") from None
            for key, value in choice.items():
                if key not in CHOICE_FIELDS and key not in ("delta", "message") and value is not None:
                    # not in the map: scored all the same
                    acc.append(key, "".join(strings(value)))
            if choice.get("finish_reason") is not None:
                acc.finished = True
            touched[index] = (acc.size, acc.finished)
        return touched

    def indexes(self) -> list[int]:
        return sorted(self._choices)

    def size(self, index: int) -> int:
        return self._choices[index].size if index in self._choices else 0

    def finished(self, index: int) -> bool:
        return index in self._choices and self._choices[index].finished

    def text(self, index: int) -> str:
        """One choice's answer so far, in the same form as a non-streamed answer's (so verdicts match)."""
        return answer_text(self._choices[index].as_message()) if index in self._choices else ""

    def texts(self) -> dict[int, str]:
        return {i: self.text(i) for i in sorted(self._choices)}


def _event_bytes(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _rewritten(chunk: dict[str, Any], choices: list[Any]) -> dict[str, Any]:
    """A chunk that lost a blocked choice: the kept choices, and none of the chunk's fields outside the map
    (their text was scored with the blocked choice)."""
    return {**{k: v for k, v in chunk.items() if k in ENVELOPE_FIELDS}, "choices": choices}


def _content_filter_chunk(envelope: dict[str, Any], index: int) -> dict[str, Any]:
    chunk: dict[str, Any] = {k: envelope[k] for k in ("id", "object", "created", "model", "system_fingerprint")
                             if k in envelope}
    chunk["choices"] = [{"index": index, "delta": {}, "logprobs": None, "finish_reason": "content_filter"}]
    return chunk


def withhold_choices(events: Iterable[SSEEvent], blocked: set[int]) -> Iterator[bytes]:
    """Re-emit a held stream with the blocked choices' text removed.

    A blocked choice keeps only its role announcement and ends with `finish_reason: content_filter`;
    every other byte is passed on as it came. The stream ends with `data: [DONE]`.
    """
    finished: set[int] = set()
    envelope: dict[str, Any] = {"object": "chat.completion.chunk"}

    def pending_finishes() -> Iterator[bytes]:
        for i in sorted(blocked - finished):
            finished.add(i)
            yield _event_bytes(_content_filter_chunk(envelope, i))

    for event in events:
        chunk = event.json
        if event.is_done:
            yield from pending_finishes()
            yield event.raw
            return
        if not isinstance(chunk, dict):
            yield event.raw
            continue
        choices = chunk.get("choices") or []
        if choices:
            envelope = chunk
        outside = any(k not in ENVELOPE_FIELDS for k in chunk)  # scored with every choice, or choice 0
        carried = {choice_index(c) for c in choices} or ({0} if outside else set())
        if not carried & blocked:
            yield event.raw
            continue
        kept = []
        for choice in choices:
            index = choice_index(choice)
            if index not in blocked:
                kept.append(choice)
            elif choice.get("finish_reason") is not None and index not in finished:
                finished.add(index)
                kept.append({"index": index, "delta": {}, "logprobs": None, "finish_reason": "content_filter"})
            elif (choice.get("delta") or {}).get("role"):
                kept.append({"index": index, "delta": {"role": choice["delta"]["role"], "content": ""},
                             "logprobs": None, "finish_reason": None})
        if kept or chunk.get("usage"):
            yield _event_bytes(_rewritten(chunk, kept))
    yield from pending_finishes()
    yield b"data: [DONE]\n\n"


_SENTENCE_ENDS = ".!?;:\n。！？；"


def release_point(text: str, size: int) -> int:
    """Where an approved window's release stops: after the last sentence end in text[:size] (else the last
    space), so a harmful sentence cut by the window's edge is not half released; the tail waits for the
    next check, which reads it whole."""
    head = text[:size]
    for i in range(len(head) - 1, -1, -1):
        if head[i] in _SENTENCE_ENDS and (i + 1 == len(head) or head[i + 1].isspace() or head[i] == "\n"
                                          or head[i] in "。！？；"):
            return i + 1
    space = max(head.rfind(" "), head.rfind("\t"))
    return space + 1 if space > 0 else size


@dataclass(slots=True)
class _Held:
    event: SSEEvent
    needs: dict[int, tuple[int, bool]]  # choice → (its size after this event, whether this event finishes it)


class HoldBack:
    """Releases a stream in order, each event only once every choice text in it has been approved.

    A choice's text is approved up to a size when the answer so far, up to that size, was scored as
    allowed; its finish chunk needs the whole answer approved. A blocked choice keeps what was approved
    before the flagged window; the rest of its text is dropped and its next held event becomes a
    `finish_reason: content_filter` chunk. Pure bookkeeping: the caller scores and says what was approved.
    """

    def __init__(self, *, require_final: bool = False) -> None:
        # require_final: a choice's finish waits for an approval marked final (the check of its whole
        # answer), not merely for approved text that happens to cover it.
        self.require_final = require_final
        self.texts = ChoiceTexts()
        self._held: deque[_Held] = deque()
        self._approved: dict[int, int] = {}
        self._final: set[int] = set()  # choices whose whole answer is approved
        self._blocked: dict[int, int] = {}  # choice → size approved before the flagged window
        self._filtered: set[int] = set()  # blocked choices whose content_filter chunk was emitted
        self._envelope: dict[str, Any] = {"object": "chat.completion.chunk"}
        self.ended = False  # the upstream stream is over
        self._done_sent = False

    def add(self, event: SSEEvent) -> None:
        if isinstance(event.json, dict) and isinstance(event.json.get("choices"), list):
            self._envelope = event.json
        self._held.append(_Held(event, self.texts.add(event)))

    def approve(self, index: int, size: int, *, final: bool = True) -> None:
        if index in self._blocked:
            return
        self._approved[index] = max(self._approved.get(index, 0), size)
        if (final or not self.require_final) and self.complete(index) \
                and self._approved[index] >= self.texts.size(index):
            self._final.add(index)

    def complete(self, index: int) -> bool:
        """This choice will say nothing more: it finished, or the upstream stream is over."""
        return self.ended or self.texts.finished(index)

    def end(self) -> None:
        """The upstream is over: every choice's answer is now complete as it stands."""
        self.ended = True
        for index in [] if self.require_final else self.texts.indexes():
            if index not in self._blocked and self._approved.get(index, 0) >= self.texts.size(index) \
                    and index in self._approved:
                self._final.add(index)

    def block(self, index: int) -> None:
        if index not in self._blocked:
            self._blocked[index] = self._approved.get(index, 0)

    @property
    def blocked(self) -> set[int]:
        return set(self._blocked)

    def held_chars(self) -> int:
        """Characters received and not yet approved, over the choices still open (for the metrics)."""
        return sum(max(0, self.texts.size(i) - self._approved.get(i, 0)) for i in self.texts.indexes()
                   if i not in self._blocked)

    def settled(self, index: int) -> bool:
        """Nothing more to decide for this choice: its whole answer is approved, or it is blocked."""
        return index in self._final or index in self._blocked

    def _ready(self, held: _Held) -> bool:
        if held.event.is_done:
            return self.ended and all(self.settled(i) for i in self.texts.indexes())
        for index, (size, finishes) in held.needs.items():
            if index in self._blocked:
                continue  # approved text is released, the rest is dropped: never waits
            if size > self._approved.get(index, 0) or (finishes and index not in self._final):
                return False
        return True

    def release(self) -> Iterator[bytes]:
        """Every event at the front of the stream that may go to the client now, in order."""
        while self._held and self._ready(self._held[0]):
            held = self._held.popleft()
            if held.event.is_done:
                yield from self._pending_filters()
                self._done_sent = True
                yield held.event.raw
                continue
            dropped = {i for i, (size, _) in held.needs.items() if i in self._blocked and size > self._blocked[i]}
            if not dropped:
                yield held.event.raw
                continue
            chunk = held.event.json
            kept = []
            for choice in chunk.get("choices") or []:
                index = choice_index(choice)
                if index not in dropped:
                    kept.append(choice)
                elif index not in self._filtered:
                    self._filtered.add(index)
                    kept.append({"index": index, "delta": {}, "logprobs": None, "finish_reason": "content_filter"})
            if kept or chunk.get("usage"):
                yield _event_bytes(_rewritten(chunk, kept))

    def _pending_filters(self) -> Iterator[bytes]:
        for index in sorted(set(self._blocked) - self._filtered):
            self._filtered.add(index)
            yield _event_bytes(_content_filter_chunk(self._envelope, index))

    def finish(self, *, done: bool = True) -> Iterator[bytes]:
        """The upstream is over (or was cut): release what may be, drop what never can (text no check
        approved), and end with content_filter finishes for blocked choices and, if `done`, `data: [DONE]`."""
        self.end()
        yield from self.release()
        self._held.clear()
        yield from self._pending_filters()
        if done and not self._done_sent:
            self._done_sent = True
            yield b"data: [DONE]\n\n"
