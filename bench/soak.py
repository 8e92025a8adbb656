"""Soak: tens of thousands of mixed requests at high concurrency, to show the gateway never hangs.

    python bench/soak.py [--requests 30000] [--concurrency 64] [--max-seconds 900] [--timeout 30]
                         [--guard-delay-ms 2] [--chunk-delay-ms 0] [--redis-url URL] [--seed 1]

Starts a stand-in upstream (echoes "You said: <prompt>"), a stand-in vLLM guard and `guardgate serve`
(windowed streaming, window 64), each in its own process on loopback, then keeps --concurrency requests in
flight until --requests are done or --max-seconds have passed. The mix: plain and streamed benign requests,
prompts that are refused (400 content_filter), answers withheld plain (finish_reason content_filter) and
streamed (some with stream_options.include_usage), and streams the client hangs up on midway. Texts repeat
from a small pool, so most verdicts (blocking ones too) come from the verdict cache: a cached blocking
verdict on a stream is the pattern that once froze the gateway at 100% CPU.

A request that takes longer than --timeout is a HANG; an answer other than its kind expects is an ERROR.
Meanwhile GET /healthz is probed every 0.5 s (2 s timeout). Exits 1 on any hang, error or failed probe.

With --faults the neighbours fail while the load runs, one after another, every --fault-every seconds:
Redis (a redis-server of its own) killed and restarted, the guard answering 500, garbage, or too slowly
(it is restarted so), the guard and the upstream killed and restarted, the default policy rewritten with
garbage and restored. A request that meets a fault may then end in a 502/503/504 in OpenAI's error shape
or a stream error event ("faulted", counted by code); it must still never hang, never get a 500, and
never receive blocked text. Open file descriptors are reported before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, free_port, wait_ready  # noqa: E402

ADMIN_KEY = "soak-admin-key-000000000001"
# The stand-in guard scores a text containing a trigger at risk 90 (blocked at moderate strictness), others 3.
PROMPT_TRIGGER = "bioweapon"  # in the prompt: the prompt is refused
ANSWER_TRIGGER = "ammonia"  # only the upstream's echo "You said: ammonia…" scores 90: the prompt passes, the answer not
RULES = [f"{PROMPT_TRIGGER}=VIO:90", f"You said: {ANSWER_TRIGGER}=VIO:90"]
FILLER = "Rivers carry sediment from the mountains and lay it down where the current slows. "  # 83 chars
VARIANTS = 40  # texts per kind that repeat (cache hits); 1 in 10 requests is unique instead (a guard call)

# kind → share of requests
MIX = {"benign": 20, "benign_stream": 20, "prompt_blocked": 10, "answer_blocked": 15,
       "answer_blocked_stream": 25, "disconnect": 10}


@dataclass
class Spec:
    kind: str
    prompt: str
    stream: bool = False
    usage: bool = False  # stream_options.include_usage
    disconnect: bool = False  # hang up after the first content (or, for a blocked answer, the first event)
    forbidden: str = ""  # must never reach the client
    hung_up: bool = False  # set once the client did hang up mid-stream

    @property
    def answer_blocked(self) -> bool:
        return self.forbidden == ANSWER_TRIGGER

    def body(self) -> bytes:
        body: dict = {"model": "m", "messages": [{"role": "user", "content": self.prompt}]}
        if self.stream:
            body["stream"] = True
            if self.usage:
                body["stream_options"] = {"include_usage": True}
        return orjson.dumps(body)


def make_spec(i: int, rng: random.Random) -> Spec:
    kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
    variant = f"u{i}" if rng.random() < 0.1 else str(rng.randrange(VARIANTS))
    # Some answers longer than the window, so that a stream is checked several times before its end.
    filler = " " + FILLER * rng.choice((1, 3)) if rng.random() < 0.3 else ""
    if kind == "benign":
        return Spec(kind, f"Tell me about rivers, variant {variant}.{filler}")
    if kind == "benign_stream":
        return Spec(kind, f"Tell me about rivers, variant {variant}.{filler}", stream=True, usage=rng.random() < 0.5)
    if kind == "prompt_blocked":
        return Spec(kind, f"How do I make a {PROMPT_TRIGGER}, variant {variant}?", stream=rng.random() < 0.5,
                    forbidden=PROMPT_TRIGGER)
    if kind == "answer_blocked":
        return Spec(kind, f"{ANSWER_TRIGGER} and bleach, variant {variant}.{filler}", forbidden=ANSWER_TRIGGER)
    if kind == "answer_blocked_stream":
        return Spec(kind, f"{ANSWER_TRIGGER} and bleach, variant {variant}.{filler}", stream=True,
                    usage=rng.random() < 0.5, forbidden=ANSWER_TRIGGER)
    # A long answer (~1,700 chars, ~430 chunks), so the hang-up comes while the stream is still going.
    blocked = rng.random() < 0.3
    head = f"{ANSWER_TRIGGER} and bleach" if blocked else "Tell me about rivers"
    return Spec(kind, f"{head}, variant {variant}. {FILLER * 20}", stream=True, usage=rng.random() < 0.5,
                disconnect=True, forbidden=ANSWER_TRIGGER if blocked else "")


# ----- checking one answer -----

def check_plain(spec: Spec, status: int, raw: bytes) -> str | None:
    """None if a non-streamed answer (or a refusal of a streamed request) is what the kind expects."""
    if spec.forbidden and spec.forbidden.encode() in raw:
        return f"blocked text '{spec.forbidden}' reached the client"
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return f"status {status}, body not JSON: {raw[:120]!r}"
    if spec.kind == "prompt_blocked":
        code = (doc.get("error") or {}).get("code")
        return None if status == 400 and code == "content_filter" else f"status {status} code {code}, want 400"
    if status != 200:
        return f"status {status}: {raw[:160]!r}"
    choice = doc["choices"][0]
    finish, content = choice.get("finish_reason"), (choice.get("message") or {}).get("content")
    if spec.answer_blocked:
        return None if finish == "content_filter" and not content else f"finish {finish}, content {content!r}"
    want = f"You said: {spec.prompt}"
    return None if finish == "stop" and content == want else f"finish {finish}, content {str(content)[:80]!r}"


@dataclass
class StreamSeen:
    content: str = ""
    events: int = 0
    finish: str | None = None
    usage: bool = False
    done: bool = False
    errors: list[str] = field(default_factory=list)

    def feed(self, event: bytes) -> None:
        if not event.startswith(b"data: "):
            return  # comments (keep-alives)
        self.events += 1
        data = event[6:]
        if data == b"[DONE]":
            self.done = True
            return
        chunk = orjson.loads(data)
        if "error" in chunk:
            self.errors.append(str(chunk["error"].get("code")))
            return
        self.usage |= bool(chunk.get("usage"))
        for choice in chunk.get("choices") or []:
            self.content += (choice.get("delta") or {}).get("content") or ""
            self.finish = choice.get("finish_reason") or self.finish


def check_stream(spec: Spec, seen: StreamSeen, hung_up: bool) -> str | None:
    if spec.answer_blocked and ANSWER_TRIGGER in seen.content:
        return f"blocked text '{ANSWER_TRIGGER}' reached the client"
    if seen.errors:
        return f"FAULT:{seen.errors[0]}" if seen.errors[0] in FAULT_CODES else f"error event {seen.errors[0]}"
    if hung_up:
        return None  # it got this far without leaking; the rest is the gateway's cleanup
    if not seen.done:
        return "stream ended without [DONE]"
    if seen.usage != spec.usage:
        return f"usage chunk {'missing' if spec.usage else 'unasked for'}"
    if spec.answer_blocked:
        return None if seen.finish == "content_filter" else f"finish {seen.finish}, want content_filter"
    want = f"You said: {spec.prompt}"
    return None if seen.finish == "stop" and seen.content == want else \
        f"finish {seen.finish}, content {seen.content[:80]!r}"


FAULT_CODES = {"guard_unavailable", "upstream_unavailable", "upstream_timeout", "upstream_stream_error",
               "upstream_bad_response"}


def fault(spec: Spec, status: int, raw: bytes) -> str | None:
    """`FAULT:<code>` when a plain answer is the gateway's clean report of a failed neighbour."""
    if status not in (502, 503, 504) or (spec.forbidden and spec.forbidden.encode() in raw):
        return None
    try:
        code = (orjson.loads(raw).get("error") or {}).get("code")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return f"FAULT:{code}" if code in FAULT_CODES else None


