"""GuardGate against LiteLLM proxy with an equivalent guardrail, in the same run, interleaved.

    python bench/vs_litellm.py [--rounds 5] [--seconds 5] [--litellm-version 1.109.1] [--cache-dir DIR]

Installs `litellm[proxy]` (the version given) into a venv of its own under --cache-dir (default
~/.cache/guardgate) on first use, and runs it with LITELLM_LOCAL_MODEL_COST_MAP=True (no download at
start). LiteLLM gets bench/litellm_guardrail.py: before the call it asks the stand-in guard about each
message, after the call about the answer, with the same request bodies GuardGate sends (three guard calls
per request, like GuardGate with its cache bypassed; LiteLLM has no verdict cache).

Targets, each its own process on loopback, measured as bench/overhead.py measures (bench/harness.py, wrk):
the upstream direct, GuardGate with cached verdicts, GuardGate asking the guard every time, LiteLLM proxy
with the guardrail. Ratios are taken within each round; min / median / max over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import orjson
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import REPO, free_port  # noqa: E402
from harness import Results, Target, machine, measure, ratios  # noqa: E402
from overhead import Stack, gateway_targets, table  # noqa: E402

from gateway.config import GuardConfig  # noqa: E402
from gateway.guard.base import GuardInput  # noqa: E402
from gateway.guard.flexguard import FlexGuard  # noqa: E402

DEFAULT_VERSION = "1.109.1"

# What pip prints when a pinned requirement has no release on the index this machine reaches.
_UNMET = re.compile(r"No matching distribution found for (\S+)")

_PROXY_REQUIREMENTS = """
import sys
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement
for line in requires("litellm") or []:
    req = Requirement(line)
    if req.marker is None or req.marker.evaluate({"extra": "proxy"}):
        req.marker = None
        print(req)
