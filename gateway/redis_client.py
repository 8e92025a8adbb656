"""Redis clients from `cache.redis_url`: one server, a Sentinel-watched master, or a Cluster.

    redis://[[user]:password@]host[:port][/db]          one server (redis-py's own URL rules; rediss://, unix://)
    redis+sentinel://[[user]:password@]host:port[,host:port…]/service[/db][?sentinel_password=…]
    redis+cluster://[[user]:password@]host:port[,host:port…]

`rediss+sentinel://` and `rediss+cluster://` speak TLS to the data nodes. The credentials in the URL are
those of the data nodes; Sentinels that want their own take `sentinel_username` / `sentinel_password` in
the query. A Cluster has no databases: a `/db` other than 0 is refused.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:  # redis is imported by `connect` only: the config (and the supervisor) parse URLs without it
    import redis.asyncio as aioredis
    from redis.asyncio.cluster import RedisCluster

Kind = Literal["single", "sentinel", "cluster"]
_HA_SCHEMES: dict[str, tuple[Kind, bool]] = {
    "redis+sentinel": ("sentinel", False), "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False), "rediss+cluster": ("cluster", True),
}
_SENTINEL_QUERY = {"sentinel_username", "sentinel_password"}


@dataclass(frozen=True)
class RedisTarget:
    """What a `redis+sentinel://` or `redis+cluster://` URL names (a plain URL is left to redis-py)."""

    kind: Kind
    nodes: tuple[tuple[str, int], ...]  # Sentinels, or Cluster seed nodes
    service: str | None = None  # the Sentinel master's name
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    ssl: bool = False


def parse_redis_url(url: str) -> RedisTarget | None:
    """The HA target a URL names; None for a plain redis-py URL. ValueError says what is wrong (never echoing
    the password)."""
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() not in _HA_SCHEMES:
        return None
    kind, ssl = _HA_SCHEMES[scheme.lower()]
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    nodes = tuple(_host_port(h, scheme) for h in hosts.split(","))
    path = [p for p in parts.path.split("/") if p]
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    unknown = set(query) - (_SENTINEL_QUERY if kind == "sentinel" else set())
    if unknown:
        raise ValueError(f"{scheme}:// URL: unknown query parameter(s) {', '.join(sorted(unknown))}"
                         + (f" (allowed: {', '.join(sorted(_SENTINEL_QUERY))})" if kind == "sentinel" else ""))
    service = None
    if kind == "sentinel":
        if not path:
            raise ValueError(f"{scheme}:// URL needs the master's name as its path: "
                             f"{scheme}://host:26379,host2:26379/mymaster/0")
        service, path = unquote(path[0]), path[1:]
    if len(path) > 1 or (path and not path[0].isdigit()):
        raise ValueError(f"{scheme}:// URL: the path after the host list must be "
                         f"{'/service[/db]' if kind == 'sentinel' else 'empty'}, a database number at most")
    db = int(path[0]) if path else 0
    if kind == "cluster" and db != 0:
        raise ValueError(f"{scheme}:// URL: a Redis Cluster has only database 0")
    return RedisTarget(kind, nodes, service, db, unquote(username) or None, unquote(password) or None,
                       query.get("sentinel_username") or None, query.get("sentinel_password") or None, ssl)


def _host_port(hostport: str, scheme: str) -> tuple[str, int]:
    host, colon, port = hostport.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]  # [::1]:26379
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{scheme}:// URL: each node must be host:port, comma-separated (got {hostport!r})")
    return host, int(port)


def _ready() -> bool:
    return False


@dataclass(frozen=True)
class RedisConnection:
    """A client for the verdict cache, whatever the topology: `mget` reads keys of any slot (a Cluster
    splits them by slot), `aclose` closes everything the URL opened (Sentinel clients included).

    `needs_setup()` is true while a Cluster client has no map of the cluster (at first, and again after a
    node failed); `setup()` makes it (CLUSTER SLOTS and COMMAND: slower than one cache call may take)."""

    client: aioredis.Redis | RedisCluster
    kind: Kind
    mget: Callable[[Sequence[bytes]], Awaitable[list[Any]]]
    aclose: Callable[[], Awaitable[None]]
    needs_setup: Callable[[], bool] = _ready
    setup: Callable[[], Awaitable[Any]] | None = None


def connect(url: str, **options: Any) -> RedisConnection:
    """A client for `url` (nothing is contacted yet). `options`: socket_timeout, socket_connect_timeout,
    retry, max_connections (per node for a Cluster), as redis-py takes them."""
    import redis.asyncio as aioredis
    from redis.asyncio.cluster import ClusterNode, RedisCluster
    from redis.asyncio.sentinel import Sentinel

    target = parse_redis_url(url)
    if target is None:
        client = aioredis.Redis.from_url(url, **options)
        return RedisConnection(client, "single", client.mget, client.aclose)
    auth: dict[str, Any] = {"username": target.username, "password": target.password}
    if target.kind == "cluster":
        cluster = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in target.nodes], ssl=target.ssl,
                               **auth, **options)
        # redis-py keeps "not mapped yet" in `_initialize` (its initialize() is a no-op once mapped). Without
        # that attribute the map is made inside the first calls, as redis-py does by default.
        return RedisConnection(cluster, "cluster", cluster.mget_nonatomic, cluster.aclose,
                               lambda: getattr(cluster, "_initialize", False) is True, cluster.initialize)
    sentinel_kwargs = {k: v for k, v in options.items() if k.startswith("socket_")}
    sentinel_kwargs.update(username=target.sentinel_username, password=target.sentinel_password)
    sentinel = Sentinel(list(target.nodes), sentinel_kwargs=sentinel_kwargs)
    master = sentinel.master_for(target.service or "", db=target.db, ssl=target.ssl, **auth, **options)

    async def aclose() -> None:
        try:
            await master.aclose()
        finally:
            await sentinel.aclose()

    return RedisConnection(master, "sentinel", master.mget, aclose)