async def send(client: httpx.AsyncClient, url: str, spec: Spec) -> str | None:
    """Send one request, read (or hang up on) the answer; None if it is what the kind expects."""
    headers = {"content-type": "application/json", "authorization": "Bearer soak"}
    if not spec.stream:
        r = await client.post(url, content=spec.body(), headers=headers)
        return fault(spec, r.status_code, r.content) or check_plain(spec, r.status_code, r.content)
    async with client.stream("POST", url, content=spec.body(), headers=headers) as r:
        if r.status_code != 200:
            raw = await r.aread()
            return fault(spec, r.status_code, raw) or check_plain(spec, r.status_code, raw)
        seen, buffer = StreamSeen(), b""
        async for chunk in r.aiter_bytes():
            buffer += chunk
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                seen.feed(event)
            if spec.disconnect and (seen.content or (spec.answer_blocked and seen.events)) and not seen.done:
                spec.hung_up = True
                return check_stream(spec, seen, hung_up=True)  # leaving the block closes the connection
        return check_stream(spec, seen, hung_up=False)


# ----- the load -----

@dataclass
class Tally:
    done: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MIX, 0))
    hangs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MIX, 0))
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MIX, 0))
    latency: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in MIX})
    first_errors: list[str] = field(default_factory=list)
    faulted: dict[str, int] = field(default_factory=dict)  # requests that met a fault, by error code
    hung_up: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    wall_s: float = 0.0

    def error(self, spec: Spec, message: str, *, hang: bool = False) -> None:
        (self.hangs if hang else self.errors)[spec.kind] += 1
        if len(self.first_errors) < 10:
            self.first_errors.append(f"{spec.kind} (stream={spec.stream}, usage={spec.usage}): {message} "
                                     f"[prompt {spec.prompt[:50]!r}]")