"""


def litellm_venv(cache: Path, version: str) -> Path:
    """A venv with litellm[proxy]==version; made once, then reused. Returns its bin/ folder."""
    venv = cache / f"litellm-{version}"
    done = venv / ".installed"
    if done.exists():
        return venv / "bin"
    print(f"installing litellm[proxy]=={version} into {venv} (once)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    if subprocess.run(pip + [f"litellm[proxy]=={version}"]).returncode != 0:
        # A package index that lags behind (a pin to a release it does not have yet): install litellm alone,
        # then its proxy requirements, relaxing only the pins the index cannot meet to their newest release.
        subprocess.run(pip + ["--no-deps", f"litellm=={version}"], check=True)
        reqs = subprocess.run([str(venv / "bin" / "python"), "-c", _PROXY_REQUIREMENTS], check=True,
                              capture_output=True, text=True).stdout.split()
        for _ in range(20):
            out = subprocess.run(pip + reqs, capture_output=True, text=True)
            if out.returncode == 0:
                break
            unmet = _UNMET.search(out.stderr)
            if not unmet:
                raise SystemExit(f"pip failed:\n{out.stderr[-3000:]}")
            name = re.split(r"[<>=!~;\[ ]", unmet.group(1))[0]
            print(f"  relaxing {unmet.group(1)} to {name}: not on this package index", file=sys.stderr)
            reqs = [name if r == unmet.group(1) else r for r in reqs]
        else:
            raise SystemExit("could not install litellm's proxy requirements")
    done.touch()
    return venv / "bin"


def guard_spec(guard: str, folder: Path) -> Path:
    """The stand-in guard's URL and GuardGate's own request bodies, with placeholders for the texts."""
    flex = FlexGuard(GuardConfig(base_url=f"{guard}/v1"))
    spec = {"url": f"{guard}/v1/chat/completions",
            "prompt_body": orjson.dumps(flex.request_body(GuardInput("prompt", "@@TEXT@@"))).decode(),
            "response_body": orjson.dumps(flex.request_body(GuardInput("response", "@@USER@@", "@@ANSWER@@"))).decode()}
    path = folder / "guard_spec.json"
    path.write_text(json.dumps(spec))
    return path


def start_litellm(stack: Stack, bin_dir: Path, upstream: str, guard: str, like: Target) -> Target:
    """LiteLLM proxy with the guardrail, as a target sending what `like` sends (with LiteLLM's master key:
    it refuses to start without one)."""
    master_key = "sk-" + secrets.token_hex(24)
    folder = stack.tmp / "litellm"
    folder.mkdir()
    (folder / "litellm_guardrail.py").write_text((REPO / "bench" / "litellm_guardrail.py").read_text())
    config = {
        "model_list": [{"model_name": "m", "litellm_params": {"model": "openai/m", "api_base": f"{upstream}/v1",
                                                              "api_key": "sk-bench"}}],
        "guardrails": [{"guardrail_name": "standin-guard", "litellm_params": {
            "guardrail": "litellm_guardrail.StandinGuard", "mode": ["pre_call", "post_call"], "default_on": True,
            "spec_path": str(guard_spec(guard, folder))}}],
        "general_settings": {"master_key": master_key},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = stack.start([str(bin_dir / "litellm"), "--config", str(folder / "config.yaml"), "--host", "127.0.0.1",
                        "--port", str(port), "--num_workers", "1"], f"{url}/health/liveliness",
                       env={"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}, cwd=folder,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return Target("litellm", url, proc.pid, like.body, like.stream_body,
                  {**like.headers, "authorization": f"Bearer {master_key}"})


def summary(res: Results) -> str:
    lines = ["| GuardGate vs LiteLLM (within each round) | min | median | max |", "|---|---|---|---|"]

    def row(label: str, values: list[float]) -> None:
        if values:
            values = sorted(values)
            lines.append(f"| {label} | {values[0]:.1f}× | {values[len(values) // 2]:.1f}× | {values[-1]:.1f}× |")

    for c in (16, 64):
        row(f"req/s, cached verdicts, {c} in flight", ratios(res, f"rps_c{c}", "guardgate-cached", "litellm"))
        row(f"req/s, guard asked every time, {c} in flight", ratios(res, f"rps_c{c}", "guardgate-guard", "litellm"))
        row(f"CPU per request: LiteLLM / GuardGate cached, {c} in flight",
            ratios(res, f"cpu_ms_c{c}", "litellm", "guardgate-cached"))
    added = {n: [a - d for a, d in zip(res.get("p50_c1", n), res.get("p50_c1", "direct"))]
             for n in ("guardgate-cached", "guardgate-guard", "litellm")}
    row("added p50 at 1 in flight: LiteLLM / GuardGate cached",
        [lit / gg for lit, gg in zip(added["litellm"], added["guardgate-cached"]) if gg > 0])
    row("added p50 at 1 in flight: LiteLLM / GuardGate guard every time",
        [lit / gg for lit, gg in zip(added["litellm"], added["guardgate-guard"]) if gg > 0])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--litellm-version", default=DEFAULT_VERSION)
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                        / "guardgate")
    parser.add_argument("--json", type=Path, help="write every round's figures here")
    args = parser.parse_args()
    bin_dir = litellm_venv(args.cache_dir, args.litellm_version)
    print(f"{machine()}; LiteLLM {args.litellm_version}")
    with Stack() as stack, gateway_targets(stack, workers=1) as targets:
        direct, _, cached, asked = targets
        upstream, guard = direct.base, stack.guard_url
        targets = [direct, cached, asked, start_litellm(stack, bin_dir, upstream, guard, direct)]
        res = measure(targets, args.rounds, args.seconds, progress=lambda s: print(s, file=sys.stderr))
    print(f"\nmedian [min–max] over {args.rounds} rounds; ratios and added latency taken within each round\n")
    print(table(res, [t.name for t in targets]))
    print()
    print(summary(res))
    print("\nLiteLLM's post-call hook does not run on streamed answers: its first streamed byte is unmoderated.")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "litellm": args.litellm_version,
                                         "values": res.values, "errors": res.errors}, indent=1))


if __name__ == "__main__":
    main()
