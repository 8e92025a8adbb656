"""How a streamed answer reaches the client: windowed (default), buffered, or audit.

Each takes the upstream's open event stream and yields the bytes the client may have. Scoring goes through
the `Moderator` (the gateway's one moderation step), so verdicts, logs and the cache are the same as
everywhere else.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import httpx

from gateway import metrics
from gateway.errors import GuardUnavailable, UpstreamError
from gateway.guard.base import GuardInput
from gateway.moderation import Moderator, Report
from gateway.streaming import ChoiceTexts, HoldBack, SSEEvent, SSEParser, StreamProtocolError, withhold_choices


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

    A check scores the whole answer so far (with the prompt, the card's response template) every
    `window` characters and at the end; at most one check per choice is in flight, and reading the
    upstream goes on meanwhile, so the client lags by at most about one window plus one guard call.
    """
    window = report.policy.response.window
    hold = HoldBack()
    changed = asyncio.Event()
    checked: dict[int, int] = {}  # choice → size of the answer its last check covered
    inflight: dict[int, asyncio.Task[None]] = {}
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

    async def check(index: int, size: int, text: str) -> None:
        try:
            decisions = await moderator.judge(report, "response", [GuardInput("response", context, text)], [index])
            if decisions is not None and decisions[0].outcome == "block":
                hold.block(index)
                report.blocked_choices.add(index)
            else:  # allowed, flagged, shadowed, or fail-open: released
                hold.approve(index, size)
        except GuardUnavailable as e:
            failures.append(e.event())
        finally:
            inflight.pop(index, None)
            changed.set()

    def schedule() -> None:
        for index in hold.texts.indexes():
            if hold.settled(index) or index in inflight:
                continue
            size, complete = hold.texts.size(index), hold.complete(index)
            if complete and size == 0:
                hold.approve(index, 0)  # an empty answer: nothing to score
            elif size > checked.get(index, 0) and (complete or size - checked.get(index, 0) >= window):
                checked[index] = size
                inflight[index] = asyncio.create_task(check(index, size, hold.texts.text(index)))

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
            if reader.done() and not inflight and not _schedulable(hold, checked):
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
        for task in inflight.values():
            task.cancel()
        await close_upstream(resp)


def _schedulable(hold: HoldBack, checked: dict[int, int]) -> bool:
    return any(not hold.settled(i) and (hold.texts.size(i) > checked.get(i, 0) or hold.texts.size(i) == 0)
               for i in hold.texts.indexes())


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
            enforce=False)))
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