async def load(base: str, args: argparse.Namespace) -> Tally:
    tally, rng, issued = Tally(), random.Random(args.seed), 0
    url = f"{base}/v1/chat/completions"
    deadline = time.monotonic() + args.max_seconds
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency,
                          keepalive_expiry=5.0)  # httpx's and the openai SDK's default
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:

        async def worker() -> None:
            nonlocal issued
            while issued < args.requests and time.monotonic() < deadline:
                spec, issued = make_spec(issued, rng), issued + 1
                tally.in_flight += 1
                tally.peak_in_flight = max(tally.peak_in_flight, tally.in_flight)
                t0 = time.perf_counter()
                try:
                    # The whole exchange, not each read, must finish in time: a trickle is a hang too.
                    async with asyncio.timeout(args.timeout):
                        problem = await send(client, url, spec)
                    if problem and problem.startswith("FAULT:") and args.faults:
                        tally.faulted[problem[6:]] = tally.faulted.get(problem[6:], 0) + 1
                    elif problem:
                        tally.error(spec, problem)
                except (TimeoutError, httpx.TimeoutException):
                    tally.error(spec, "HANG", hang=True)
                except (httpx.HTTPError, orjson.JSONDecodeError, KeyError, IndexError, TypeError) as e:
                    tally.error(spec, f"{type(e).__name__}: {e}")
                finally:
                    tally.in_flight -= 1
                tally.done[spec.kind] += 1
                tally.hung_up += spec.hung_up
                tally.latency[spec.kind].append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        tally.wall_s = time.perf_counter() - t0
    return tally


# ----- watching the gateway -----

def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class HealthProbe(threading.Thread):
    """GET /healthz every 0.5 s from its own thread (not queued behind the load's event loop)."""

    def __init__(self, base: str, pid: int) -> None:
        super().__init__(daemon=True)
        self.url, self.pid = f"{base}/healthz", pid
        self.stopped = threading.Event()
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.peak_rss = 0.0

    def run(self) -> None:
        with httpx.Client(timeout=2) as client:
            while not self.stopped.wait(0.5):
                t0 = time.perf_counter()
                try:
                    r = client.get(self.url)
                    if r.status_code != 200:
                        self.failures.append(f"status {r.status_code}")
                except httpx.HTTPError as e:
                    self.failures.append(type(e).__name__)
                self.latencies.append(time.perf_counter() - t0)
                self.peak_rss = max(self.peak_rss, rss_mb(self.pid))


# ----- processes -----

