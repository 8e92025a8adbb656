"""The gateway config file (`guardgate serve --config gateway.yaml`), validated at start."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    HttpUrl,
    SecretStr,
    field_validator,
    model_validator,
)

from gateway.redis_client import parse_redis_url
from gateway.yamlfile import load_model, on_off


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_host(v: str) -> str:
    """An IP address or a host name (RFC 1123), as uvicorn binds it: no scheme, port or path."""
    try:
        ipaddress.ip_address(v)
        return v
    except ValueError:
        pass
    labels = v.rstrip(".").split(".")
    if len(v) > 253 or not all(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", p) for p in labels):
        raise ValueError("expected an IP address (127.0.0.1, 0.0.0.0, ::) or a host name, without scheme, port "
                         "or path")
    return v


class ServerConfig(_Strict):
    host: Annotated[str, AfterValidator(_check_host)] = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    # Gateway processes on the port (SO_REUSEPORT): one uses at most one core. Share verdicts with cache.redis_url.
    workers: int = Field(1, ge=1, le=256)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Larger request bodies get 413.")
    # With no api_keys in any policy file the gateway would serve everyone with the default policy: only
    # when this says so. A running gateway that has keys never turns open on a reload, whatever this says.
    allow_open: bool = False
    # Bearer key for GET /admin/readiness (tenants, policy errors, cache and guard stats); unset: no admin view.
    admin_key: SecretStr | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # json: one object per line (for collectors); text: one readable line per event (for a terminal).
    log_format: Literal["json", "text"] = "json"
    # What one client may hold before any of our code runs (see gateway/server.py).
    max_header_bytes: int = Field(32 * 1024, ge=1024, description="A larger request head gets 431.")
    max_headers: int = Field(100, ge=8, description="More header fields get 431.")
    header_timeout_s: float = Field(10.0, gt=0, description="A request head must arrive within this (408).")
    body_timeout_s: float = Field(30.0, gt=0, description="Longest silence while a body is uploaded (408).")
    # Longer than clients' own (httpx and the openai SDK drop idle connections after 5 s): a server that
    # closes first races the client's next request on that connection.
    keep_alive_timeout_s: float = Field(15.0, gt=0, description="An idle keep-alive connection is closed after this.")
    max_connections: int = Field(2048, ge=1, description="Open connections past this get 503 overloaded.")
    max_in_flight: int = Field(512, ge=1, description="Chat and moderation requests in flight past this get 503.")


def _empty_is_none(v: object) -> object:
    # `api_key: ${OPENAI_API_KEY:-}` with the variable unset means "no key", not "an empty key".
    return None if v == "" else v


# Client headers that may never be forwarded: the gateway's own credentials, the hop, the body's framing.
_NEVER_FORWARDED = frozenset({
    "authorization", "proxy-authorization", "cookie", "host", "content-length", "content-type", "content-encoding",
    "transfer-encoding", "connection", "keep-alive", "upgrade", "te", "trailer", "accept", "accept-encoding",
    "expect"})
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}")


class UpstreamConfig(_Strict):
    base_url: HttpUrl = Field(description="OpenAI-compatible API root, e.g. https://api.openai.com/v1")
    api_key: SecretStr | None = Field(None, description="Sent upstream as Bearer; clients never hold it.")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra headers sent upstream.")
    # Client request headers passed on upstream as they came (X-Request-ID: the request's id, see README).
    forward_headers: list[str] = Field(default_factory=lambda: ["OpenAI-Organization", "OpenAI-Project",
                                                                "X-Request-ID"])
    timeout_s: float = Field(600.0, gt=0)
    connect_timeout_s: float = Field(10.0, gt=0)
    max_connections: int = Field(256, ge=1)

    _no_empty_key = field_validator("api_key", mode="before")(_empty_is_none)

    @field_validator("forward_headers")
    @classmethod
    def _forwardable(cls, v: list[str]) -> list[str]:
        for name in v:
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a header name")
            if name.lower() in _NEVER_FORWARDED or name.lower().startswith("x-guard-"):
                raise ValueError(f"{name} is never forwarded (credentials, hop-by-hop or body framing)")
        return v


# litellm_params a deployment sets in its own keys, not in `params`.
_OWN_KEYS = ("model", "api_base", "api_key", "order")


def _secret_name(key: str) -> bool:
    return any(w in key.lower() for w in ("key", "secret", "token", "password", "credential"))


class ModelDeployment(_Strict):
    """One entry of `models:`: a public model name, served by a LiteLLM model string (see README, Providers)."""

    name: str = Field(min_length=1, description="What clients send as `model`; several entries may share it.")
    model: str = Field(min_length=1, description="LiteLLM's model string, e.g. anthropic/claude-sonnet-4-5")
    api_base: str | None = None
    api_key: SecretStr | None = None
    # Lower first; the next order is the fallback when every deployment of this order fails. Default: the
    # entry's place among those of its name (1, 2, …), so later entries are fallbacks. Equal orders share load.
    order: int | None = Field(None, ge=1)
    # Any other litellm_params (api_version, aws_region_name, drop_params, max_tokens, …). Values of keys that
    # name a secret (…key, …secret, …token, …password, …credential…) are kept as secrets.
    params: dict[str, Any] = Field(default_factory=dict)

    _no_empty = field_validator("api_key", "api_base", mode="before")(_empty_is_none)

    @field_validator("params")
    @classmethod
    def _params(cls, v: dict[str, Any]) -> dict[str, Any]:
        own = [k for k in v if k in _OWN_KEYS]
        if own:
            raise ValueError(f"set {', '.join(own)} as the entry's own key, not in params")
        return {k: SecretStr(x) if isinstance(x, str) and _secret_name(k) else x for k, x in v.items()}

    def secrets(self) -> list[str]:
        """Every secret this deployment holds, to be kept out of errors and logs."""
        values = [self.api_key, *self.params.values()]
        return [s.get_secret_value() for s in values if isinstance(s, SecretStr) and s.get_secret_value()]


class RouterConfig(_Strict):
    """LiteLLM's Router, behind `models:`."""

    num_retries: int = Field(0, ge=0, le=10, description="Retries within a deployment order before falling back.")
    timeout_s: float = Field(600.0, gt=0, description="One provider call, streamed or not.")
    allowed_fails: int | None = Field(None, ge=0, description="Failures a minute before a deployment cools down.")
    cooldown_s: float | None = Field(None, ge=0, description="How long a failing deployment is left out; 0: never.")


