"""What a hostile or broken client may hold: header limits, read timeouts, connection and in-flight caps.
Against `guardgate serve` in its own process, over raw sockets where a client library would not misbehave."""

from __future__ import annotations

import concurrent.futures
import socket
import time

import httpx
import orjson
import pytest
import yaml

from tests.conftest import closed_port, serve_gateway

LIMITS = {"header_timeout_s": 0.5, "body_timeout_s": 0.5, "keep_alive_timeout_s": 0.5, "max_connections": 20,
          "max_in_flight": 2, "max_header_bytes": 8192, "max_headers": 20}


@pytest.fixture
def served(tmp_path, guard, upstream):
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "default.yaml").write_text("strictness: moderate\n")
    config = {"upstream": {"base_url": f"{upstream.url}/v1"}, "guard": {"base_url": f"{guard.url}/v1"},
              "policies_dir": "policies", "server": {"allow_open": True, **LIMITS}}
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(config))
    port = closed_port()
    proc = serve_gateway(tmp_path / "gateway.yaml", port)
    yield port
    proc.terminate()
    proc.communicate(timeout=20)


def read_all(s: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection (or `timeout`)."""
    s.settimeout(timeout)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return out


def status_and_error(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), orjson.loads(body)["error"] if body else {}


def test_an_oversized_header_gets_431_before_it_is_read_whole(served):
    with socket.create_connection(("127.0.0.1", served)) as s:
        # A small send buffer, so `sent` counts what the server took, not what this kernel queued.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-big: ")
        sent = 0
        try:
            for _ in range(64 * 16):  # up to 64 MiB, in 64 KiB writes
                s.sendall(b"a" * 65536)
                sent += 65536
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert sent < 4 * 1024 * 1024, "the server kept reading a header far past its limit"
        raw = read_all(s)
    status, error = status_and_error(raw)
    assert status == 431 and error["code"] == "request_header_fields_too_large"


def test_too_many_header_fields_get_431(served):
    with socket.create_connection(("127.0.0.1", served)) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n" + b"".join(b"x-h%d: 1\r\n" % i for i in range(40))
                  + b"\r\n")
        status, _ = status_and_error(read_all(s))
    assert status == 431


def test_a_slow_header_gets_408_and_the_socket_closed(served):
    with socket.create_connection(("127.0.0.1", served)) as s:
        started = time.monotonic()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")  # ... and never the rest
        raw = read_all(s)
        waited = time.monotonic() - started
    assert status_and_error(raw)[0] == 408 and 0.4 < waited < 3


def test_a_silent_connection_is_closed(served):
    with socket.create_connection(("127.0.0.1", served)) as s:
        started = time.monotonic()
        assert read_all(s) == b""  # closed without a word
        assert time.monotonic() - started < 3


def test_an_idle_keep_alive_connection_is_closed(served):
    with socket.create_connection(("127.0.0.1", served)) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        started = time.monotonic()
        raw = read_all(s)
    assert raw.startswith(b"HTTP/1.1 200") and time.monotonic() - started < 3


def test_a_slow_body_gets_408(served):
    with socket.create_connection(("127.0.0.1", served)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: 500\r\n\r\n{\"model\": ")
        started = time.monotonic()
        raw = read_all(s)
    assert status_and_error(raw)[0] == 408 and time.monotonic() - started < 3


def test_connections_past_the_cap_get_503_overloaded(served):
    held = [socket.create_connection(("127.0.0.1", served)) for _ in range(LIMITS["max_connections"])]
    try:
        time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", served)) as extra:
            raw = read_all(extra, timeout=2)
        status, error = status_and_error(raw)
        assert status == 503 and error["code"] == "overloaded" and b"retry-after: 1" in raw.lower()
    finally:
        for s in held:
            s.close()


def test_requests_past_the_in_flight_cap_get_503_overloaded_and_health_still_answers(served, upstream):
    upstream.answer_delay_s = 1.5
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    url = f"http://127.0.0.1:{served}"
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        slow = [pool.submit(httpx.post, f"{url}/v1/chat/completions", json=body, timeout=10) for _ in range(2)]
        time.sleep(0.5)
        refused = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10)
        assert httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        assert [f.result().status_code for f in slow] == [200, 200]
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded"
    assert refused.headers["retry-after"] == "1"