class Faults(threading.Thread):
    """Fails the gateway's neighbours one after another, every `every` seconds, each for `hold` seconds."""

    def __init__(self, every: float, hold: float, env: dict, procs: dict[str, subprocess.Popen],
                 commands: dict[str, list[str]], ready: dict[str, str], policy: Path) -> None:
        super().__init__(daemon=True)
        self.every, self.hold, self.env, self.procs = every, hold, env, procs
        self.commands, self.ready, self.policy = commands, ready, policy
        self.stopped = threading.Event()
        self.injected: list[str] = []

    def restart(self, name: str, extra: list[str] | None = None) -> None:
        old = self.procs[name]
        old.terminate()
        old.wait(timeout=10)
        command = self.commands[name] + (extra or [])
        if name == "redis":
            self.procs[name] = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.3)
        else:
            self.procs[name] = start(command, self.env)
            wait_ready(self.ready[name], self.procs[name])

    def run(self) -> None:
        guard_modes = {"guard answers 500": ["--failure", "500"], "guard answers garbage": ["--failure", "garbage"],
                       "guard too slow": ["--delay-ms", "6000"]}
        steps: list[tuple[str, object]] = [("redis killed", "redis"), *guard_modes.items(),
                                           ("guard killed", "guard"), ("upstream killed", "upstream"),
                                           ("policy rewritten with garbage", None)]
        steps = [s for s in steps if s[1] != "redis" or "redis" in self.procs]
        i = 0
        while not self.stopped.wait(self.every):
            label, what = steps[i % len(steps)]
            i += 1
            self.injected.append(label)
            if isinstance(what, list):  # the guard misbehaving: restarted so, then restarted well
                self.restart("guard", what)
                time.sleep(self.hold)
                self.restart("guard")
            elif isinstance(what, str):
                self.procs[what].kill()
                self.procs[what].wait(timeout=10)
                time.sleep(self.hold)
                self.restart(what)
            else:
                good = self.policy.read_bytes()
                self.policy.write_bytes(b"strictness: [\n\xff garbage")
                time.sleep(self.hold)
                self.policy.write_bytes(good)


