"""Load and measurement shared by bench/overhead.py and bench/vs_litellm.py.

Load comes from `wrk` where it is installed (`apt-get install wrk`): a C load generator that costs a small
fraction of a core, so what is measured is the server, not the client. Without wrk, a Python client (aiohttp
on uvloop) stands in, with a warning: it spends several times wrk's CPU per request, on the cores the
servers need, so its throughput figures are a floor.

Every figure is taken for every target in the same round, targets interleaved (the order rotating each
round), and ratios are computed within a round, then summarised as min / median / max over the rounds.
CPU time and RSS come from /proc of each target's serving processes (a supervisor's workers included).
"""

from __future__ import annotations

import asyncio
import http.client
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Target:
    name: str
    base: str  # http://127.0.0.1:PORT
    pid: int  # the serving process; its descendants (workers) are counted with it
    body: bytes
    stream_body: bytes
    headers: dict[str, str]
    path: str = "/v1/chat/completions"

    @property
    def url(self) -> str:
        return self.base + self.path


# ------------------------------------------------------------------ /proc ----

def process_tree(pid: int) -> list[int]:
    """pid and every descendant."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rpartition(")")[2].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / CLK_TCK


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except OSError:
            continue
    return total / 2**20


# ------------------------------------------------------------------- load ----

@dataclass
class Load:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def _lua_string(data: bytes) -> str:
    return "[==[" + data.decode() + "]==]"


class Wrk:
    name = "wrk"

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="guardgate-wrk-"))

    def run(self, target: Target, concurrency: int, seconds: float) -> Load:
        script = self.tmp / f"{target.name}.lua"
        script.write_text("wrk.method = 'POST'\nwrk.body = " + _lua_string(target.body) + "\n"
                          + "".join(f"wrk.headers[ {_lua_string(k.encode())} ] = {_lua_string(v.encode())}\n"
                                    for k, v in target.headers.items()))
        out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--latency", "--timeout", "30s",
                              "-s", str(script), target.url], capture_output=True, text=True, check=True).stdout
        done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m),", out)
        if not done:
            raise RuntimeError(f"unreadable wrk output:\n{out}")
        dist = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
        errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
        sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
        if sock:
            errors += sum(int(n) for n in sock.groups())
        requests = int(done.group(1))
        if errors > requests / 100:
            raise RuntimeError(f"{target.name}: {errors} of {requests} requests failed:\n{out}")
        return Load(requests, _ms(done.group(2) + done.group(3)) / 1000, _ms(dist["50"]), _ms(dist["99"]), errors)


class PythonLoad:
    """The fallback: aiohttp on uvloop, `concurrency` workers for `seconds`."""

    name = "python (aiohttp)"

    def run(self, target: Target, concurrency: int, seconds: float) -> Load:
        import uvloop

        return uvloop.run(self._run(target, concurrency, seconds))

    async def _run(self, target: Target, concurrency: int, seconds: float) -> Load:
        import aiohttp

        latencies: list[float] = []
        errors = 0
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
            end = time.perf_counter() + seconds

            async def worker() -> None:
                nonlocal errors
                while time.perf_counter() < end:
                    t0 = time.perf_counter()
                    async with session.post(target.url, data=target.body, headers=target.headers) as resp:
                        await resp.read()
                        errors += resp.status != 200
                    latencies.append((time.perf_counter() - t0) * 1000)

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - t0
        ordered = sorted(latencies)
        return Load(len(ordered), elapsed, ordered[len(ordered) // 2], ordered[int(len(ordered) * 0.99)], errors)


def loader() -> Wrk | PythonLoad:
    if shutil.which("wrk"):
        return Wrk()
    print("WARNING: wrk is not installed (apt-get install wrk): falling back to a Python client, which competes "
          "with the servers for the CPU: throughput figures are a floor.",
          file=sys.stderr)
    return PythonLoad()


def first_bytes(target: Target, n: int) -> tuple[float, float]:
    """Medians over n streamed requests, one at a time on one kept-alive connection: ms to the first byte
    of the body, and ms to the first event that carries answer text."""
    url = urlsplit(target.base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    first, text = [], []
    has_text = re.compile(rb'"content":"[^"]')
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            conn.request("POST", target.path, body=target.stream_body, headers=target.headers)
            resp = conn.getresponse()
            assert resp.status == 200, (target.name, resp.status, resp.read()[:300])
            t_first = t_text = None
            seen = b""
            while chunk := resp.read1(65536):
                now = time.perf_counter()
                t_first = t_first or now
                seen += chunk
                if t_text is None and has_text.search(seen):
                    t_text = now
            resp.read()  # the end of the chunked body, so the connection can carry the next request
            assert t_first and t_text, (target.name, seen[:300])
            first.append((t_first - t0) * 1000)
            text.append((t_text - t0) * 1000)
    finally:
        conn.close()
    return statistics.median(first), statistics.median(text)


# ------------------------------------------------------------------ rounds ----

@dataclass
class Results:
    """metric → target → one value per round."""

    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    def add(self, metric: str, target: str, value: float) -> None:
        self.values.setdefault(metric, {}).setdefault(target, []).append(value)

    def get(self, metric: str, target: str) -> list[float]:
        return self.values.get(metric, {}).get(target, [])


def measure(targets: list[Target], rounds: int, seconds: float, levels: tuple[int, ...] = (16, 64),
            first_byte_requests: int = 100, progress: Callable[[str], None] = print) -> Results:
    load = loader()
    res = Results()
    for t in targets:  # warm pools, caches and the interpreter's own caches
        load.run(t, 16, 1)
        first_bytes(t, 5)
    for r in range(rounds):
        order = targets[r % len(targets):] + targets[:r % len(targets)]
        progress(f"round {r + 1}/{rounds}: {', '.join(t.name for t in order)}")
        for t in order:
            one = load.run(t, 1, seconds)
            res.add("p50_c1", t.name, one.p50_ms)
            res.add("p99_c1", t.name, one.p99_ms)
            res.errors[t.name] = res.errors.get(t.name, 0) + one.errors
        for c in levels:
            for t in order:
                pids = process_tree(t.pid)
                cpu0 = cpu_seconds(pids)
                run = load.run(t, c, seconds)
                cpu = cpu_seconds(pids) - cpu0
                res.add(f"rps_c{c}", t.name, run.rps)
                res.add(f"cpu_ms_c{c}", t.name, cpu * 1000 / max(run.requests, 1))
                res.add(f"p50_c{c}", t.name, run.p50_ms)
                res.errors[t.name] = res.errors.get(t.name, 0) + run.errors
        for t in order:
            fb, ft = first_bytes(t, first_byte_requests)
            res.add("first_byte", t.name, fb)
            res.add("first_text", t.name, ft)
        for t in order:
            res.add("rss_mb", t.name, rss_mb(process_tree(t.pid)))
    return res


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """median [min–max]"""
    if not values:
        return "–"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} [{fmt.format(min(values))}–{fmt.format(max(values))}]"


def ratios(res: Results, metric: str, a: str, b: str) -> list[float]:
    """a / b within each round."""
    return [x / y for x, y in zip(res.get(metric, a), res.get(metric, b)) if y]


def added(res: Results, metric: str, a: str, base: str) -> list[float]:
    """a − base within each round."""
    return [x - y for x, y in zip(res.get(metric, a), res.get(metric, base))]


def machine() -> str:
    model = ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores {model}, Python {sys.version.split()[0]}, load avg {os.getloadavg()[0]:.2f}"
