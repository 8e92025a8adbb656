"""The cascade's routing on a mixed labelled set: how much goes to the GPU guard, and what the rest costs.

    python bench/cascade.py --data tests/embedded_everyday_prompts.json [--threshold 40]
    python bench/cascade.py --heldout new.json     # scores written by scripts/eval_embedded.py --out
    python bench/cascade.py --validation ~/.cache/guardgate-embedded-train/validation.json

--validation: derives the default band from the training script's own validation split (never from the
held-out sets): the widest-reaching floor that leaves at most 1% of harmful validation texts below it, and
the lowest ceiling that leaves at most 1% of benign ones above it. --heldout then shows what that band
does on the hand-written held-out sets.

--heldout: the embedded guard's held-out scores per slice (harmful slices are label 1); prints, per band,
the share sent to the GPU guard, and per slice how many texts the CPU decides wrongly (for the padded
harmful slice: how many score below the band, i.e. are neither blocked by the embedded stage nor seen by
the GPU guard).

--data: JSON lines {"text": ..., "label": 0|1} (1 = should be flagged), or a JSON object with "benign"
and "harmful" lists of texts (like the hand-written everyday set the embedded guard is evaluated on). The cascade sends a text to the GPU guard
when the embedded guard's risk lies in the uncertain band; otherwise the embedded verdict stands. For
several bands this prints the share of texts sent to the GPU guard, and among the texts kept on the CPU
how many the embedded verdict gets wrong at --threshold (the errors the cascade cannot fix, since the
GPU guard never sees them). Also the embedded guard's speed on the same texts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gateway.config import CascadeConfig  # noqa: E402
from gateway.guard.base import GuardInput  # noqa: E402
from gateway.guard.embedded import EmbeddedGuard  # noqa: E402

BANDS = [(20, 60), (15, 70), (10, 80), (5, 90)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--heldout", type=Path)
    parser.add_argument("--validation", type=Path)
    parser.add_argument("--threshold", type=int, default=40)
    args = parser.parse_args()
    if args.validation:
        doc = json.loads(args.validation.read_text())
        lo, hi = derive_band(doc["risks"], doc["labels"])
        sent = sum(lo <= r <= hi for r in doc["risks"]) / len(doc["risks"])
        print(f"band [{lo}, {hi}] from {len(doc['risks'])} validation texts: {sent:.0%} of them sent to the GPU guard")
        return None
    if args.heldout:
        return heldout(args.heldout, args.threshold)
    if not args.data:
        parser.error("--data or --heldout is required")
    raw = args.data.read_text()
    if raw.lstrip().startswith("{") and '"benign"' in raw[:2000] and not raw.lstrip().startswith('{"text"'):
        doc = json.loads(raw)
        rows = [{"text": t, "label": 0} for t in doc["benign"]] + [{"text": t, "label": 1} for t in doc["harmful"]]
    else:
        rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
    texts, labels = [r["text"] for r in rows], [int(r["label"]) for r in rows]
    guard = EmbeddedGuard()
    t0 = time.perf_counter()
    verdicts = asyncio.run(guard.score([GuardInput("prompt", t) for t in texts]))
    batch_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for t in texts[:50]:
        asyncio.run(guard.score([GuardInput("prompt", t)]))
    single_ms = (time.perf_counter() - t0) / min(50, len(texts)) * 1000
    risks = [v.risk for v in verdicts]
    n, harmful = len(texts), sum(labels)
    print(f"{n} texts ({harmful} harmful, {n - harmful} benign) from {args.data}; threshold {args.threshold}")
    print(f"embedded guard: {single_ms:.1f} ms per text one at a time, {n / batch_s:.0f} texts/s in one batch")
    wrong_alone = sum((r >= args.threshold) != bool(y) for r, y in zip(risks, labels))
    print(f"embedded alone: {wrong_alone} wrong ({wrong_alone / n:.1%})")
    print(f"{'band':>10} {'to GPU':>8} {'kept on CPU, wrong':>20}  (false blocks / missed harm)")
    for lo, hi in BANDS:
        escalated = [lo <= r <= hi for r in risks]
        kept = [(r, y) for r, y, e in zip(risks, labels, escalated) if not e]
        false_blocks = sum(r >= args.threshold and not y for r, y in kept)
        missed = sum(r < args.threshold and y for r, y in kept)
        print(f"  [{lo:2d}, {hi:2d}] {sum(escalated) / n:8.1%} {false_blocks + missed:13d} ({(false_blocks + missed) / n:.1%})"
              f"  ({false_blocks} / {missed})")


def derive_band(risks: list[int], labels: list[bool], miss: float = 0.01) -> tuple[int, int]:
    """[lo, hi] with at most `miss` of the harmful texts below lo and of the benign ones above hi."""
    harmful = sorted(r for r, y in zip(risks, labels) if y)
    benign = sorted(r for r, y in zip(risks, labels) if not y)
    lo = max((t for t in range(101) if sum(r < t for r in harmful) <= miss * len(harmful)), default=0)
    hi = min((t for t in range(101) if sum(r > t for r in benign) <= miss * len(benign)), default=100)
    return min(lo, hi), max(lo, hi)


def heldout(path: Path, threshold: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from eval_embedded import SLICES

    result = json.loads(path.read_text())
    slices = {k: v["risks"] for k, v in result["slices"].items() if not k.startswith(("answers_embedded", "answers_trivia", "answers_refusal", "answers_help"))}
    total = sum(len(r) for r in slices.values())
    print(f"{result['identity']}: {total} held-out texts; threshold {threshold}")
    print("| band | to GPU | " + " | ".join(slices) + " |")
    print("|---|---:|" + "---:|" * len(slices))
    for lo, hi in [(15, 70), (10, 80), (5, 90), CascadeConfig().uncertain, (3, 95), (2, 97)]:
        sent = sum(lo <= r <= hi for rs in slices.values() for r in rs)
        cells = []
        for name, rs in slices.items():
            harmful = SLICES[name][1]
            wrong = sum(r < lo if harmful else r > hi and r >= threshold for r in rs)
            cells.append(f"{wrong}/{len(rs)}")
        print(f"| [{lo}, {hi}] | {sent / total:.0%} | " + " | ".join(cells) + " |")
    print("\nCells: texts the CPU decides wrongly and the GPU guard never sees (harmful slices: risk below the "
          "band; benign slices: risk above it and at or over the threshold).")


if __name__ == "__main__":
    main()
