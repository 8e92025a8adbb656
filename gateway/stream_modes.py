"""How a streamed answer reaches the client: windowed (default), buffered, or audit.

Each takes the upstream's open event stream and yields the bytes the client may have. Scoring goes through
the `Moderator` (the gateway's one moderation step), so verdicts, logs and the cache are the same as
everywhere else.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import httpx

from gateway import metrics
from gateway.errors import GuardUnavailable, UpstreamError
from gateway.guard.base import GuardInput
from gateway.moderation import Moderator, Report
from gateway.streaming import (
    ChoiceTexts,
    HoldBack,
    SSEEvent,
    SSEParser,
    StreamProtocolError,
    release_point,
    withhold_choices,
)


async def close_upstream(resp: httpx.Response) -> None:
    """Close the upstream, also while the stream is being cancelled (the client hung up): Starlette cancels
    it through an anyio cancel scope, and the shield lets this close run to its end inside that scope."""
    with anyio.CancelScope(shield=True):
        await resp.aclose()


async def read_events(resp: httpx.Response) -> AsyncIterator[SSEEvent]:
    """The upstream's events as they arrive. Raises httpx.HTTPError or StreamProtocolError."""
    parser = SSEParser()
    async for chunk in resp.aiter_bytes():
        for event in parser.feed(chunk):
            yield event
    for event in parser.close():
        yield event


def upstream_stream_failure(e: Exception) -> UpstreamError:
    """What a broken or unreadable upstream stream means to the client: a 502 before anything was sent,
    the same error as an event after."""
    if isinstance(e, StreamProtocolError):
        return UpstreamError(502, f"{e}; what follows was withheld because it cannot be scored.",
                             code="upstream_bad_response")
    return UpstreamError(502, f"The upstream stream broke off ({type(e).__name__}).", code="upstream_stream_error")


async def windowed(moderator: Moderator, report: Report, resp: httpx.Response, context: str,
                   choices: int, keep_usage: bool = False) -> AsyncIterator[bytes]:
    """Release text only once the answer so far has been scored as allowed.

    A check scores the whole answer so far (with the prompt, the card's response template). The first comes
    at `first_window` characters, to cut the time to first token; then one window check per choice is in
    flight at a time while reading goes on, and the next starts as soon as it ends and `window` new
    characters wait. With a slow guard a window is therefore what arrived during the last check, and the
    client gets a piece about every guard call (with a fast one, every `window` characters). The check of
    the whole answer starts as soon as the answer is complete, without waiting for a window check still in
    flight (whose text it covers).
    """
    settings = report.policy.response
    window, first = settings.window, min(settings.first_window, settings.window)
    hold = HoldBack(require_final=settings.window_reasoning != settings.reasoning)
    changed = asyncio.Event()
    checked: dict[int, int] = {}  # choice → size of the answer its last check covered
    inflight: dict[int, asyncio.Task[None]] = {}  # window checks, at most one per choice
    finals: dict[int, asyncio.Task[None]] = {}  # checks of a complete answer
    final_started: set[int] = set()
    failures: list[bytes] = []  # the error event that ends the stream, if any
    upstream_error: list[Exception] = []

    async def read() -> None:
        try:
            async for event in read_events(resp):
                hold.add(event)
                changed.set()
        except (httpx.HTTPError, StreamProtocolError) as e:
            upstream_error.append(e)
        finally:
            hold.end()
            changed.set()

    async def check(index: int, size: int, text: str, final: bool) -> None:
        tasks = finals if final else inflight
        try:
            decisions = await moderator.judge(report, "response", [GuardInput("response", context, text)], [index],
                                              reasoning=settings.reasoning if final else settings.window_reasoning)
            if hold.settled(index):
                pass  # the check of the whole answer, which covers this text, has decided already
            elif decisions is not None and decisions[0].outcome == "block":
                hold.block(index)
                report.blocked_choices.add(index)
            else:  # allowed, flagged, shadowed, or fail-open: released
                whole = final or (hold.complete(index) and size >= hold.texts.size(index))
                cut = size if whole else release_point(text, size)
                hold.approve(index, cut, final=final)
                if cut < size and checked.get(index) == size:
                    checked[index] = cut  # the held tail is checked again, whole, with what follows it
                if final and index in inflight:
                    inflight.pop(index).cancel()  # a prefix of what was just approved
        except GuardUnavailable as e:
            if not hold.settled(index):
                failures.append(e.event())
        finally:
            if tasks.get(index) is asyncio.current_task():
                tasks.pop(index)
            changed.set()

    def start(index: int, final: bool) -> None:
        size = hold.texts.size(index)
        if final:
            final_started.add(index)
        else:
            checked[index] = size
        (finals if final else inflight)[index] = asyncio.create_task(
            check(index, size, hold.texts.text(index), final))

    def schedule() -> None:
        for index in hold.texts.indexes():
            if hold.settled(index):
                continue
            size, done = hold.texts.size(index), checked.get(index, 0)
            if hold.complete(index) and size == 0:
                hold.approve(index, 0)  # an empty answer: nothing to score
            elif hold.complete(index):
                if index not in final_started and (size > done or hold.require_final):
                    start(index, final=True)
                # else the window check in flight covers the whole answer, and its approval is final
                if hold.require_final and index not in inflight and size > done:
                    # The final check reasons and is slower: a window check releases the text meanwhile,
                    # and only the finish waits for the final verdict.
                    start(index, final=False)
            elif index not in inflight and size - done >= (window if index in checked else first):
                start(index, final=False)

    reader = asyncio.create_task(read())
    held = metrics.HeldChars()
    try:
        while True:
            changed.clear()
            schedule()
            held.set(hold.held_chars())
            for data in hold.release():
                yield data
            if failures:
                yield failures[0]
                return
            if not keep_usage and not reader.done() and set(range(choices)) <= hold.blocked:
                # Every choice is cut: stop generating (and paying for) the rest upstream. Wait for the
                # reader to end (its `finally` ends the hold): cancelling alone does not, and this branch
                # must never run twice without the event loop turning.
                reader.cancel()
                await asyncio.wait([reader])
                await close_upstream(resp)
            if reader.done() and not inflight and not finals and not _schedulable(hold, checked, final_started):
                break  # every choice settled, or nothing left that a check could release
            await changed.wait()
        for data in hold.finish(done=not upstream_error):
            yield data
        if upstream_error:
            failure = upstream_stream_failure(upstream_error[0])
            report.log_upstream_error(failure, "windowed")
            yield failure.event()
    finally:
        # Also on client disconnect (the generator is cancelled): stop reading, close the upstream.
        held.close()
        reader.cancel()
        for task in [*inflight.values(), *finals.values()]:
            task.cancel()
        await close_upstream(resp)


