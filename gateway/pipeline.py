"""The one path: extract texts → verdicts → decide(policy) → upstream → verdicts → decide → release."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import httpx
import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from gateway import access, stream_modes
from gateway.cache import VerdictCache
from gateway.errors import ClientError, GatewayError, UpstreamError
from gateway.guard.base import Guard, GuardInput
from gateway.moderation import Moderator, Report
from gateway.openai_shapes import parse_chat_request
from gateway.policy.schema import Policy
from gateway.policy.store import PolicyStore
from gateway.streaming import StreamProtocolError
from gateway.texts import (
    ENVELOPE_FIELDS,
    BadShape,
    RequestTexts,
    choice_answer,
    request_texts,
    strings,
    withhold_choice,
)
from gateway.upstream import UpstreamAPI, response_headers

log = logging.getLogger("guardgate")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit`."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ClientError(413, f"Request body is {declared} bytes; the limit is {limit} bytes.",
                          code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ClientError(413, f"Request body exceeds the limit of {limit} bytes.", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def check_json_content_type(request: Request) -> None:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        shown = media_type or "none"
        raise ClientError(415, f"Unsupported Content-Type '{shown}'; send the body as application/json.",
                          code="unsupported_media_type")


async def _disconnected(request: Request) -> None:
    """Return once the client has hung up (the body is read, so the next ASGI message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _discard(response: Response) -> None:
    """Close a response that will never be sent (a streamed one holds an open upstream stream)."""
    if isinstance(response, StreamingResponse):
        close = getattr(response.body_iterator, "aclose", None)
        if close is not None:
            await close()


def bearer_token(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class Gateway:
    """Holds the long-lived parts (moderator, upstream, policies) and runs the path for each request."""

    def __init__(self, guard: Guard, cache: VerdictCache, upstream: UpstreamAPI, policies: PolicyStore,
                 max_body_bytes: int) -> None:
        self.guard, self.cache, self.upstream, self.policies = guard, cache, upstream, policies
        self.moderator = Moderator(guard, cache)
        self.max_body_bytes = max_body_bytes
        self._background: set[asyncio.Task] = set()  # audit scoring that outlives its request

    def authenticate(self, request: Request) -> Policy:
        """The caller's tenant policy, from its gateway key. With no keys configured, the default policy."""
        key = bearer_token(request)
        policy = self.policies.current.for_api_key(key)
        if policy is None:
            message = ("Incorrect API key provided." if key else "You didn't provide an API key.")
            raise ClientError(401, message + " Send your GuardGate key as 'Authorization: Bearer <key>'.",
                              code="invalid_api_key")
        ctx = access.current()
        if ctx is not None:
            ctx.tenant = policy.tenant
        return policy

    # ----- endpoints -----

    async def chat_completions(self, request: Request) -> Response:
        try:
            report = Report(policy=self.authenticate(request))
        except ClientError as e:
            return e.response()
        try:
            check_json_content_type(request)
            body = await read_body(request, self.max_body_bytes)
        except ClientError as e:
            return e.response(report.headers())
        except ClientDisconnect:
            log.info("client disconnected", extra={"fields": {
                "event": "client_disconnect", "request_id": report.request_id, "tenant": report.tenant,
                "during": "upload"}})
            return Response(status_code=499)
        # Until a streamed answer starts, the client may hang up while we wait for the guard or the upstream:
        # then stop waiting, so that the upstream call is closed rather than left generating for nobody.
        work = asyncio.ensure_future(self._complete(report, body))
        hangup = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, hangup}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hangup.cancel()
            if not work.done():
                work.cancel()
        if work.done() and not work.cancelled():
            return work.result()
        await asyncio.wait({work})
        log.info("client disconnected", extra={"fields": {
            "event": "client_disconnect", "request_id": report.request_id, "tenant": report.tenant,
            "during": "answer"}})
        return Response(status_code=499)

    async def _complete(self, report: Report, body: bytes) -> Response:
        policy = report.policy
        try:
            try:
                data = orjson.loads(body)
            except orjson.JSONDecodeError:
                raise ClientError(400, "We could not parse the JSON body of your request. "
                                       "Send a JSON object with 'model' and 'messages'.") from None
            chat = parse_chat_request(data)
            report.model = chat.model
            self.upstream.check_model(chat.model)
            texts = request_texts(data, policy.prompt.scope)
            report.media = texts.media

            options = data.get("stream_options")
            keep_usage = isinstance(options, dict) and options.get("include_usage") is True
            answer = functools.partial(self._answer, report, body, texts.context, bool(chat.stream), chat.n or 1,
                                       keep_usage)
            if not policy.prompt.check:
                report.skip("prompt")
            elif texts.inputs and policy.prompt.timing == "parallel":
                return await self._in_parallel(report, texts, answer)
            elif texts.inputs:
                await self._check_prompt(report, texts)
            return await answer()
        except GatewayError as e:
            if isinstance(e, UpstreamError):
                report.log_upstream_error(e)
            return e.response(report.headers())

    async def _check_prompt(self, report: Report, texts: RequestTexts) -> None:
        """Score the request's texts; raises ClientError 400 content_filter if the policy blocks them."""
        policy = report.policy
        decisions = await self.moderator.judge(report, "prompt", texts.inputs, texts.labels,
                                               reasoning=policy.prompt.reasoning)
        if decisions and any(d.outcome == "block" for d in decisions):
            raise ClientError(400, policy.block_message, code="content_filter", param="messages")

    async def _answer(self, report: Report, body: bytes, context: str, stream: bool, choices: int,
                      keep_usage: bool) -> Response:
        """Forward the request and moderate its answer."""
        if stream:
            return await self._stream(report, body, context, choices, keep_usage)
        resp = await self.upstream.send("POST", "/chat/completions", body)
        return await self._moderate_completion(report, resp.status_code, resp.content,
                                               response_headers(resp), context)

    async def _in_parallel(self, report: Report, texts: RequestTexts,
                           answer: Callable[[], Coroutine[Any, Any, Response]]) -> Response:
        """`prompt.timing: parallel`: the upstream call (and the answer's own checks) run while the prompt is
        scored. The answer's response goes to the client only once the prompt's verdict allows it; on a
        block or a guard failure the upstream call is cancelled (its connection closed) or its stream closed."""
        work = asyncio.ensure_future(answer())
        try:
            await self._check_prompt(report, texts)
        except BaseException:
            work.cancel()
            await asyncio.wait({work})
            if not work.cancelled():
                if work.exception() is None:
                    await _discard(work.result())
            raise
        response = await work
        response.headers.update(report.headers())  # the prompt's verdict, known only now
        return response

    async def _moderate_completion(self, report: Report, status: int, content: bytes,
                                   headers: dict[str, str], context: str) -> Response:
        """A whole chat.completion: score each choice, withhold the blocked ones."""
        if status >= 400:  # the provider's error: passed on as it came
            return Response(content, status_code=status, headers={**headers, **report.headers()})
        if not 200 <= status < 300:
            raise UpstreamError(502, f"The upstream answered HTTP {status}, which is not a chat completion; it was "
                                     "withheld.", code="upstream_bad_response")
        try:
            doc = orjson.loads(content)
            choices = doc["choices"]
            if not isinstance(choices, list):
                raise BadShape("choices is not a list")
            answers = [choice_answer(c, i) for i, c in enumerate(choices)]
            # Text outside the choices belongs to none of them: it is scored with each.
            outside = "\n".join(s for k, v in doc.items() if k not in ENVELOPE_FIELDS for s in strings(v))
        except (orjson.JSONDecodeError, KeyError, TypeError, BadShape):
            raise UpstreamError(502, "The upstream answered with a body that is not a chat completion; "
                                     "it was withheld because it cannot be scored.",
                                code="upstream_bad_response") from None
        # Scored by position, not by `index`: two choices claiming one index are still scored apart.
        blocked = await self._judge_answers(report, context, {
            pos: "\n".join(t for t in (text, outside) if t) for pos, (_, text) in enumerate(answers)})
        if blocked:
            for pos in blocked:
                withhold_choice(choices[pos])
                report.blocked_choices.add(answers[pos][0])
            doc = {k: v for k, v in doc.items() if k in ENVELOPE_FIELDS}
            content = orjson.dumps(doc)
        return Response(content, status_code=status, headers={**headers, **report.headers()})

    async def _judge_answers(self, report: Report, context: str, answers: dict[int, str]) -> set[int]:
        """Score each answer with the user turn it answers; the keys of the answers to withhold."""
        if not report.policy.response.check:
            report.skip("response")
            return set()
        scored = {k: t for k, t in answers.items() if t}
        if not scored:
            return set()
        keys = list(scored)
        decisions = await self.moderator.judge(report, "response",
                                               [GuardInput("response", context, scored[k]) for k in keys], keys,
                                               reasoning=report.policy.response.reasoning)
        if decisions is None:
            return set()
        return {k for k, d in zip(keys, decisions) if d.outcome == "block"}

    async def _stream(self, report: Report, body: bytes, context: str, choices: int, keep_usage: bool) -> Response:
        """A streamed answer, released as the tenant's `response.stream` mode says."""
        resp = await self.upstream.send("POST", "/chat/completions", body, stream=True)
        upstream_headers = response_headers(resp)
        media_type = resp.headers.get("content-type", "").split(";")[0].strip().lower()
        if not 200 <= resp.status_code < 300 or media_type != "text/event-stream":
            # An error, or an upstream that ignored `stream`: an ordinary response, moderated as such.
            try:
                content = await resp.aread()
            finally:
                await stream_modes.close_upstream(resp)
            return await self._moderate_completion(report, resp.status_code, content, upstream_headers, context)
        settings = report.policy.response
        mode = settings.stream if settings.check else "unchecked"
        if mode == "unchecked":
            report.skip("response")
        if mode == "buffered":
            async def blocked_of(answers: dict[int, str]) -> set[int]:
                blocked = await self._judge_answers(report, context, answers)
                report.blocked_choices |= blocked
                return blocked
            try:
                content = await stream_modes.buffered(resp, blocked_of)
            except (httpx.HTTPError, StreamProtocolError) as e:
                raise stream_modes.upstream_stream_failure(e) from None
            finally:
                await stream_modes.close_upstream(resp)
            return Response(content, status_code=200, media_type="text/event-stream",
                            headers={**upstream_headers, **report.headers(), "x-guard-stream-mode": mode})
        if mode == "windowed":
            events = stream_modes.windowed(self.moderator, report, resp, context, choices, keep_usage)
        elif mode == "audit":
            events = stream_modes.audit(self.moderator, report, resp, context, self._background)
        else:
            events = stream_modes.passthrough(report, resp)
        if report.policy.prompt.timing == "parallel":
            # The prompt is still being scored: read and check the answer meanwhile (what the checks release
            # is sent only once the prompt's verdict allows this response to be returned).
            events = stream_modes.Primed(events)
        return StreamingResponse(events, status_code=200, media_type="text/event-stream",
                                 headers={**upstream_headers, **report.headers(), "x-guard-stream-mode": mode})

    async def models(self, request: Request) -> Response:
        try:
            self.authenticate(request)
            resp = await self.upstream.send("GET", "/models")
        except GatewayError as e:
            return e.response()
        return Response(resp.content, status_code=resp.status_code, headers=response_headers(resp))

    async def model(self, request: Request, model_id: str) -> Response:
        """One model of the upstream's list (what `GET /v1/models` shows), or 404 `model_not_found`."""
        try:
            self.authenticate(request)
            resp = await self.upstream.send("GET", "/models")
        except GatewayError as e:
            return e.response()
        if resp.status_code != 200:  # the upstream's error, as /v1/models passes it on
            return Response(resp.content, status_code=resp.status_code, headers=response_headers(resp))
        # From the list rather than the upstream's own /models/{id}: the SDK sees exactly what the list shows,
        # and upstreams that serve only the list (vLLM, many proxies) still answer.
        try:
            listed = orjson.loads(resp.content)["data"]
            found = next((m for m in listed if isinstance(m, dict) and m.get("id") == model_id), None)
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return UpstreamError(502, "The upstream's model list is not a list of models.",
                                 code="upstream_bad_response").response()
        if found is None:
            return ClientError(404, f"The model '{model_id}' does not exist or you do not have access to it.",
                               code="model_not_found", param="model").response()
        return Response(orjson.dumps(found), media_type="application/json")

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        guard_ok, guard_detail = await self.guard.ready()
        _, cache_detail = await self.cache.ready()  # never unready: without Redis the guard is asked
        policies = self.policies.current
        # A rejected file does not make the gateway unready: its last good version is in force.
        checks: dict[str, Any] = {"guard": guard_detail,
                                  "cache": {"status": cache_detail, "stats": self.cache.stats()},
                                  "policies": {
            "tenants": sorted(policies.tenants), "open": policies.open,
            "errors": policies.errors, "status": "error" if policies.errors else "ok"}}
        return guard_ok, checks