DEFAULT_MODELS = {
    "flexguard": "Tommy-DING/FlexGuard-Qwen3-8B",
    "bingoguard": "fanyin3639/bingoguard-llama-8b",
    "duoguard": "DuoGuard/DuoGuard-0.5B",
}
RemoteBackend = Literal["flexguard", "bingoguard", "duoguard"]


class CascadeConfig(_Strict):
    """`backend: cascade`: the embedded guard first, the remote guard only for uncertain texts."""

    second: RemoteBackend = "flexguard"
    # Embedded risks in [low, high] go to the remote guard; outside, the embedded verdict stands (and a text
    # the embedded guard read only in part always goes on). Derived from the training script's validation
    # split (bench/cascade.py --validation): at most 1% of its harmful texts below the floor and 1% of its
    # benign ones above the ceiling; docs/embedded_guard.md shows what it does on the held-out sets.
    uncertain: tuple[int, int] = (5, 99)

    @field_validator("uncertain")
    @classmethod
    def _band(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= v[0] <= v[1] <= 100:
            raise ValueError("expected [low, high] with 0 <= low <= high <= 100")
        return v


class GuardConfig(_Strict):
    # Default: flexguard when a base_url is set, else the embedded CPU guard (no server needed).
    backend: Literal["flexguard", "bingoguard", "duoguard", "embedded", "cascade"] | None = None
    # One vLLM server root (…/v1), or several: requests are spread over the healthy ones.
    base_url: list[HttpUrl] | None = Field(None, description="e.g. http://127.0.0.1:8000/v1, or a list")
    model: str | None = Field(None, description="Default: the backend's model (see README).")
    api_key: SecretStr | None = None
    timeout_s: float = Field(30.0, gt=0)
    max_concurrency: int = Field(64, ge=1, description="Guard calls in flight at once, per gateway process.")
    cooldown_s: float = Field(10.0, ge=0, description="How long a failed guard server is left out.")
    # FlexGuard.
    max_tokens: int = Field(2048, ge=16)
    # Qwen3's template takes enable_thinking; the card validates the model with thinking on.
    chat_template_kwargs: dict[str, object] = Field(default_factory=lambda: dict[str, object](enable_thinking=True))
    reasoning: Annotated[Literal["on", "off"], BeforeValidator(on_off)] = Field(
        "on", description="off: no <think> block (faster; not validated by the card)")
    # BingoGuard.
    severity_rubrics: Path | None = None
    chat_template: Path | None = None
    # DuoGuard.
    raw_logits_param: Literal["use_activation", "activation"] = "use_activation"
    category_threshold: float = Field(0.5, gt=0, lt=1)
    cascade: CascadeConfig = Field(default_factory=CascadeConfig)

    _no_empty_key = field_validator("api_key", mode="before")(_empty_is_none)

    @field_validator("base_url", mode="before")
    @classmethod
    def _url_list(cls, v: object) -> object:
        # A single URL, a YAML list, or a comma-separated string (so one ${ENV} can hold several).
        if v == "" or v is None:
            return None
        if isinstance(v, str):
            return [u.strip() for u in v.split(",") if u.strip()]
        return v

    @model_validator(mode="after")
    def _resolve_backend(self) -> GuardConfig:
        if self.backend is None:
            self.backend = "flexguard" if self.base_url else "embedded"
        if self.backend != "embedded" and not self.base_url:
            raise ValueError(f"backend {self.backend} needs base_url (the vLLM server's …/v1)")
        remote = self.cascade.second if self.backend == "cascade" else self.backend
        if self.model is None and remote in DEFAULT_MODELS:
            self.model = DEFAULT_MODELS[remote]
        return self

    @property
    def base_urls(self) -> list[str]:
        return [str(u).rstrip("/") for u in self.base_url or []]


class CacheConfig(_Strict):
    """Verdict cache: an in-process LRU, in front of Redis when `redis_url` is set."""

    redis_url: SecretStr | None = Field(None, description="e.g. redis://:password@127.0.0.1:6379/0, "
                                        "redis+sentinel://h1:26379,h2:26379/mymaster/0, redis+cluster://h1:7000,h2:7001")
    ttl_s: int = Field(86400, ge=1, description="How long Redis keeps a verdict.")
    local_size: int = Field(10000, ge=0, description="Verdicts kept in process; 0 turns the local cache off.")
    local_ttl_s: float = Field(60.0, gt=0)
    redis_timeout_s: float = Field(0.1, gt=0, description="A slower Redis is skipped for that request.")
    retry_after_s: float = Field(2.0, ge=0, description="After a Redis failure, how long before trying again.")

    _no_empty_url = field_validator("redis_url", mode="before")(_empty_is_none)

    @field_validator("redis_url")
    @classmethod
    def _known_topology(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            parse_redis_url(v.get_secret_value())  # a malformed Sentinel or Cluster URL stops the start
        return v


class GatewayConfig(_Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    # One of the two: an OpenAI-compatible API (byte-faithful passthrough), or `models:` through LiteLLM.
    upstream: UpstreamConfig | None = None
    models: list[ModelDeployment] | None = Field(None, min_length=1)
    router: RouterConfig = Field(default_factory=RouterConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    policies_dir: Path = Path("policies")
    policies_reload_s: float = Field(1.0, ge=0, description="How often to look for policy changes; 0 turns it off.")

    @field_validator("policies_dir")
    @classmethod
    def _not_empty(cls, v: Path) -> Path:
        if not str(v):
            raise ValueError("must name a folder")
        return v

    @model_validator(mode="before")
    @classmethod
    def _one_upstream(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("models") is None:
            # Without models, upstream is required: validated as such, so a missing key is named.
            return {**data, "upstream": data.get("upstream") or {}}
        if isinstance(data, dict) and data.get("upstream") is not None:
            raise ValueError("set either upstream (one OpenAI-compatible API) or models (providers through "
                             "LiteLLM), not both")
        return data


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate the config; relative paths resolve against the config file's folder."""
    path = Path(path)
    config = load_model(GatewayConfig, path)
    if not config.policies_dir.is_absolute():
        config.policies_dir = (path.parent / config.policies_dir).resolve()
    return config