def _schedulable(hold: HoldBack, checked: dict[int, int], final_started: set[int]) -> bool:
    return any(not hold.settled(i) and i not in final_started
               and (hold.texts.size(i) > checked.get(i, 0) or hold.texts.size(i) == 0 or hold.require_final)
               for i in hold.texts.indexes())


class Primed:
    """An event stream that runs before anyone reads it (`prompt.timing: parallel`): while the prompt is
    scored, the answer is read and checked, and what the checks release waits here. Once read, it hands
    over what waits and then passes the stream on as it comes. `aclose` stops it unsent."""

    def __init__(self, events: AsyncIterator[bytes]) -> None:
        self._events = events
        self._waiting: deque[bytes] = deque()
        self._read = False  # someone reads: the pump stops after its current piece
        self._ended = False
        self._pump: asyncio.Task[None] | None = asyncio.ensure_future(self._fill())

    async def _fill(self) -> None:
        while not self._read:
            try:
                piece = await anext(self._events)
            except StopAsyncIteration:
                self._ended = True
                return
            self._waiting.append(piece)

    def __aiter__(self) -> Primed:
        return self

    async def __anext__(self) -> bytes:
        self._read = True
        if not self._waiting and self._pump is not None:
            pump, self._pump = self._pump, None
            await pump  # its current piece, or the end
        if self._waiting:
            return self._waiting.popleft()
        if self._ended:
            raise StopAsyncIteration
        return await anext(self._events)

    async def aclose(self) -> None:
        if self._pump is not None:
            pump, self._pump = self._pump, None
            pump.cancel()
            await asyncio.wait({pump})
            if not pump.cancelled():
                pump.exception()  # retrieved: nobody will send what it prepared, nor report its failure
        close = getattr(self._events, "aclose", None)
        if close is not None:
            await close()


async def buffered(resp: httpx.Response, blocked_of: Callable[[dict[int, str]], Awaitable[set[int]]]) -> bytes:
    """Hold the whole stream, score every choice, then release it all (blocked choices end content_filter).
    Raises httpx.HTTPError / StreamProtocolError if the upstream stream fails (nothing was sent yet)."""
    texts, events = ChoiceTexts(), []
    held = metrics.HeldChars()
    try:
        async for event in read_events(resp):
            texts.add(event)
            events.append(event)
            held.set(sum(texts.size(i) for i in texts.indexes()))
        blocked = await blocked_of(texts.texts())
    finally:
        held.close()
    if blocked:
        return b"".join(withhold_choices(events, blocked))
    return b"".join(e.raw for e in events)


async def audit(moderator: Moderator, report: Report, resp: httpx.Response, context: str,
                background: set[asyncio.Task]) -> AsyncIterator[bytes]:
    """Stream at once; score each choice's whole answer afterwards, in the background: decided and logged
    (`enforced: false`), never enforced."""
    texts = ChoiceTexts()
    parser = SSEParser()
    try:
        async for chunk in resp.aiter_bytes():
            yield chunk
            try:
                for event in parser.feed(chunk):
                    texts.add(event)
            except StreamProtocolError:
                parser = SSEParser()  # unreadable data is passed on as it is; only the scoring misses it
    except httpx.HTTPError as e:
        failure = upstream_stream_failure(e)
        report.log_upstream_error(failure, "audit")
        yield failure.event()
    finally:
        await close_upstream(resp)
    answers = {i: t for i, t in texts.texts().items() if t}
    if answers:
        indexes = list(answers)
        task = asyncio.create_task(_quietly(moderator.judge(
            report, "response", [GuardInput("response", context, answers[i]) for i in indexes], indexes,
            enforce=False, reasoning=report.policy.response.reasoning)))
        background.add(task)
        task.add_done_callback(background.discard)


async def _quietly(judgement: Awaitable[object]) -> None:
    try:
        await judgement
    except GuardUnavailable:
        pass  # already logged by the guard step; an audit has nobody left to tell


async def passthrough(report: Report, resp: httpx.Response) -> AsyncIterator[bytes]:
    """`response.check: false`: the stream as it comes."""
    try:
        async for chunk in resp.aiter_bytes():
            yield chunk
    except httpx.HTTPError as e:
        failure = upstream_stream_failure(e)
        report.log_upstream_error(failure, "unchecked")
        yield failure.event()
    finally:
        await close_upstream(resp)
