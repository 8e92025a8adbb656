"""`guardgate serve --config gateway.yaml [--host H] [--port P] [--workers N]`, and the other commands."""

from __future__ import annotations

import argparse
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


def _serve(args: argparse.Namespace) -> int:
    import logging

    from gateway.config import load_config
    from gateway.logs import configure_logging

    config = load_config(args.config)
    configure_logging(config.server.log_level)
    workers = args.workers or config.server.workers
    if workers == 1:
        import uvicorn

        from gateway.app import create_app
        from gateway.server import uvicorn_config

        uvicorn.Server(uvicorn_config(create_app(config), config, host=args.host, port=args.port)).run()
        return 0
    # The supervisor serves nothing: it imports neither the app nor the guards.
    from gateway.policy.store import PolicyStore
    from gateway.workers import Supervisor

    port = args.port or config.server.port
    # Refused here, once, rather than by every worker: a bad policy file or a port that cannot be shared.
    PolicyStore(config.policies_dir, 0, allow_open=config.server.allow_open)
    if not config.cache.redis_url:
        logging.getLogger("guardgate").warning("several workers without cache.redis_url: each caches verdicts "
                                               "alone", extra={"fields": {"event": "workers_without_redis"}})
    return Supervisor(Path(args.config), args.host or config.server.host, port, workers).run()


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


def _check(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from gateway.config import GuardConfig, load_config
    from gateway.guard import build_guard
    from gateway.guard.base import GuardError, GuardInput

    guard_config = load_config(args.config).guard if args.config else GuardConfig()
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
        print(f"guardgate: the guard could not score this ({e.kind}): {e.detail}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"guard": identity, "stage": stage, "risk": verdict.risk,
                          "categories": list(verdict.categories)}))
    else:
        print(f"guard       {identity}\nstage       {stage}\nrisk        {verdict.risk}\n"
              f"categories  {','.join(verdict.categories)}")
    return 0


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
    serve.add_argument("--port", type=int, help="override server.port")
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

    check = sub.add_parser("check", help="score a text with the configured guard and print the verdict")
    check.add_argument("text", help="the user's text")
    check.add_argument("--response", help="an answer to score with the text (response mode)")
    check.add_argument("--config", help="gateway config whose guard to use (default: the embedded guard)")
    check.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    check.set_defaults(func=_check)

    from gateway.calibrate import add_calibrate_parser

    add_calibrate_parser(sub)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"guardgate: configuration error:\n{e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
