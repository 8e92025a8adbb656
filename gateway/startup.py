"""What `guardgate serve` says when it starts: one summary of what it runs, and the warnings a newcomer
needs. Pure: built from the config and the policies read at start; the CLI logs them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from gateway.config import GatewayConfig
from gateway.logs import redact_url
from gateway.policy.store import PolicySet


@dataclass(frozen=True)
class StartupWarning:
    event: str
    message: str


def summary(config: GatewayConfig, policies: PolicySet, *, host: str, port: int, workers: int) -> dict[str, Any]:
    """The fields of the start-up line (never a key: only whether one is set)."""
    g = config.guard
    guard: dict[str, Any] = {"guard_backend": g.backend}
    if g.backend == "embedded":
        guard["guard_model"] = "embedded multilingual-e5-small classifier (in process, CPU)"
    else:
        guard["guard_model"] = g.model
        guard["guard_endpoints"] = [redact_url(u) for u in g.base_urls]
        if g.backend == "cascade":
            guard["guard_cascade"] = f"embedded first, then {g.cascade.second} for risk in " \
                                     f"[{g.cascade.uncertain[0]}, {g.cascade.uncertain[1]}]"
    redis = config.cache.redis_url
    return {
        "event": "startup", "listen": f"http://{f'[{host}]' if ':' in host else host}:{port}", "workers": workers,
        **guard,
        **upstream_summary(config),
        "policies_dir": str(config.policies_dir),
        "tenants": {name: len(p.api_keys) for name, p in sorted(policies.tenants.items())},  # name → key count
        "cache": f"redis {redact_url(redis.get_secret_value())}" if redis else "in-process only",
        "admin": "GET /metrics and /admin/readiness with server.admin_key" if config.server.admin_key
                 else "off (no server.admin_key: GET /metrics and /admin/readiness answer 404)",
        "log_format": config.server.log_format,
    }


def upstream_summary(config: GatewayConfig) -> dict[str, object]:
    if config.upstream is None:  # `models:` through LiteLLM
        names = sorted({m.name for m in config.models or []})
        return {"upstream": f"litellm ({len(config.models or [])} deployments)", "models": names}
    return {"upstream": redact_url(str(config.upstream.base_url)),
            "upstream_key": "set" if config.upstream.api_key is not None else "none",
            "forward_headers": config.upstream.forward_headers}


def warnings(config: GatewayConfig, policies: PolicySet, *, workers: int) -> list[StartupWarning]:
    out = []
    upstream_host = (urlsplit(str(config.upstream.base_url)).hostname or "") if config.upstream else ""
    if config.upstream and config.upstream.api_key is None and upstream_host.endswith("api.openai.com"):
        out.append(StartupWarning("upstream_without_key", "upstream.api_key is not set and the upstream is "
                            f"{upstream_host}: every chat request will get 401 from OpenAI. Set UPSTREAM_API_KEY "
                            "(or upstream.api_key), or point UPSTREAM_BASE_URL at your own model server"))
    if policies.open:
        out.append(StartupWarning("auth_open", f"no api_keys in any policy file of {config.policies_dir}: the gateway "
                            "is open, every client is served with the default policy. Give tenants keys (guardgate "
                            "policy hash-key) and set server.allow_open: false for production"))
    if config.guard.backend == "embedded":
        out.append(StartupWarning("embedded_guard", "no guard.base_url: scoring with the embedded CPU guard, a small "
                            "classifier that needs no server but is much weaker than FlexGuard (it misses more "
                            "harm and blocks more ordinary text). For real traffic set GUARD_BASE_URL (or "
                            "guard.base_url) to a vLLM server running FlexGuard, or use guard.backend: cascade"))
    if workers > 1 and not config.cache.redis_url:
        out.append(StartupWarning("workers_without_redis", f"{workers} workers without cache.redis_url: each caches "
                            "verdicts alone, so the same text may be scored once per worker"))
    return out