def start(args: list[str], env: dict, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 (closed with the process)
    return subprocess.Popen([sys.executable, *args], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)


def write_config(tmp: Path, up_port: int, guard_port: int, redis_url: str | None) -> Path:
    (tmp / "policies").mkdir()
    (tmp / "policies" / "default.yaml").write_text("strictness: moderate\nresponse: {stream: windowed, window: 64}\n")
    config = {"upstream": {"base_url": f"http://127.0.0.1:{up_port}/v1", "api_key": "sk-soak"},
              "guard": {"base_url": f"http://127.0.0.1:{guard_port}/v1", "model": "Tommy-DING/FlexGuard-Qwen3-8B",
                        "timeout_s": 5},
              "policies_dir": "policies", "server": {"allow_open": True, "admin_key": ADMIN_KEY}}
    if redis_url:
        config["cache"] = {"redis_url": redis_url}
    (tmp / "gateway.yaml").write_text(yaml.safe_dump(config))
    return tmp / "gateway.yaml"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def report(args: argparse.Namespace, tally: Tally, probe: HealthProbe, rss: tuple[float, float],
           fds: tuple[int, int], faults: list[str], cache: dict, log: Path) -> bool:
    total, hangs, errors = sum(tally.done.values()), sum(tally.hangs.values()), sum(tally.errors.values())
    busy = sum(sum(v) for v in tally.latency.values())
    print(f"\n{total} requests in {tally.wall_s:.1f} s = {total / tally.wall_s:.0f} req/s; concurrency "
          f"{args.concurrency} (peak in flight {tally.peak_in_flight}, mean {busy / tally.wall_s:.1f}); "
          f"timeout {args.timeout:g} s")
    print(f"{'kind':22} {'done':>7} {'hangs':>6} {'errors':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for kind in MIX:
        lat = tally.latency[kind]
        print(f"{kind:22} {tally.done[kind]:7d} {tally.hangs[kind]:6d} {tally.errors[kind]:7d} "
              f"{pct(lat, 0.5) * 1000:8.1f} {pct(lat, 0.99) * 1000:8.1f} {max(lat, default=0) * 1000:8.1f}")
    print(f"{'total':22} {total:7d} {hangs:6d} {errors:7d}")
    print(f"disconnect: {tally.hung_up} of {tally.done['disconnect']} hung up mid-stream (the rest ended first)")
    for line in tally.first_errors[:5]:
        print(f"  first problems: {line}")
    worst = max(probe.latencies, default=float("nan"))
    print(f"healthz: {len(probe.latencies)} probes, worst {worst * 1000:.1f} ms, "
          f"p99 {pct(probe.latencies, 0.99) * 1000:.1f} ms, failures {len(probe.failures)} "
          f"{probe.failures[:3] if probe.failures else ''}")
    print(f"gateway RSS: before {rss[0]:.1f} MB, after {rss[1]:.1f} MB, peak {probe.peak_rss:.1f} MB")
    print(f"gateway open file descriptors: before {fds[0]}, after {fds[1]}")
    if args.faults:
        print(f"faults injected: {faults}")
        print(f"requests that met a fault, by code: {tally.faulted}")
    print(f"verdict cache: {cache}")
    levels: dict[str, int] = {}
    for line in log.read_bytes().splitlines():
        try:
            level = orjson.loads(line).get("level", "?")
        except orjson.JSONDecodeError:
            level = "non-json"
        levels[level] = levels.get(level, 0) + 1
    print(f"gateway log lines by level: {levels} ({log})")
    return hangs == 0 and errors == 0 and not probe.failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=30000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-seconds", type=float, default=900, help="stop sending new requests after this")
    parser.add_argument("--timeout", type=float, default=30, help="a request taking longer is a hang")
    parser.add_argument("--guard-delay-ms", type=float, default=2.0)
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0)
    parser.add_argument("--redis-url", help="also put verdicts in this Redis (default: in-process cache only)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--faults", action="store_true", help="fail Redis, the guard, the upstream and the policy "
                                                               "files while the load runs")
    parser.add_argument("--fault-every", type=float, default=8.0, help="seconds between two faults")
    parser.add_argument("--fault-hold", type=float, default=2.0, help="how long each fault lasts")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; mix {MIX}")

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    tmp = Path(tempfile.mkdtemp(prefix="guardgate-soak-"))
    procs: dict[str, subprocess.Popen] = {}
    try:
        up_port, guard_port, gw_port = free_port(), free_port(), free_port()
        commands = {"upstream": ["-m", "tests.standins", "upstream", str(up_port),
                                 "--chunk-delay-ms", str(args.chunk_delay_ms)],
                    "guard": ["-m", "tests.standins", "guard", str(guard_port), "--delay-ms", str(args.guard_delay_ms),
                              *(a for rule in RULES for a in ("--rule", rule))]}
        ready = {"upstream": f"http://127.0.0.1:{up_port}/v1/models",
                 "guard": f"http://127.0.0.1:{guard_port}/v1/models"}
        for name in ("upstream", "guard"):
            procs[name] = start(commands[name], env)
        for name in ("upstream", "guard"):
            wait_ready(ready[name], procs[name])
        redis_url = args.redis_url
        if args.faults and not redis_url and shutil.which("redis-server"):
            redis_port = free_port()
            commands["redis"] = ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no"]
            procs["redis"] = subprocess.Popen(commands["redis"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
            time.sleep(0.3)
        config = write_config(tmp, up_port, guard_port, redis_url)
        log = tmp / "gateway.log"
        gateway = start(["-m", "gateway", "serve", "--config", str(config), "--port", str(gw_port)], env, log)
        procs["gateway"] = gateway
        base = f"http://127.0.0.1:{gw_port}"
        wait_ready(f"{base}/healthz", gateway)

        rss_before, fds_before = rss_mb(gateway.pid), open_fds(gateway.pid)
        probe = HealthProbe(base, gateway.pid)
        probe.start()
        faults = Faults(args.fault_every, args.fault_hold, env, procs, commands, ready,
                        tmp / "policies" / "default.yaml")
        if args.faults:
            faults.start()
        try:
            tally = asyncio.run(load(base, args))
        finally:
            probe.stopped.set()
            probe.join()
            faults.stopped.set()
            if args.faults:
                faults.join()
        if gateway.poll() is not None:
            raise SystemExit(f"the gateway exited with {gateway.returncode}; see {log}")
        time.sleep(1)  # connections of requests just ended close
        rss_after, fds_after = rss_mb(gateway.pid), open_fds(gateway.pid)
        readiness = httpx.get(f"{base}/admin/readiness", headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()
        cache = readiness["checks"]["cache"]["stats"]
        ok = report(args, tally, probe, (rss_before, rss_after), (fds_before, fds_after), faults.injected, cache, log)
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
    print("PASS: no hangs, no errors" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
