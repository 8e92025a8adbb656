"""The verdict cache on highly available Redis: a real Sentinel set-up and a real Cluster, from redis-server.

Through the openai SDK and real gateways (a second process shares verdicts only through Redis), and the
cache itself for a batch whose keys span every Cluster node.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from gateway.cache import ScoredVerdict, VerdictCache
from gateway.guard.base import GuardInput
from tests.conftest import ADMIN_KEY, closed_port, serve_gateway
from tests.redis_ha import ClusterSetup, SentinelSetup, wait_for
from tests.test_cache import FakeGuard, fake_verdict


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[SentinelSetup]:
    setup = SentinelSetup(tmp_path / "sentinel")
    yield setup
    setup.stop()


@pytest.fixture(scope="module")
def cluster_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSetup]:
    setup = ClusterSetup(Path(tmp_path_factory.mktemp("cluster")))
    yield setup
    setup.stop()


def chat(url: str, text: str):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=30)
    return client.chat.completions.with_raw_response.create(model="m", messages=[{"role": "user", "content": text}])


def ha_gateway(make_gateway, url: str):
    return make_gateway(cache={"redis_url": url, "retry_after_s": 0.2, "redis_timeout_s": 0.5})


def second_process_sees(config_path: Path, text: str) -> None:
    """Another `guardgate serve` on the same config answers `text` from Redis, for both stages."""
    port = closed_port()
    proc = serve_gateway(config_path, port)
    try:
        def cache_ok() -> bool:  # a Cluster client maps the cluster first, in the background
            return httpx.get(f"http://127.0.0.1:{port}/admin/readiness", headers={
                "authorization": f"Bearer {ADMIN_KEY}"}).json()["checks"]["cache"]["status"] == "ok"
        wait_for(cache_ok, "the second gateway's cache to be connected", 15)
        raw = chat(f"http://127.0.0.1:{port}", text)
        assert raw.parse().choices[0].message.content == f"You said: {text}"
        assert raw.headers["x-guard-prompt-verdict-from"] == "redis"
        assert raw.headers["x-guard-response-verdict-from"] == "redis"
    finally:
        proc.terminate()
        proc.wait(10)


# ----- Sentinel -----


def test_a_verdict_cached_through_sentinel_is_a_hit_for_a_second_gateway_process(
        make_gateway, sentinel_setup, guard, upstream):
    gw = ha_gateway(make_gateway, sentinel_setup.url)
    assert chat(gw.url, "Tell me about tides").headers["x-guard-prompt-verdict-from"] == "guard"
    assert len(guard.requests) == 2
    with sentinel_setup.master.client() as master:
        assert master.dbsize() == 2  # written to the master Sentinel names
    second_process_sees(gw.config_path, "Tell me about tides")
    assert len(guard.requests) == 2
    assert gw.details()["checks"]["cache"]["status"] == "ok"


def test_a_sentinel_failover_loses_no_request_and_the_cache_follows_the_new_master(
        make_gateway, sentinel_setup, guard, upstream):
    gw = ha_gateway(make_gateway, sentinel_setup.url)
    chat(gw.url, "cached before the failover")
    with sentinel_setup.replica.client() as replica:
        wait_for(lambda: replica.dbsize() == 2, "the verdicts to reach the replica")
    old_port = sentinel_setup.master.port
    sentinel_setup.master.stop()  # killed: the Sentinel promotes the replica after ~1 s of silence

    i = 0
    deadline = time.monotonic() + 30
    while sentinel_setup.master_port() == old_port:  # every request answered, scored by the guard meanwhile
        assert time.monotonic() < deadline, "the Sentinel did not fail over"
        raw = chat(gw.url, f"during the failover {i}")
        assert raw.parse().choices[0].message.content == f"You said: during the failover {i}"
        i += 1
        time.sleep(0.1)
    assert i > 0
    assert httpx.get(f"{gw.url}/readyz").status_code == 200
    assert sentinel_setup.master_port() == sentinel_setup.replica.port

    # The same gateway writes to the new master on its own, once Sentinel names it.
    with sentinel_setup.replica.client() as new_master:
        def written() -> bool:
            chat(gw.url, f"after the failover {time.monotonic()}")
            return new_master.dbsize() > 2
        wait_for(written, "a verdict written to the new master")
    assert gw.details()["checks"]["cache"]["status"] == "ok"
    # A verdict cached before the failover is still shared: a fresh process reads it from the new master.
    calls = len(guard.requests)
    second_process_sees(gw.config_path, "cached before the failover")
    assert len(guard.requests) == calls


def test_unreachable_sentinels_never_fail_a_request(make_gateway, guard, upstream):
    url = f"redis+sentinel://127.0.0.1:{closed_port()},127.0.0.1:{closed_port()}/mymaster/0"
    gw = ha_gateway(make_gateway, url)
    for i in range(3):
        raw = chat(gw.url, f"no sentinel {i}")
        assert raw.parse().choices[0].finish_reason == "stop"
        assert raw.headers["x-guard-prompt-verdict-from"] == "guard"
    assert gw.details()["checks"]["cache"]["status"].startswith("degraded")


# ----- Cluster -----


def cluster_keys(setup: ClusterSetup) -> int:
    total = 0
    for node in setup.nodes:
        if node.proc is not None:
            with node.client() as c:
                total += c.dbsize()
    return total


def until_the_cluster_is_in_use(gw, setup: ClusterSetup) -> None:
    """The client maps the Cluster in the background; meanwhile requests are scored without it."""
    before = cluster_keys(setup)

    def written() -> bool:
        raw = chat(gw.url, f"mapping the cluster {time.monotonic()}")
        assert raw.parse().choices[0].finish_reason == "stop"
        return cluster_keys(setup) > before
    wait_for(written, "verdicts written to the Cluster", 15)


def test_a_verdict_cached_in_a_cluster_is_a_hit_for_a_second_gateway_process(
        make_gateway, cluster_setup, guard, upstream):
    gw = make_gateway(cache={"redis_url": cluster_setup.url})  # the default timeouts (0.1 s a call)
    until_the_cluster_is_in_use(gw, cluster_setup)
    assert chat(gw.url, "What is a haiku?").headers["x-guard-prompt-verdict-from"] == "guard"
    calls = len(guard.requests)
    wait_for(lambda: cluster_keys(cluster_setup) >= 2, "the verdicts written")
    second_process_sees(gw.config_path, "What is a haiku?")
    assert len(guard.requests) == calls
    assert gw.details()["checks"]["cache"]["status"] == "ok"


def test_one_batch_spans_every_cluster_node_and_is_read_back_whole(cluster_setup):
    items = [GuardInput("prompt", f"cluster text {i}") for i in range(30)]

    async def run() -> None:
        # A generous timeout: this is about spanning slots (one MGET per slot, over three nodes), not speed.
        one, two = (VerdictCache(cluster_setup.url, redis_timeout_s=5) for _ in range(2))
        g1, g2 = FakeGuard(), FakeGuard()
        try:
            one.start()
            while (await one.ready())[1] != "ok":
                await asyncio.sleep(0.01)
            assert [sv.source for sv in await one.score(g1, items)] == ["guard"] * 30
            await one.aclose()  # lets the Redis write finish
            two.start()
            while (await two.ready())[1] != "ok":  # mapping the Cluster, in the background
                await asyncio.sleep(0.01)
            # Keys spread over the slots, so over all three masters; one MGET per slot, back in order.
            out = await two.score(g2, items)
            assert out == [ScoredVerdict(fake_verdict(i), "redis") for i in items]
            assert g2.calls == [] and two.stats()["redis_errors"] == 0
        finally:
            await two.aclose()

    asyncio.run(run())
    sizes = []
    for node in cluster_setup.nodes:
        with node.client() as c:
            sizes.append(c.dbsize())
    assert all(n > 0 for n in sizes) and sum(sizes) >= 30


def test_a_cluster_node_going_away_fails_no_request(make_gateway, tmp_path, guard, upstream):
    setup = ClusterSetup(tmp_path / "cluster")
    try:
        gw = ha_gateway(make_gateway, setup.url)
        until_the_cluster_is_in_use(gw, setup)
        setup.nodes[2].stop()  # its slots are lost: no replica takes them over
        for i in range(10):  # whichever node a text's key lives on, the request is answered
            raw = chat(gw.url, f"one node down {i}")
            assert raw.parse().choices[0].message.content == f"You said: one node down {i}"
        assert httpx.get(f"{gw.url}/readyz").status_code == 200
    finally:
        setup.stop()
