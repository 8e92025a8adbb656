"""What GuardGate costs its users: latency added, throughput kept, CPU per request, against the upstream itself.

    python bench/overhead.py [--rounds 3] [--seconds 5] [--workers 2] [--json out.json]

Starts, each in its own process on loopback: a stand-in upstream and a stand-in vLLM guard
(`tests.standins`, answering at once), the do-nothing floor proxy (bench/floor_proxy.py: the same server
stack and HTTP client as the gateway, no work), and `guardgate serve` twice: one where every verdict is a
cache hit (the same request each time) and one whose policy bypasses the cache, so that the guard is asked
for each of the 3 texts (2 prompt messages and the answer) of every request. With --workers N, a third
gateway (cached verdicts) runs N workers.

Load comes from wrk (see bench/harness.py); for each target, interleaved, every round: p50/p99 at 1 in
flight, req/s and the target's own CPU ms per request at 16 and 64 in flight, time to the first streamed
byte and to the first answer text (a streamed request, one at a time), and RSS after the round.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BODY, HEADERS, REPO, free_port, wait_ready  # noqa: E402
from harness import Results, Target, added, machine, measure, ratios, spread  # noqa: E402

STREAM_BODY = BODY[:-1] + b',"stream":true}'


class Stack(contextlib.ExitStack):
    """Processes started for a benchmark, all stopped (SIGTERM, then waited for) when it ends."""

    def __init__(self) -> None:
        super().__init__()
        self.env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.tmp = Path(tempfile.mkdtemp(prefix="guardgate-bench-"))
        self.guard_url = ""

    def start(self, args: list[str], ready: str, env: dict[str, str] | None = None, cwd: Path = REPO,
              **popen) -> subprocess.Popen:
        proc = subprocess.Popen(args, env={**self.env, **(env or {})}, cwd=cwd, **popen)

        def stop() -> None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.callback(stop)
        wait_ready(ready, proc)
        return proc

    def standin(self, kind: str, *extra: str) -> tuple[str, subprocess.Popen]:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = self.start([sys.executable, "-m", "tests.standins", kind, str(port), *extra], f"{url}/v1/models")
        if kind == "guard":
            self.guard_url = url
        return url, proc

    def floor(self, upstream: str) -> tuple[str, subprocess.Popen]:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = self.start([sys.executable, "-m", "uvicorn", "floor_proxy:app", "--app-dir", str(REPO / "bench"),
                           "--port", str(port), "--log-level", "warning", "--no-access-log"], f"{url}/healthz",
                          env={"UPSTREAM": upstream})
        return url, proc

    def guardgate(self, name: str, upstream: str, guard: str, *, policy: str = "", workers: int = 1,
                  extra: dict | None = None) -> tuple[str, subprocess.Popen]:
        folder = self.tmp / name
        (folder / "policies").mkdir(parents=True)
        (folder / "policies" / "default.yaml").write_text("strictness: moderate\n" + policy)
        config = {"upstream": {"base_url": f"{upstream}/v1", "api_key": "sk-bench"},
                  "guard": {"base_url": f"{guard}/v1"}, "policies_dir": "policies",
                  "server": {"allow_open": True, "workers": workers}, **(extra or {})}
        (folder / "gateway.yaml").write_text(yaml.safe_dump(config))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = self.start([sys.executable, "-m", "gateway", "serve", "--config", str(folder / "gateway.yaml"),
                           "--port", str(port)], f"{url}/healthz",
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # decision logs written, not kept
        return url, proc


def target(name: str, base: str, proc: subprocess.Popen) -> Target:
    return Target(name, base, proc.pid, BODY, STREAM_BODY, HEADERS)


@contextlib.contextmanager
def gateway_targets(stack: Stack, workers: int) -> Iterator[list[Target]]:
    upstream, up_proc = stack.standin("upstream")
    guard, _ = stack.standin("guard")
    floor, floor_proc = stack.floor(upstream)
    cached, cached_proc = stack.guardgate("cached", upstream, guard)
    asked, asked_proc = stack.guardgate("guard", upstream, guard, policy="bypass_cache: true\n")
    targets = [target("direct", upstream, up_proc), target("floor", floor, floor_proc),
               target("guardgate-cached", cached, cached_proc), target("guardgate-guard", asked, asked_proc)]
    if workers > 1:
        multi, multi_proc = stack.guardgate(f"cached-{workers}w", upstream, guard, workers=workers)
        targets.append(target(f"guardgate-cached-{workers}w", multi, multi_proc))
    yield targets


def table(res: Results, names: list[str], base: str = "direct") -> str:
    rows = [
        ("p50 at 1 in flight, ms", lambda n: spread(res.get("p50_c1", n))),
        ("added p50 at 1 in flight, ms", lambda n: spread(added(res, "p50_c1", n, base))),
        ("added p99 at 1 in flight, ms", lambda n: spread(added(res, "p99_c1", n, base))),
        ("first streamed byte, ms", lambda n: spread(res.get("first_byte", n))),
        ("first answer text, ms (added)", lambda n: f"{spread(res.get('first_text', n))} "
                                                    f"(+{spread(added(res, 'first_text', n, base))})"),
        ("req/s, 16 in flight", lambda n: spread(res.get("rps_c16", n), "{:.0f}")),
        ("req/s, 64 in flight", lambda n: spread(res.get("rps_c64", n), "{:.0f}")),
        (f"req/s vs {base}, 16 in flight", lambda n: spread(ratios(res, "rps_c16", n, base))),
        (f"req/s vs {base}, 64 in flight", lambda n: spread(ratios(res, "rps_c64", n, base))),
        ("CPU ms per request, 16 in flight", lambda n: spread(res.get("cpu_ms_c16", n), "{:.3f}")),
        ("CPU ms per request, 64 in flight", lambda n: spread(res.get("cpu_ms_c64", n), "{:.3f}")),
        ("RSS, MB", lambda n: spread(res.get("rss_mb", n), "{:.0f}")),
        ("failed requests", lambda n: str(res.errors.get(n, 0))),
    ]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {label} | " + " | ".join(cell(n) for n in names) + " |" for label, cell in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="each load run")
    parser.add_argument("--workers", type=int, default=1, help="also measure a gateway with this many workers")
    parser.add_argument("--json", type=Path, help="write every round's figures here")
    args = parser.parse_args()
    print(machine())
    with Stack() as stack, gateway_targets(stack, args.workers) as targets:
        res = measure(targets, args.rounds, args.seconds, progress=lambda s: print(s, file=sys.stderr))
    print(f"\nmedian [min–max] over {args.rounds} rounds; ratios and added latency taken within each round\n")
    print(table(res, [t.name for t in targets]))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "values": res.values, "errors": res.errors}, indent=1))


if __name__ == "__main__":
    main()
