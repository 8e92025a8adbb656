"""The verdict cache: added latency on a hit vs a miss with a 50 ms guard, and guard calls saved.

    python bench/cache.py [--guard-delay-ms 50] [--requests 300] [--workload 1500]

Starts a stand-in upstream, a stand-in guard that takes --guard-delay-ms per call, a redis-server of its
own (if the binary exists; else the cache is in-process only) and `guardgate serve`, each its own process.
1. Latency, interleaved with the bare upstream: a hit (the same text each time) and a miss (a new text
   each time, so both the prompt and the answer go to the guard).
2. A workload of repeated prompts (Zipf-distributed over a few hundred distinct prompts, 8 in flight):
   guard calls made vs the two per request an uncached gateway makes.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HEADERS, free_port, pct, processes  # noqa: E402


def body(text: str) -> bytes:
    return orjson.dumps({"model": "m", "messages": [{"role": "user", "content": text}]})


def start_redis() -> tuple[subprocess.Popen | None, str | None]:
    binary = shutil.which("redis-server")
    if not binary:
        return None, None
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", tempfile.mkdtemp(prefix="gg-bench-redis-")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    return proc, f"redis://127.0.0.1:{port}/0"


def latency(direct: str, gateway: str, n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"direct": [], "hit": [], "miss": []}
    hit_body = body("What is the capital of France?")
    with httpx.Client(timeout=60) as client:
        client.post(f"{gateway}/v1/chat/completions", content=hit_body, headers=HEADERS)  # fill the cache
        for i in range(n):
            for name, url, b in (("direct", direct, hit_body), ("hit", gateway, hit_body),
                                 ("miss", gateway, body(f"A question never asked before, number {i} {random.random()}"))):
                t0 = time.perf_counter()
                r = client.post(f"{url}/v1/chat/completions", content=b, headers=HEADERS)
                out[name].append((time.perf_counter() - t0) * 1000)
                assert r.status_code == 200, r.text
    return out


ADMIN_KEY = "bench-admin-key-0000000001"


async def cache_stats(client: httpx.AsyncClient, gateway: str) -> dict:
    """The cache counters, from the admin view (/readyz says only ready or not)."""
    view = await client.get(f"{gateway}/admin/readiness", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    return view.json()["checks"]["cache"]["stats"]


async def workload(gateway: str, n: int, distinct: int, concurrency: int) -> tuple[float, dict]:
    rng = random.Random(7)
    weights = [1 / (rank ** 1.1) for rank in range(1, distinct + 1)]
    prompts = rng.choices([f"popular question number {k}" for k in range(distinct)], weights, k=n)
    async with httpx.AsyncClient(timeout=60) as client:
        queue = iter(prompts)
        before = await cache_stats(client, gateway)

        async def worker() -> None:
            for text in queue:
                r = await client.post(f"{gateway}/v1/chat/completions", content=body(text), headers=HEADERS)
                assert r.status_code == 200, r.text

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
        after = await cache_stats(client, gateway)
    stats = {k: after[k] - before.get(k, 0) for k in after}  # this workload's own counts
    return elapsed, {**stats, "distinct_prompts": len(set(prompts))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--guard-delay-ms", type=float, default=50.0)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--workload", type=int, default=1500)
    parser.add_argument("--distinct", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    redis_proc, redis_url = start_redis()
    try:
        extra: dict = {"server": {"allow_open": True, "admin_key": ADMIN_KEY}}
        if redis_url:
            extra["cache"] = {"redis_url": redis_url}
        with processes(args.guard_delay_ms, extra) as (direct, _guard, gateway):
            lat = latency(direct, gateway, args.requests)
            elapsed, stats = asyncio.run(workload(gateway, args.workload, args.distinct, args.concurrency))
    finally:
        if redis_proc:
            redis_proc.terminate()
    d50 = pct(lat["direct"], 0.5)
    print(f"guard stand-in: {args.guard_delay_ms:g} ms per call; cache: {'redis + in-process' if redis_url else 'in-process only'}")
    print(f"latency, {args.requests} requests each, interleaved")
    for name in ("direct", "hit", "miss"):
        p50, p99 = pct(lat[name], 0.5), pct(lat[name], 0.99)
        added = "" if name == "direct" else f"   added p50 {p50 - d50:8.2f} ms ({p50 / d50:.2f}x direct)"
        print(f"  {name:6} p50 {p50:8.2f} ms   p99 {p99:8.2f} ms{added}")
    hit_added, miss_added = pct(lat["hit"], 0.5) - d50, pct(lat["miss"], 0.5) - d50
    print(f"  a hit adds {hit_added / miss_added * 100:.1f}% of what a miss adds")
    uncached = 2 * args.workload
    print(f"workload: {args.workload} requests over {stats['distinct_prompts']} distinct prompts (Zipf 1.1), "
          f"{args.concurrency} in flight, {args.workload / elapsed:.0f} req/s")
    print(f"  guard calls {stats['misses']} vs {uncached} uncached: {100 * (1 - stats['misses'] / uncached):.1f}% saved "
          f"(local hits {stats['local_hits']}, redis hits {stats['redis_hits']}, coalesced {stats['coalesced']})")


if __name__ == "__main__":
    main()
