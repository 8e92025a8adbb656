"""`guardgate serve --workers 2` as a user runs it: both workers serve, share verdicts through Redis,
reload policies, and drain on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import yaml

from tests.conftest import ADMIN_KEY, closed_port, guardgate_command, serve_gateway
from tests.standins import Rule

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def chat(client: httpx.Client, text: str) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": text}]})


def pid_of(client: httpx.Client) -> int:
    """The worker serving this client's (one, kept-alive) connection."""
    return client.get("/admin/readiness", headers=ADMIN).json()["pid"]


def one_client_per_worker(base: str, workers: int) -> dict[int, httpx.Client]:
    """New connections until each worker holds one (the kernel spreads them over the workers)."""
    clients: dict[int, httpx.Client] = {}
    for _ in range(200):
        client = httpx.Client(base_url=base, timeout=30, limits=httpx.Limits(max_connections=1))
        pid = pid_of(client)
        if pid in clients:
            client.close()
        else:
            clients[pid] = client
        if len(clients) == workers:
            return clients
    raise AssertionError(f"only {len(clients)} of {workers} workers ever answered")


def parent_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError("no PPid")


def test_two_workers_serve_share_verdicts_reload_policies_and_drain_on_sigterm(tmp_path, guard, upstream,
                                                                                redis_server):
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "default.yaml").write_text("strictness: moderate\n")
    config = {"upstream": {"base_url": f"{upstream.url}/v1", "api_key": "sk-test"},
              "guard": {"base_url": f"{guard.url}/v1", "model": guard.model},
              "cache": {"redis_url": redis_server.url},
              "policies_dir": "policies", "policies_reload_s": 0.2,
              "server": {"allow_open": True, "admin_key": ADMIN_KEY}}
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(config))
    port = closed_port()
    proc = serve_gateway(tmp_path / "gateway.yaml", port, args=("--workers", "2"))
    clients: dict[int, httpx.Client] = {}
    try:
        clients = one_client_per_worker(f"http://127.0.0.1:{port}", 2)
        (a, first), (b, second) = clients.items()
        assert parent_of(a) == parent_of(b) == proc.pid

        # A verdict scored in one worker is a Redis hit in the other.
        scored = chat(first, "Tell me about tides")
        assert scored.status_code == 200 and scored.headers["x-guard-prompt-verdict-from"] == "guard"
        assert len(guard.requests) == 2
        with redis_server.client() as r:
            deadline = time.monotonic() + 5
            while r.dbsize() < 2 and time.monotonic() < deadline:  # written after the answer went out
                time.sleep(0.05)
        hit = chat(second, "Tell me about tides")
        assert hit.json()["choices"][0]["message"]["content"] == "You said: Tell me about tides"
        assert hit.headers["x-guard-prompt-verdict-from"] == "redis"
        assert hit.headers["x-guard-response-verdict-from"] == "redis"
        assert len(guard.requests) == 2

        # A policy edit reaches every worker.
        guard.rules.append(Rule("sailing", "VIO", 30))
        assert all(chat(c, "sailing lessons").status_code == 200 for c in clients.values())  # 30 < moderate 40
        (policies / "default.yaml").write_text("strictness: strict\n")
        for client in clients.values():
            deadline = time.monotonic() + 10
            while chat(client, "sailing lessons").status_code != 400:  # 30 >= strict 20
                assert time.monotonic() < deadline, "a worker never reloaded the policy"
                time.sleep(0.1)

        # SIGTERM: each worker finishes the request it is serving, then every process exits.
        upstream.answer_delay_s = 1.5
        answers: dict[int, httpx.Response] = {}
        threads = [threading.Thread(target=lambda p=p, c=c: answers.__setitem__(p, chat(c, "slow one")))
                   for p, c in clients.items()]
        for t in threads:
            t.start()
        time.sleep(0.5)  # both requests are waiting on the upstream
        proc.terminate()
        for t in threads:
            t.join(20)
        assert {p: r.status_code for p, r in answers.items()} == {a: 200, b: 200}
        assert all(r.json()["choices"][0]["message"]["content"] == "You said: slow one" for r in answers.values())
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out[-3000:]
        assert not Path(f"/proc/{a}").exists() and not Path(f"/proc/{b}").exists()
    finally:
        for c in clients.values():
            c.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # Both workers' decision lines were written before they exited, none with text or secrets.
    lines = [yaml.safe_load(line) for line in out.splitlines() if line.startswith("{")]
    started = next(line for line in lines if line.get("event") == "workers_started")
    assert not Path(started["metrics_dir"]).exists()  # the supervisor's own metrics folder is removed
    decisions = [line for line in lines if line.get("event") == "decision"]
    assert sum(d["stage"] == "prompt" for d in decisions) >= 6
    assert "sk-test" not in out and "tides" not in out


def gone(pid: int) -> bool:
    path = Path(f"/proc/{pid}/status")
    return not path.exists() or "State:\tZ" in path.read_text()


