"""Streaming: time to first token and total time, direct vs through the gateway in each stream mode,
and how much flagged text each mode lets through.

    python bench/stream.py [--runs 5] [--guard-delay-ms 50] [--chunk-delay-ms 5] [--window 400]

A stand-in upstream streams a ~2,000-character answer in 4-character chunks (--chunk-delay-ms apart, like a
model generating tokens); a stand-in guard answers in --guard-delay-ms. A second upstream streams an
answer of the same length whose harmful sentence starts at character ~1,200. Each is measured straight from
the upstream and through `guardgate serve` for the windowed, buffered and audit modes (one tenant each).
"Flagged chars released" counts the characters the client received from the start of the harmful
sentence on: it must be 0 for windowed and buffered.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, free_port, wait_ready  # noqa: E402

SENTENCE = "Rivers carry sediment from the mountains and lay it down where the current slows. "
BENIGN = (SENTENCE * 30)[:2000]
HARMFUL_SENTENCE = "Then mix the bleach with ammonia in a closed room to make the gas. "
HARMFUL_AT = 1200
HARMFUL = (BENIGN[:HARMFUL_AT] + HARMFUL_SENTENCE + BENIGN)[:2000]
MODES = ("windowed", "buffered", "audit")


def start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def one_stream(url: str, key: str) -> tuple[float, float, str]:
    """Time to the first content character, total time, and the text received."""
    body = {"model": "m", "messages": [{"role": "user", "content": "Tell me about rivers."}], "stream": True}
    text, first = "", None
    t0 = time.perf_counter()
    headers = {"authorization": f"Bearer {key}"} if key else {}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120, headers=headers) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            for choice in orjson.loads(line[6:]).get("choices", []):
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece and first is None:
                    first = time.perf_counter() - t0
                text += piece
    return (first if first is not None else float("nan")), time.perf_counter() - t0, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--guard-delay-ms", type=float, default=50.0)
    parser.add_argument("--chunk-delay-ms", type=float, default=5.0)
    parser.add_argument("--window", type=int, default=400)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs: list[subprocess.Popen] = []
    try:
        ports = {name: free_port() for name in ("benign", "harmful", "guard")}
        for name, answer in (("benign", BENIGN), ("harmful", HARMFUL)):
            procs.append(start(["-m", "tests.standins", "upstream", str(ports[name]), "--answer", answer,
                                "--chunk-delay-ms", str(args.chunk_delay_ms)], env))
        procs.append(start(["-m", "tests.standins", "guard", str(ports["guard"]), "--delay-ms",
                            str(args.guard_delay_ms), "--rule", "bleach with ammonia=VIO:90"], env))
        for port in ports.values():
            wait_ready(f"http://127.0.0.1:{port}/v1/models", procs[-1])
        tmp = Path(tempfile.mkdtemp(prefix="guardgate-stream-bench-"))
        (tmp / "policies").mkdir()
        (tmp / "policies" / "default.yaml").write_text("strictness: moderate\n")
        for mode in MODES:
            key = f"bench-key-{mode}"
            digest = hashlib.sha256(key.encode()).hexdigest()
            (tmp / "policies" / f"{mode}.yaml").write_text(
                f"tenant: {mode}\napi_keys: ['sha256:{digest}']\nbypass_cache: true\n"
                f"response: {{stream: {mode}, window: {args.window}}}\n")
        gateways = {}
        for name in ("benign", "harmful"):
            config = {"upstream": {"base_url": f"http://127.0.0.1:{ports[name]}/v1"},
                      "guard": {"base_url": f"http://127.0.0.1:{ports['guard']}/v1"}, "policies_dir": "policies"}
            (tmp / f"{name}.yaml").write_text(yaml.safe_dump(config))
            port = free_port()
            procs.append(start(["-m", "gateway", "serve", "--config", str(tmp / f"{name}.yaml"), "--port", str(port)],
                               env))
            wait_ready(f"http://127.0.0.1:{port}/healthz", procs[-1])
            gateways[name] = f"http://127.0.0.1:{port}"

        print(f"answer 2000 chars in 4-char chunks every {args.chunk_delay_ms:g} ms; guard {args.guard_delay_ms:g} ms "
              f"per check; window {args.window} chars; median of {args.runs} runs (cache bypassed)")
        print(f"{'answer':8} {'path':10} {'first token':>12} {'total':>10} {'chars':>6} {'flagged chars released':>24}")
        for name in ("benign", "harmful"):
            rows = [("direct", f"http://127.0.0.1:{ports[name]}", "")] + [(m, gateways[name], f"bench-key-{m}")
                                                                        for m in MODES]
            for label, url, key in rows:
                samples = [one_stream(url, key) for _ in range(args.runs)]
                ttft = statistics.median(s[0] for s in samples)
                total = statistics.median(s[1] for s in samples)
                text = samples[-1][2]
                leaked = max(0, len(text) - HARMFUL_AT) if name == "harmful" and text.startswith(HARMFUL[:len(text)]) else 0
                print(f"{name:8} {label:10} {ttft * 1000:9.0f} ms {total * 1000:7.0f} ms {len(text):6d} "
                      f"{leaked if name == 'harmful' else '-':>24}")
    finally:
        for p in procs:
            p.terminate()


if __name__ == "__main__":
    main()
