"""Added latency and throughput of the gateway, against the bare upstream measured in the same run.

    python bench/overhead.py [--requests 600] [--concurrency 16] [--guard-delay-ms 0]

Starts a stand-in upstream, a stand-in vLLM guard and the gateway (`guardgate serve`), each in its own
process on loopback, then sends the same chat request straight to the upstream and through the gateway,
interleaved so that machine noise hits both alike. Prints p50/p99 latency of each, the added latency,
and the throughput ratio under concurrency. The machine is shared and noisy: read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
BODY = b'{"model":"m","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"What is the capital of France?"}]}'
HEADERS = {"content-type": "application/json", "authorization": "Bearer bench"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process for {url} exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


@contextmanager
def processes(guard_delay_ms: float, extra_config: dict) -> Iterator[tuple[str, str, str]]:
    procs: list[subprocess.Popen] = []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        up_port, guard_port, gw_port = free_port(), free_port(), free_port()
        for args in (["upstream", str(up_port)], ["guard", str(guard_port), "--delay-ms", str(guard_delay_ms)]):
            procs.append(subprocess.Popen([sys.executable, "-m", "tests.standins", *args], env=env, cwd=REPO))
        wait_ready(f"http://127.0.0.1:{up_port}/v1/models", procs[0])
        wait_ready(f"http://127.0.0.1:{guard_port}/v1/models", procs[1])
        tmp = Path(tempfile.mkdtemp(prefix="guardgate-bench-"))
        (tmp / "policies").mkdir()
        (tmp / "policies" / "default.yaml").write_text("strictness: moderate\n" + extra_config.pop("_policy", ""))
        config = {"upstream": {"base_url": f"http://127.0.0.1:{up_port}/v1", "api_key": "sk-bench"},
                  "guard": {"base_url": f"http://127.0.0.1:{guard_port}/v1"},
                  "policies_dir": "policies", "server": {"allow_open": True}, **extra_config}
        (tmp / "gateway.yaml").write_text(yaml.safe_dump(config))
        procs.append(subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(tmp / "gateway.yaml"),
                                       "--port", str(gw_port)], env=env, cwd=REPO,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_ready(f"http://127.0.0.1:{gw_port}/healthz", procs[2])
        floor_port = free_port()
        procs.append(subprocess.Popen([sys.executable, "-m", "uvicorn", "floor_proxy:app", "--app-dir", str(REPO / "bench"),
                                       "--port", str(floor_port), "--log-level", "warning", "--no-access-log"],
                                      env={**env, "UPSTREAM": f"http://127.0.0.1:{up_port}"}, cwd=REPO))
        wait_ready(f"http://127.0.0.1:{floor_port}/healthz", procs[3])
        processes.floor = f"http://127.0.0.1:{floor_port}"
        yield f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{guard_port}", f"http://127.0.0.1:{gw_port}"
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def sequential(targets: dict[str, tuple[str, bytes]], n: int, warmup: int) -> dict[str, list[float]]:
    """Round-robin over the targets, rotating the order each round."""
    out: dict[str, list[float]] = {name: [] for name in targets}
    names = list(targets)
    with httpx.Client(timeout=30) as client:
        for i in range(warmup + n):
            for name in names[i % len(names):] + names[:i % len(names)]:
                url, body = targets[name]
                t0 = time.perf_counter()
                r = client.post(url, content=body, headers=HEADERS)
                elapsed = (time.perf_counter() - t0) * 1000
                assert r.status_code == 200, r.text
                if i >= warmup:
                    out[name].append(elapsed)
    return out


async def _load(base: str, n: int, concurrency: int) -> float:
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=concurrency)) as client:
        queue = iter(range(n))

        async def worker() -> None:
            for _ in queue:
                r = await client.post(f"{base}/v1/chat/completions", content=BODY, headers=HEADERS)
                assert r.status_code == 200, r.text

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return n / (time.perf_counter() - t0)


def concurrent(direct: str, gateway: str, n: int, concurrency: int, rounds: int = 3) -> dict[str, float]:
    rps: dict[str, list[float]] = {"direct": [], "gateway": []}
    for _ in range(rounds):  # alternate, take the median round of each
        rps["direct"].append(asyncio.run(_load(direct, n, concurrency)))
        rps["gateway"].append(asyncio.run(_load(gateway, n, concurrency)))
    return {k: statistics.median(v) for k, v in rps.items()}


def guard_request_body() -> bytes:
    import orjson

    from gateway.config import GuardConfig
    from gateway.guard.base import GuardInput
    from gateway.guard.flexguard import FlexGuard
    guard = FlexGuard(GuardConfig(base_url="http://unused/v1"))
    return orjson.dumps(guard.request_body(GuardInput("prompt", "What is the capital of France?")))


def run(label: str, args: argparse.Namespace, extra_config: dict, guard_calls_per_request: int) -> None:
    with processes(args.guard_delay_ms, extra_config) as (direct, guard, gateway):
        targets = {"direct": (f"{direct}/v1/chat/completions", BODY),
                   "gateway": (f"{gateway}/v1/chat/completions", BODY),
                   "floor": (f"{processes.floor}/v1/chat/completions", BODY),
                   "guard": (f"{guard}/v1/chat/completions", guard_request_body())}
        lat = sequential(targets, args.requests, args.warmup)
        rps = concurrent(direct, gateway, args.requests, args.concurrency)
    p50 = {k: pct(v, 0.5) for k, v in lat.items()}
    p99 = {k: pct(v, 0.99) for k, v in lat.items()}
    added50, added99 = p50["gateway"] - p50["direct"], p99["gateway"] - p99["direct"]
    print(f"\n== {label} (stand-in guard answers in {args.guard_delay_ms:g} ms + its own HTTP handling) ==")
    print(f"sequential, {args.requests} requests each, interleaved")
    print(f"  upstream direct    p50 {p50['direct']:7.2f} ms   p99 {p99['direct']:7.2f} ms")
    print(f"  one guard call     p50 {p50['guard']:7.2f} ms   p99 {p99['guard']:7.2f} ms   (stand-in, called directly)")
    print(f"  through gateway    p50 {p50['gateway']:7.2f} ms   p99 {p99['gateway']:7.2f} ms")
    print(f"  added by gateway   p50 {added50:7.2f} ms   p99 {added99:7.2f} ms   "
          f"(gateway/direct p50 = {p50['gateway'] / p50['direct']:.2f}x)")
    floor50 = p50["floor"] - p50["direct"]
    print(f"  added by a do-nothing proxy on the same stack (bench/floor_proxy.py): p50 {floor50:.2f} ms; "
          f"GuardGate's own share p50 {added50 - floor50:.2f} ms")
    if guard_calls_per_request:
        own = added50 - guard_calls_per_request * p50["guard"]
        print(f"  of which {guard_calls_per_request} guard calls ~{guard_calls_per_request * p50['guard']:.2f} ms; "
              f"gateway's own p50 ~{own:.2f} ms")
    print(f"concurrent, {args.concurrency} in flight, median of 3 rounds of {args.requests}")
    print(f"  direct  {rps['direct']:8.0f} req/s   gateway {rps['gateway']:8.0f} req/s   "
          f"ratio {rps['gateway'] / rps['direct']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--guard-delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores")
    # Every request the same text: after the first, both verdicts come from the in-process cache.
    run("verdicts cached (in-process hit, no guard call)", args, {}, guard_calls_per_request=0)
    # A policy that bypasses the cache: both verdicts asked of the guard on every request.
    run("guard called on every request (cache bypassed)", args, {"_policy": "bypass_cache: true\n"},
        guard_calls_per_request=2)


if __name__ == "__main__":
    main()