def test_a_dead_worker_is_replaced_even_after_failed_starts_and_workers_leave_with_a_killed_supervisor(tmp_path, guard, upstream):
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "default.yaml").write_text("strictness: moderate\n")
    # Quiet: this test polls for up to a minute and reads the output only at the end; an access line per
    # poll filled the 64 KB pipe, and a worker blocked on its log write could neither serve nor exit.
    config = {"upstream": {"base_url": f"{upstream.url}/v1"}, "guard": {"base_url": f"{guard.url}/v1"},
              "policies_dir": "policies",
              "server": {"allow_open": True, "admin_key": ADMIN_KEY, "workers": 2, "log_level": "warning"}}
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(config))
    port = closed_port()
    proc = serve_gateway(tmp_path / "gateway.yaml", port)  # server.workers: 2 in the file
    try:
        base = f"http://127.0.0.1:{port}"
        clients = one_client_per_worker(base, 2)
        first, second = clients
        for c in clients.values():
            c.close()
        time.sleep(5.5)  # past the start-up window (a worker dying sooner is a failed start, not a crash)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while True:
            try:
                pids = set(one_client_per_worker(base, 2))
                if first not in pids:
                    break
            except (AssertionError, httpx.HTTPError):
                pass
            assert time.monotonic() < deadline, "the killed worker was not replaced"
            time.sleep(0.2)
        assert second in pids and len(pids) == 2

        # A replacement that cannot start (the policy file broke meanwhile) leaves the other worker serving,
        # and is tried again until it can.
        (tmp_path / "policies" / "default.yaml").write_bytes(b"strictness: \xff\xfe\n")
        replaced = next(p for p in pids if p != second)
        time.sleep(5.5)
        os.kill(replaced, signal.SIGKILL)
        for _ in range(30):  # ~6 s of requests while the slot keeps failing to start
            assert httpx.get(f"{base}/readyz", timeout=5).status_code == 200
            time.sleep(0.2)
        assert proc.poll() is None
        (tmp_path / "policies" / "default.yaml").write_text("strictness: moderate\n")
        deadline = time.monotonic() + 20
        while True:
            try:
                pids = set(one_client_per_worker(base, 2))
                if replaced not in pids:
                    break
            except (AssertionError, httpx.HTTPError):
                pass
            assert time.monotonic() < deadline, "the slot never came back once the policy was fixed"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)  # cannot be forwarded: the workers notice their parent is gone
        proc.wait(5)
        deadline = time.monotonic() + 10
        while not all(gone(p) for p in pids):
            assert time.monotonic() < deadline, "workers outlived their supervisor"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_workers_that_cannot_start_stop_the_supervisor(tmp_path, guard, upstream):
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "default.yaml").write_text("strictness: moderate\n")
    config = {"upstream": {"base_url": f"{upstream.url}/v1"}, "guard": {"base_url": f"{guard.url}/v1"},
              "policies_dir": "policies", "server": {"allow_open": True}}
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(config))
    with socket.socket() as taken:  # the port is held by a socket that does not share it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = subprocess.run(guardgate_command() + ["serve", "--config", str(tmp_path / "gateway.yaml"), "--port",
                                                     str(taken.getsockname()[1]), "--workers", "2"],
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "worker_exit" in proc.stdout + proc.stderr


def metric(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and labels.items() <= s.labels.items())


def test_metrics_add_up_over_two_workers_in_the_supervisors_metrics_folder(tmp_path, guard, upstream):
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "default.yaml").write_text("strictness: moderate\n")
    config = {"upstream": {"base_url": f"{upstream.url}/v1"}, "guard": {"base_url": f"{guard.url}/v1"},
              "policies_dir": "policies", "server": {"allow_open": True, "admin_key": ADMIN_KEY}}
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(config))
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_999999.db").write_bytes(b"left by an earlier run")  # must not be read
    port = closed_port()
    proc = serve_gateway(tmp_path / "gateway.yaml", port, args=("--workers", "2"),
                         env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    clients: dict[int, httpx.Client] = {}
    try:
        assert not (metrics_dir / "counter_999999.db").exists()
        clients = one_client_per_worker(f"http://127.0.0.1:{port}", 2)
        (a, first), (b, second) = clients.items()
        guard.rules.append(Rule("pipe bomb", "VIO", 95))
        assert chat(first, "hello from a").status_code == 200
        assert chat(second, "hello from b").status_code == 200
        assert chat(second, "a pipe bomb").status_code == 400
        guard.failure = "500"
        assert chat(first, "guard down").status_code == 503
        guard.failure = None

        def scraped(client: httpx.Client) -> str:
            resp = client.get("/metrics", headers=ADMIN)
            assert resp.status_code == 200
            return resp.text

        for client in (first, second):  # either worker answers for both
            text = scraped(client)
            assert metric(text, "guardgate_requests_total", route="chat_completions", outcome="allowed") == 2
            assert metric(text, "guardgate_requests_total", route="chat_completions", outcome="blocked_prompt") == 1
            assert metric(text, "guardgate_requests_total", route="chat_completions", outcome="guard_error") == 1
            assert metric(text, "guardgate_guard_calls_total", result="ok") == 5
        assert {p.name for p in metrics_dir.glob("gauge_livesum_*.db")} == {f"gauge_livesum_{a}.db",
                                                                            f"gauge_livesum_{b}.db"}

        # A worker that dies: its gauges leave the folder (marked dead), its counts stay in the totals.
        time.sleep(5.5)  # past the start-up window, so the supervisor replaces it rather than stopping
        os.kill(a, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (metrics_dir / f"gauge_livesum_{a}.db").exists():
            assert time.monotonic() < deadline, "the dead worker's gauges were never removed"
            time.sleep(0.1)
        assert metric(scraped(second), "guardgate_requests_total", route="chat_completions", outcome="allowed") == 2
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out[-3000:]
    finally:
        for c in clients.values():
            c.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert metrics_dir.is_dir()  # the operator's folder is kept; only a folder of our own is removed
