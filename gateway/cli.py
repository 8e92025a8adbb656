"""`guardgate serve --config gateway.yaml [--host H] [--port P] [--workers N]`, and the other commands."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gateway import __version__
from gateway.yamlfile import ConfigError

_CATEGORY_CHOICES = ["VIO", "ILG", "SEX", "INF", "DIS", "MIS", "JAIL"]


def _risk(value: str) -> int:
    risk = int(value) if value.isdigit() else -1
    if not 0 <= risk <= 100:
        raise argparse.ArgumentTypeError("risk is an integer from 0 to 100")
    return risk


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError("expected an integer of 1 or more")
    return int(value)


def _server_overrides(config, args: argparse.Namespace) -> None:
    """--host / --port, validated as server.host / server.port are in the file."""
    from pydantic import ValidationError

    from gateway.config import ServerConfig

    given = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if not given:
        return
    try:
        config.server = ServerConfig.model_validate({**config.server.model_dump(), **given})
    except ValidationError as e:
        raise ConfigError("\n".join(
            f"--{err['loc'][0]}: {err['msg'].removeprefix('Value error, ')} (got {given[err['loc'][0]]!r})"
            for err in e.errors(include_url=False) if err["loc"] and err["loc"][0] in given)) from None


def _serve(args: argparse.Namespace) -> int:
    import logging

    from gateway import startup
    from gateway.config import load_config
    from gateway.logs import configure_logging

    config = load_config(args.config)
    _server_overrides(config, args)
    configure_logging(config.server.log_level, config.server.log_format)
    log = logging.getLogger("guardgate")
    workers = args.workers or config.server.workers
    host, port = config.server.host, config.server.port

    def announce(policies) -> None:
        log.info("guardgate starting", extra={"fields": startup.summary(config, policies, host=host, port=port,
                                                                       workers=workers)})
        for w in startup.warnings(config, policies, workers=workers):
            log.warning(w.message, extra={"fields": {"event": w.event}})

    if workers == 1:
        import os

        import uvicorn

        from gateway.app import create_app
        from gateway.server import uvicorn_config
        from gateway.workers import MULTIPROC_ENV, MetricsDir

        if os.environ.get(MULTIPROC_ENV):  # not needed with one process; if set, an earlier run's values go
            MetricsDir()

        app = create_app(config)
        announce(app.state.gateway.policies.current)
        uvicorn.Server(uvicorn_config(app, config, host=host, port=port)).run()
        return 0
    # The supervisor serves nothing: it imports neither the app nor the guards.
    from gateway.policy.store import PolicyStore
    from gateway.workers import Supervisor

    # Refused here, once, rather than by every worker: a bad policy file or a port that cannot be shared.
    announce(PolicyStore(config.policies_dir, 0, allow_open=config.server.allow_open).current)
    return Supervisor(Path(args.config), host, port, workers).run()


def _policies_dir(args: argparse.Namespace) -> Path:
    if args.dir:
        return Path(args.dir)
    if args.config:
        from gateway.config import load_config
        return load_config(args.config).policies_dir
    return Path("policies")


def _policy_validate(args: argparse.Namespace) -> int:
    from gateway.policy.store import PolicyStore

    store = PolicyStore(_policies_dir(args), strict=False)
    policies = store.current
    for name in sorted(set(policies.files) | set(policies.errors)):
        if name in policies.errors:
            print(f"FAIL {policies.errors[name]}")
        else:
            policy = policies.tenants[policies.files[name]]
            print(f"ok   {store.dir / name} (tenant {policy.tenant}, {len(policy.api_keys)} key(s))")
    if policies.errors:
        print(f"{len(policies.errors)} file(s) invalid", file=sys.stderr)
        return 1
    print("all policies valid" + ("; no API keys: the gateway is open (default policy for everyone)"
                                  if policies.open else ""))
    return 0


def _policy_explain(args: argparse.Namespace) -> int:
    from gateway.guard.base import HARM_CATEGORIES, SAFE, Verdict
    from gateway.policy.decide import decide
    from gateway.policy.schema import threshold_value
    from gateway.policy.store import PolicyStore

    policies = PolicyStore(_policies_dir(args)).current
    policy = policies.tenants.get(args.tenant)
    if policy is None:
        print(f"guardgate: no tenant '{args.tenant}' (known: {', '.join(sorted(policies.tenants))})", file=sys.stderr)
        return 2
    categories = tuple(sorted({c.upper() for c in args.category}, key=HARM_CATEGORIES.index)) if args.category else (SAFE,)
    verdict = Verdict(args.risk, categories)
    print(f"tenant {policy.tenant}: strictness {policy.strictness} (threshold {threshold_value(policy.strictness)})"
          + "".join(f", {c} {threshold_value(t)}" for c, t in sorted(policy.categories.items())))
    print(f"verdict: risk {verdict.risk}, categories {','.join(verdict.categories)}")
    for stage in ("prompt", "response"):
        settings = policy.stage(stage)
        if not settings.check:
            print(f"  {stage:8} not checked (check: false)")
            continue
        d = decide(verdict, policy, stage)
        effect = {"allow": "passes", "block": "BLOCKED", "flag": "passes, flagged in headers and logs",
                  "shadow": "passes; the flag is only logged (shadow)"}[d.outcome]
        print(f"  {stage:8} {d.outcome.upper():6} {d.reason}: {effect}")
    return 0


# `guardgate check` exit codes, for scripts.
CHECK_PASSES, CHECK_BLOCKED, CHECK_USAGE, CHECK_GUARD_ERROR = 0, 1, 2, 3


def _check_policy(args: argparse.Namespace, config_policies: Path | None):
    """The policy `check` decides with, and where it came from: --policies, else the config's policies_dir,
    else ./policies when it is a folder, else the built-in default policy."""
    from gateway.policy.schema import Policy
    from gateway.policy.store import PolicyStore

    folder = Path(args.policies) if args.policies else config_policies
    if folder is None and Path("policies").is_dir():
        folder = Path("policies")
    if folder is None:
        if args.tenant != "default":
            raise ConfigError(f"--tenant {args.tenant}: no policies folder (give --policies DIR or --config)")
        return Policy(), "built-in default policy"
    policies = PolicyStore(folder, 0).current  # a broken file: ConfigError, every one listed
    policy = policies.tenants.get(args.tenant)
    if policy is None:
        raise ConfigError(f"--tenant {args.tenant}: no such tenant in {folder} (known: "
                          f"{', '.join(sorted(policies.tenants))})")
    return policy, f"{folder}"


def _check(args: argparse.Namespace) -> int:
    """Score a text with the configured guard and decide it with a tenant's policy. Exit 0 when it passes
    (allowed, flagged, shadowed or not checked), 1 when it would be blocked, 2 on a usage or config error,
    3 when the guard could not score it."""
    import asyncio
    import json

    from gateway.config import GuardConfig, load_config
    from gateway.guard import build_guard
    from gateway.guard.base import GuardError, GuardInput
    from gateway.moderation import text_hash
    from gateway.policy.decide import decide
    from gateway.policy.schema import threshold_value

    config = load_config(args.config) if args.config else None
    guard_config = config.guard if config else GuardConfig()
    policy, policy_source = _check_policy(args, config.policies_dir if config else None)
    item = GuardInput("response" if args.response is not None else "prompt", args.text, args.response)
    stage = item.stage

    async def run():
        guard = build_guard(guard_config)
        try:
            return guard.identity, (await guard.score([item]))[0]
        finally:
            await guard.aclose()

    try:
        identity, verdict = asyncio.run(run())
    except GuardError as e:
        print(f"guardgate: the guard could not score this ({e.kind}): {e.detail}; under tenant {policy.tenant} "
              f"(on_guard_error: {policy.on_guard_error}) the request would be "
              + ("answered 503" if policy.on_guard_error == "closed" else "forwarded unscored"), file=sys.stderr)
        return CHECK_GUARD_ERROR
    scored_hash = text_hash(args.response if args.response is not None else args.text)
    checked = policy.stage(stage).check
    decision = decide(verdict, policy, stage) if checked else None
    outcome = decision.outcome if decision else "skipped"
    if args.json:
        print(json.dumps({"guard": identity, "stage": stage, "risk": verdict.risk,
                          "categories": list(verdict.categories), "text_sha256": scored_hash,
                          "tenant": policy.tenant, "policy": policy_source, "decision": outcome,
                          "threshold": decision.threshold if decision else None,
                          "reason": decision.reason if decision else f"{stage}.check is false"}))
    else:
        print(f"guard       {identity}\nstage       {stage}\nrisk        {verdict.risk}\n"
              f"categories  {','.join(verdict.categories)}\ntext_sha256 {scored_hash}\n"
              f"tenant      {policy.tenant} ({policy_source}; strictness {policy.strictness}, "
              f"threshold {threshold_value(policy.strictness)})\n"
              f"decision    {outcome.upper()}: {decision.reason if decision else f'{stage}.check is false'}")
    return CHECK_BLOCKED if outcome == "block" else CHECK_PASSES


def _policy_hash_key(args: argparse.Namespace) -> int:
    import getpass
    import hashlib

    # Read from the terminal (or stdin) rather than argv, so the key stays out of shell history.
    key = getpass.getpass("key: ") if sys.stdin.isatty() else sys.stdin.readline().strip()
    if not key:
        print("guardgate: no key given", file=sys.stderr)
        return 2
    print("sha256:" + hashlib.sha256(key.encode()).hexdigest())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="guardgate", description="OpenAI-compatible guardrail gateway.")
    parser.add_argument("--version", action="version", version=f"guardgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", required=True, help="gateway config file (YAML)")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", help="override server.port")
    serve.add_argument("--workers", type=_positive, help="override server.workers: gateway processes on the port")
    serve.set_defaults(func=_serve)

    policy = sub.add_parser("policy", help="check and explain policies").add_subparsers(dest="policy_command",
                                                                                         required=True)
    validate = policy.add_parser("validate", help="validate a policies folder; non-zero exit on any error")
    validate.add_argument("dir", nargs="?", help="policies folder (default: from --config, else ./policies)")
    validate.add_argument("--config", help="take policies_dir from this gateway config")
    validate.set_defaults(func=_policy_validate)
    explain = policy.add_parser("explain", help="what a tenant's policy decides for a given risk")
    explain.add_argument("--tenant", default="default")
    explain.add_argument("--risk", type=_risk, required=True)
    explain.add_argument("--category", action="append", choices=_CATEGORY_CHOICES, type=str.upper, default=[],
                         help="a category the verdict names (repeatable)")
    explain.add_argument("--dir", help="policies folder (default: from --config, else ./policies)")
    explain.add_argument("--config", help="take policies_dir from this gateway config")
    explain.set_defaults(func=_policy_explain)
    hash_key = policy.add_parser("hash-key", help="print sha256:<hex> of a key read from stdin, for api_keys")
    hash_key.set_defaults(func=_policy_hash_key)

    check = sub.add_parser("check", help="score a text and print the verdict and the policy's decision; exit 0 "
                                         "if it passes, 1 if it would be blocked, 2 on a usage or config "
                                         "error, 3 if the guard could not score it, 141 if the reader of its "
                                         "output left first")
    check.add_argument("text", help="the user's text")
    check.add_argument("--response", help="an answer to score with the text (response mode)")
    check.add_argument("--config", help="gateway config whose guard and policies_dir to use (default: the "
                                        "embedded guard)")
    check.add_argument("--policies", help="policies folder (default: from --config, else ./policies, else the "
                                          "built-in default policy)")
    check.add_argument("--tenant", default="default", help="whose policy decides (default: default)")
    check.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    check.set_defaults(func=_check)

    from gateway.calibrate import add_calibrate_parser

    add_calibrate_parser(sub)

    args = parser.parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, not at exit: a reader that left (`| head`) is caught below
        return code
    except ConfigError as e:
        print(f"guardgate: configuration error:\n{e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # no traceback; 141 is what a shell reports for a process SIGPIPE ended
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the flush at exit cannot fail again
        os.close(devnull)
        return 141


if __name__ == "__main__":
    raise SystemExit(main())
