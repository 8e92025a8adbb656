"""`cache.redis_url` for Sentinel and Cluster: what each URL names, and the clear refusals."""

from __future__ import annotations

import pytest

from gateway.config import GatewayConfig
from gateway.logs import redact_url
from gateway.redis_client import RedisTarget, parse_redis_url


def test_plain_urls_are_left_to_redis_py():
    for url in ("redis://127.0.0.1:6379/0", "rediss://:pw@db:6380/1", "unix:///run/redis.sock"):
        assert parse_redis_url(url) is None


def test_a_sentinel_url_names_the_sentinels_the_master_and_the_database():
    assert parse_redis_url("redis+sentinel://:s3cret@sen-a:26379,sen-b:26380,[::1]:26381/mymaster/2"
                           "?sentinel_password=sen%2Fpw") == RedisTarget(
        "sentinel", (("sen-a", 26379), ("sen-b", 26380), ("::1", 26381)), "mymaster", 2,
        password="s3cret", sentinel_password="sen/pw")
    target = parse_redis_url("rediss+sentinel://app:pw@sen-a:26379/cache")
    assert target == RedisTarget("sentinel", (("sen-a", 26379),), "cache", 0, "app", "pw", ssl=True)


def test_a_cluster_url_names_its_seed_nodes():
    assert parse_redis_url("redis+cluster://:pw@node-a:7000,node-b:7001") == RedisTarget(
        "cluster", (("node-a", 7000), ("node-b", 7001)), password="pw")
    assert parse_redis_url("rediss+cluster://node-a:7000/0").ssl is True  # type: ignore[union-attr]


@pytest.mark.parametrize(("url", "says"), [
    ("redis+sentinel://sen-a:26379", "master's name"),
    ("redis+sentinel://sen-a/mymaster", "host:port"),
    ("redis+sentinel://sen-a:26379,/mymaster", "host:port"),
    ("redis+sentinel://sen-a:26379/mymaster/x", "database number"),
    ("redis+sentinel://sen-a:26379/mymaster?password=x", "unknown query parameter(s) password"),
    ("redis+cluster://node-a:7000/3", "only database 0"),
    ("redis+cluster://node-a:99999", "host:port"),
    ("redis+cluster://node-a:7000?sentinel_password=x", "unknown query"),
])
def test_a_malformed_ha_url_is_refused_with_what_to_fix(url, says):
    with pytest.raises(ValueError) as e:
        parse_redis_url(f"{url.replace('://', '://:hunter2@', 1)}")
    assert says in str(e.value)
    assert "hunter2" not in str(e.value)


def test_the_config_refuses_a_malformed_sentinel_url_at_start():
    base = {"upstream": {"base_url": "http://127.0.0.1:9/v1"}}
    with pytest.raises(ValueError, match="master's name"):
        GatewayConfig.model_validate({**base, "cache": {"redis_url": "redis+sentinel://:pw@h:26379"}})
    ok = GatewayConfig.model_validate({**base, "cache": {"redis_url": "redis+cluster://h:7000,h:7001"}})
    assert ok.cache.redis_url is not None


def test_ha_urls_are_redacted_for_logs():
    assert redact_url("redis+sentinel://:s3cret@a:26379,b:26379/mymaster/0?sentinel_password=x") == \
        "redis+sentinel://***@a:26379,b:26379/mymaster/0"
    assert redact_url("redis+cluster://u:s3cret@a:7000,b:7001") == "redis+cluster://***@a:7000,b:7001"


def test_a_config_error_on_a_redis_url_never_echoes_its_password(tmp_path):
    from gateway.config import load_config
    from gateway.yamlfile import ConfigError

    path = tmp_path / "gateway.yaml"
    path.write_text('upstream: {base_url: "http://127.0.0.1:9/v1"}\n'
                    'cache:\n  redis_url: "redis+sentinel://:hunter2@sen-a:26379"\n')
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "gateway.yaml:3: cache.redis_url" in str(e.value) and "master's name" in str(e.value)
    assert "hunter2" not in str(e.value) and "***@sen-a:26379" in str(e.value)
