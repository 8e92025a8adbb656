"""Guard backends. `build_guard` is the one place that turns the config into a guard."""

from __future__ import annotations

from typing import Any

from gateway.config import GuardConfig
from gateway.guard.base import Guard


def _remote(backend: str, config: GuardConfig) -> Guard:
    if config.model is None:  # GuardConfig gives every remote backend its default model
        raise ValueError(f"guard.model is required for backend {backend}")
    common: dict[str, Any] = {
        "base_urls": config.base_urls, "timeout_s": config.timeout_s, "max_concurrency": config.max_concurrency,
        "cooldown_s": config.cooldown_s,
        "api_key": config.api_key.get_secret_value() if config.api_key is not None else None,
    }
    if backend == "flexguard":
        from gateway.guard.flexguard import FlexGuard

        return FlexGuard(config, base_urls=config.base_urls, cooldown_s=config.cooldown_s)
    if backend == "bingoguard":
        import json

        from gateway.guard.bingoguard import BingoGuard

        rubrics = json.loads(config.severity_rubrics.read_text()) if config.severity_rubrics else None
        template = config.chat_template.read_text() if config.chat_template else None
        return BingoGuard(model=config.model, severity_rubrics=rubrics, chat_template=template, **common)
    from gateway.guard.duoguard import DuoGuard

    return DuoGuard(model=config.model, raw_logits_param=config.raw_logits_param,
                    threshold=config.category_threshold, **common)


def build_guard(config: GuardConfig) -> Guard:
    if config.backend == "embedded":
        from gateway.guard.embedded import EmbeddedGuard

        return EmbeddedGuard(timeout_s=config.timeout_s)
    if config.backend == "cascade":
        from gateway.guard.cascade import CascadeGuard
        from gateway.guard.embedded import EmbeddedGuard

        return CascadeGuard(EmbeddedGuard(timeout_s=config.timeout_s), _remote(config.cascade.second, config),
                            config.cascade.uncertain)
    return _remote(config.backend or "flexguard", config)
