"""Where a gateway process spends its time under load: py-spy samples while wrk keeps requests in flight.

    python bench/profile.py [--target cached|guard] [--concurrency 64] [--seconds 15] [--top 25] [--svg out.svg]

Starts the stand-ins and one `guardgate serve` (as bench/overhead.py does), drives it with wrk and records
it with `py-spy record` (pip install py-spy; it needs ptrace, which containers may forbid). Prints two tables
from the samples: the functions the process was in (self time), and the share of time under each part of
the stack (inclusive: the event loop, uvicorn, Starlette, GuardGate's own code, the HTTP client, logging …).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Wrk, process_tree  # noqa: E402
from overhead import Stack, target  # noqa: E402


def lit(text: str) -> re.Pattern[str]:
    return re.compile(re.escape(text))


THREADS = lit("(threading.py")
# Inclusive groups: a sample counts for a group when any frame of its stack is in that file / module.
GROUPS = [
    ("GuardGate's request handling (gateway/, the in-flight limit excepted), callees included", re.compile(r"\(gateway/(?!server)")),
    ("  pipeline: read, parse, forward, answer", lit("(gateway/pipeline.py")),
    ("  moderation (cache → decide → log)", lit("(gateway/moderation.py")),
    ("  verdict cache", lit("(gateway/cache.py")),
    ("  texts and request checks", lit("(gateway/texts.py")),
    ("  HTTP client wrapper (gateway/http.py)", lit("(gateway/http.py")),
    ("HTTP client (aiohttp)", lit("(aiohttp/")),
    ("httpx objects (Response, headers)", lit("(httpx/")),
    ("uvicorn (HTTP server)", lit("(uvicorn/")),
    ("Starlette (routing, Request, Response)", lit("(starlette/")),
    ("logging", lit("(logging/")),
    ("pydantic (request validation)", lit("(pydantic/")),
    ("other threads (the log writer)", THREADS),
    ("event loop alone (uvloop's C code: sockets, polling, callbacks)", None),
]


# Self time by package: where the CPU actually was, summing to 100%.
PACKAGES = [("GuardGate (gateway/)", "(gateway/"), ("aiohttp (HTTP client)", "(aiohttp/"), ("httpx", "(httpx/"),
            ("uvicorn", "(uvicorn/"), ("Starlette", "(starlette/"), ("asyncio (Python side)", "(asyncio/"),
            ("logging", "(logging/"), ("pydantic", "(pydantic/"), ("threading (the log writer waiting)", "(threading.py")]


def package_of(frame: str) -> str:
    if frame.startswith("Runner.run "):
        return "event loop alone (uvloop's C code)"
    return next((name for name, needle in PACKAGES if needle in frame), "other")


def frames(line: str) -> tuple[list[str], int]:
    stack, _, count = line.rpartition(" ")
    return stack.split(";"), int(count)


def summarise(raw: str, top: int) -> str:
    total = 0
    own: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    groups: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        if not line.strip():
            continue
        stack, count = frames(line)
        total += count
        own[_function(stack[-1])] += count
        packages[package_of(stack[-1])] += count
        # Only what runs under the event loop counts for a group (not the frames that started the server).
        loop = next((i for i, f in enumerate(stack) if f.startswith("Runner.run ")), None)
        inner = stack if loop is None else stack[loop + 1:]
        for name, needle in GROUPS:
            if needle is None:
                groups[name] += count * (loop is not None and not inner)
            elif any(needle.search(f) for f in (stack if needle is THREADS else inner)):
                groups[name] += count
    out = [f"{total} samples", "", "| share (self) | package |", "|---|---|"]
    out += [f"| {100 * count / total:.1f}% | {name} |" for name, count in packages.most_common()]
    out += ["", "| share (inclusive) | part of the stack |", "|---|---|"]
    out += [f"| {100 * groups[name] / total:.1f}% | {name} |" for name, _ in GROUPS]
    out += ["", "| share (self) | function (file:line) |", "|---|---|"]
    for frame, count in own.most_common(top):
        out.append(f"| {100 * count / total:.1f}% | `{frame}` |")
    return "\n".join(out)


def _function(frame: str) -> str:
    """py-spy's "function (file.py:line)" without the line: one row per function."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rpartition(':')[0]})" if where else name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=["cached", "guard"], default="cached")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--svg", type=Path, help="also write a flame graph here")
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("py-spy is not installed: pip install py-spy")
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install wrk")
    with Stack() as stack:
        upstream, _ = stack.standin("upstream")
        guard, _ = stack.standin("guard")
        policy = "bypass_cache: true\n" if args.target == "guard" else ""
        url, proc = stack.guardgate(args.target, upstream, guard, policy=policy)
        t = target(f"guardgate-{args.target}", url, proc)
        load = Wrk()
        load.run(t, 16, 1)  # warm
        pid = process_tree(proc.pid)[0]
        raw = Path(tempfile.mkdtemp(prefix="guardgate-spy-")) / "stacks.txt"
        result: dict[str, float] = {}
        driver = threading.Thread(target=lambda: result.update(rps=load.run(t, args.concurrency, args.seconds + 2).rps))
        driver.start()
        record = [spy, "record", "--pid", str(pid), "--duration", str(args.seconds), "--rate", "250",
                  "--nonblocking"]
        done = subprocess.run(record + ["--format", "raw", "--output", str(raw)], capture_output=True, text=True)
        if done.returncode != 0:
            driver.join()
            raise SystemExit(f"py-spy failed (ptrace not permitted here?):\n{done.stderr[-2000:]}")
        if args.svg:
            subprocess.run(record + ["--format", "flamegraph", "--output", str(args.svg)], capture_output=True)
        driver.join()
    print(f"guardgate-{args.target}, {args.concurrency} in flight, {result.get('rps', 0):.0f} req/s while sampled")
    print(summarise(raw.read_text(), args.top))


if __name__ == "__main__":
    main()
