"""`guardgate calibrate`: pick a tenant's threshold from labelled examples (the FlexGuard card's Option B).

The card: "Sweep candidate thresholds t in [0, 100]. Choose t_tau that maximizes the target metric (F1 by
default) on the validation set." A text is flagged when `risk >= t`, as everywhere in the gateway.

Definitions used throughout (stated here because small dev sets hit every edge):
- precision = tp / (tp + fp), and 0.0 when nothing is flagged (the usual zero-division convention);
- recall = tp / (tp + fn), F1 = 2tp / (2tp + fp + fn), accuracy = (tp + tn) / n; each 0.0 when its
  denominator is 0. Computed from integer counts, so equal ratios compare exactly equal.
- Ties: several thresholds often reach the same best value (plateaus). We choose the one closest to 40,
  the card's moderate default; between two equally close, the lower one (it flags more: fail safe).

The pure parts (`sweep`, `best_threshold`, `with_strictness`) do no I/O; `run_calibrate` reads the data,
scores the lines without a `risk` with the configured guard, prints the table, plots and writes the policy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import yaml

from gateway.guard.base import Guard, GuardError, GuardInput
from gateway.policy.schema import PRESETS
from gateway.yamlfile import ConfigError

Metric = Literal["f1", "precision", "recall", "accuracy"]
METRICS: tuple[str, ...] = get_args(Metric)
THRESHOLDS = range(0, 101)
TIE_ANCHOR = PRESETS["moderate"]  # 40: the card's conservative default
MAX_LISTED_ERRORS = 20
_SUMMARY = (__doc__ or "").split("\n\n")[0]


# ------------------------------------------------------------------ pure parts ----

@dataclass(frozen=True, slots=True)
class ThresholdMetrics:
    """How `flagged = risk >= threshold` scores against the labels."""

    threshold: int
    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def flagged(self) -> int:
        return self.tp + self.fp

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float:
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def accuracy(self) -> float:
        return _ratio(self.tp + self.tn, self.tp + self.fp + self.fn + self.tn)

    def value(self, metric: Metric) -> float:
        return getattr(self, metric)


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def sweep(risks: Sequence[int], labels: Sequence[int]) -> list[ThresholdMetrics]:
    """Confusion counts and metrics for every threshold 0..100 (flagged when risk >= threshold)."""
    if len(risks) != len(labels) or not risks:
        raise ValueError("need as many labels as risks, and at least one of each")
    # Histogram by risk, then walk thresholds from 100 down: O(n + 101).
    pos, neg = [0] * 101, [0] * 101
    for risk, label in zip(risks, labels):
        if not 0 <= risk <= 100 or label not in (0, 1):
            raise ValueError(f"risk must be 0..100 and label 0 or 1, got risk={risk!r} label={label!r}")
        (pos if label else neg)[risk] += 1
    total_pos, total_neg = sum(pos), sum(neg)
    rows: list[ThresholdMetrics] = []
    tp = fp = 0
    for t in reversed(THRESHOLDS):
        tp, fp = tp + pos[t], fp + neg[t]
        rows.append(ThresholdMetrics(t, tp=tp, fp=fp, fn=total_pos - tp, tn=total_neg - fp))
    rows.reverse()
    return rows


def best_threshold(rows: Sequence[ThresholdMetrics], metric: Metric = "f1") -> ThresholdMetrics:
    """The row with the highest `metric`; ties go to the threshold closest to 40, then to the lower one."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}")
    if not rows:
        raise ValueError("no thresholds to choose from")
    return max(rows, key=lambda r: (r.value(metric), -abs(r.threshold - TIE_ANCHOR), -r.threshold))


_STRICTNESS_LINE = re.compile(r"^(strictness[ \t]*:[ \t]*)([^#\r\n]*?)([ \t]*#[^\r\n]*)?(?=\r?$)", re.MULTILINE)


def with_strictness(text: str, value: int) -> str:
    """The policy text with its top-level `strictness:` set to `value`; everything else (comments too) kept.

    Edits the value on an unindented `strictness:` line (keeping a trailing comment), else appends the key.
    Raises ValueError if the result does not read back as a mapping with that strictness (e.g. a flow-style
    document, or a value spread over several lines): better to refuse than to write a broken policy.
    """
    if not 0 <= value <= 100:
        raise ValueError(f"strictness must be 0..100, got {value}")
    new, count = _STRICTNESS_LINE.subn(lambda m: f"{m.group(1)}{value}{m.group(3) or ''}", text)
    if count == 0:
        newline = "\r\n" if "\r\n" in text else "\n"
        new = text + ("" if not text or text.endswith("\n") else newline) + f"strictness: {value}{newline}"
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"not valid YAML ({getattr(e, 'problem', None) or e}); fix it first") from None
    try:
        data = yaml.safe_load(new)
    except yaml.YAMLError:
        data = None
    if not isinstance(data, dict) or data.get("strictness") != value:
        raise ValueError("could not set a top-level `strictness:` line in this file; edit it by hand")
    return new


def _ranges(values: Sequence[int]) -> str:
    """[30, 31, 32, 35] -> '30-32, 35'."""
    out: list[str] = []
    start = prev = values[0]
    for v in list(values[1:]) + [None]:  # type: ignore[list-item]
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(out)


# --------------------------------------------------------------------- reading ----

class CalibrationError(Exception):
    """Something the user must fix; the message names the file and line. `code` is the exit code."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Example:
    line: int
    text: str
    label: int
    response: str | None = None
    risk: int | None = None

    def guard_input(self) -> GuardInput:
        if self.response is None:
            return GuardInput("prompt", self.text)
        return GuardInput("response", self.text, self.response)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true/false are not labels


def _example(obj: object, line: int) -> Example | str:
    """An Example, or what is wrong with the line."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    problems = []
    text, label, response, risk = obj.get("text"), obj.get("label"), obj.get("response"), obj.get("risk")
    if "text" not in obj:
        problems.append("missing `text`")
    elif not isinstance(text, str):
        problems.append(f"`text` must be a string, got {type(text).__name__}")
    if "label" not in obj:
        problems.append("missing `label` (0 or 1; 1 = should be flagged)")
    elif not (_is_int(label) and label in (0, 1)):
        problems.append(f"`label` must be 0 or 1, got {json.dumps(label)}")
    if response is not None and not isinstance(response, str):
        problems.append(f"`response` must be a string, got {type(response).__name__}")
    if risk is not None and not (_is_int(risk) and 0 <= risk <= 100):
        problems.append(f"`risk` must be an integer 0..100, got {json.dumps(risk)}")
    if problems:
        return "; ".join(problems)
    return Example(line, text, label, response, risk)  # type: ignore[arg-type]


def read_examples(path: Path) -> list[Example]:
    """Every non-blank line of a JSONL file as an Example; CalibrationError listing every bad line."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CalibrationError(f"{path}: cannot read: {e.strerror or e}") from None
    examples: list[Example] = []
    problems: list[str] = []
    for n, chunk in enumerate(raw.splitlines(), start=1):
        try:
            line = chunk.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(f"{path}:{n}: not UTF-8 (byte {e.start + 1})")
            continue
        if not line.strip():
            continue  # blank lines, e.g. a trailing one
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{path}:{n}: not valid JSON: {e.msg} (column {e.colno})")
            continue
        result = _example(obj, n)
        if isinstance(result, str):
            problems.append(f"{path}:{n}: {result}")
        else:
            examples.append(result)
    if problems:
        shown = problems[:MAX_LISTED_ERRORS]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more")
        raise CalibrationError("data error:\n" + "\n".join(shown))
    if not examples:
        raise CalibrationError(f"{path}: no examples (the file is empty); expected one JSON object per line "
                               'like {"text": "...", "label": 1}')
    return examples


def check_both_classes(path: Path, labels: Sequence[int], note: str = "") -> None:
    """Precision, recall and F1 mean nothing (and any threshold 'wins') without both classes."""
    positives = sum(labels)
    if positives in (0, len(labels)):
        only = 1 if positives else 0
        raise CalibrationError(
            f"{path}: all {len(labels)} examples{note} have label {only}; precision, recall and F1 are undefined "
            f"without both classes. Add examples labelled {1 - only} and run again.")


# --------------------------------------------------------------------- scoring ----

async def score_examples(guard: Guard, examples: Sequence[Example], path: Path, concurrency: int,
                         stop_on_error: bool = True) -> tuple[dict[int, int], list[str]]:
    """Score examples with the guard, `concurrency` at a time; by default stop after a batch with an error.

    Returns risks by line number, and one message per line that failed. Each line is its own `score` call so
    that an error names its line (a batched call fails as a whole).
    """
    risks: dict[int, int] = {}
    errors: list[str] = []
    last_report = time.monotonic()
    for start in range(0, len(examples), concurrency):
        batch = examples[start:start + concurrency]
        results = await asyncio.gather(*(guard.score([e.guard_input()]) for e in batch), return_exceptions=True)
        for example, result in zip(batch, results):
            if isinstance(result, GuardError):
                errors.append(f"{path}:{example.line}: guard error: {result}")
            elif isinstance(result, BaseException):
                raise result
            else:
                risks[example.line] = result[0].risk
        if errors and stop_on_error:
            break
        done = start + len(batch)
        if time.monotonic() - last_report > 2 or done == len(examples):  # a real 8B guard takes a while
            print(f"scored {done}/{len(examples)}", file=sys.stderr)
            last_report = time.monotonic()
    return risks, errors


async def _score_with_config(config_path: Path, examples: Sequence[Example], path: Path, concurrency: int,
                             skip_errors: bool) -> tuple[dict[int, int], list[str]]:
    from gateway.config import load_config
    from gateway.guard import build_guard
    from gateway.logs import redact_url

    config = load_config(config_path)
    guard = build_guard(config.guard)
    where = ", ".join(redact_url(u) for u in config.guard.base_urls) or "in process"
    print(f"scoring {len(examples)} lines with {guard.identity} ({where})", file=sys.stderr)
    try:
        return await score_examples(guard, examples, path, concurrency, stop_on_error=not skip_errors)
    finally:
        await guard.aclose()


# -------------------------------------------------------------------- printing ----

def format_table(rows: Sequence[ThresholdMetrics], chosen: int, total: int) -> str:
    notes = {v: k for k, v in PRESETS.items()}
    lines = [f"{'threshold':>9}  {'flagged':>9}  {'precision':>9}  {'recall':>6}  {'f1':>5}  {'accuracy':>8}",
             "-" * 58]
    for r in rows:
        note = [notes[r.threshold]] if r.threshold in notes else []
        if r.threshold == chosen:
            note.insert(0, "<- chosen")
        lines.append(f"{r.threshold:>9}  {f'{r.flagged}/{total}':>9}  {r.precision:>9.3f}  {r.recall:>6.3f}  "
                     f"{r.f1:>5.3f}  {r.accuracy:>8.3f}  {' '.join(note)}".rstrip())
    return "\n".join(lines)


def format_choice(rows: Sequence[ThresholdMetrics], best: ThresholdMetrics, metric: Metric, total: int) -> str:
    out = [f"best threshold for {metric}: {best.threshold}  (precision {best.precision:.3f}, recall "
           f"{best.recall:.3f}, f1 {best.f1:.3f}, accuracy {best.accuracy:.3f}, flagged {best.flagged}/{total})"]
    tied = [r.threshold for r in rows if r.value(metric) == best.value(metric)]
    if len(tied) > 1:
        out.append(f"tie: thresholds {_ranges(tied)} all reach {metric} {best.value(metric):.3f}; chose the one "
                   f"closest to {TIE_ANCHOR} (the card's moderate default), the lower one if two are equally close")
    return "\n".join(out)


# -------------------------------------------------------------------- plotting ----

def plot_curve(rows: Sequence[ThresholdMetrics], best: ThresholdMetrics, metric: Metric, out: Path) -> None:
    """Precision, recall and F1 against the threshold, the chosen one marked, the rubric's 20/40/60 in grey."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg, without pyplot's global state
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = [r.threshold for r in rows]
    for name in ("precision", "recall", "f1") + (("accuracy",) if metric == "accuracy" else ()):
        # steps-post: risks are integers, so the value at t holds on [t, t + 1).
        ax.plot(xs, [r.value(name) for r in rows], label=name, drawstyle="steps-post",
                linewidth=2 if name == metric else 1.2)
    for label, t in PRESETS.items():
        ax.axvline(t, color="0.85", linewidth=1, zorder=0)
        ax.text(t, 1.02, f"{label} {t}", ha="center", va="bottom", fontsize=8, color="0.5")
    ax.axvline(best.threshold, color="black", linestyle="--", linewidth=1)
    ax.plot([best.threshold], [best.value(metric)], "o", color="black",
            label=f"chosen t={best.threshold} ({metric} {best.value(metric):.3f})")
    ax.set(xlim=(0, 100), ylim=(0, 1.08), xlabel="threshold (flagged when risk >= threshold)", ylabel="score")
    ax.set_title("FlexGuard threshold calibration", pad=16)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, format="png")


# ------------------------------------------------------------------------- CLI ----

def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, type=Path, help="labelled JSONL: text, label (0/1), optional "
                   "response, optional precomputed risk (0-100)")
    p.add_argument("--config", type=Path, help="gateway config whose guard scores lines without a risk")
    p.add_argument("--metric", choices=METRICS, default="f1", help="what the chosen threshold maximises")
    p.add_argument("--plot", type=Path, default=Path("calibration.png"), help="PNG of the curves")
    p.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    p.add_argument("--write-tenant", type=Path, metavar="POLICY.yaml",
                   help="set `strictness:` in this tenant policy file to the chosen threshold")
    p.add_argument("--concurrency", type=int, default=8, help="guard calls in flight at once (default 8)")
    p.add_argument("--skip-errors", action="store_true", help="leave out lines the guard cannot score")


def add_calibrate_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add `calibrate` to a CLI's subcommands; `args.func(args)` then returns the exit code."""
    p = subparsers.add_parser("calibrate", help="choose a threshold from labelled examples (card Option B)",
                              description=_SUMMARY)
    _add_arguments(p)
    p.set_defaults(func=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    """Exit codes: 0 done; 1 the guard could not score some lines; 2 bad data, config or output path."""
    try:
        return _run(args)
    except CalibrationError as e:
        print(f"guardgate calibrate: {e}", file=sys.stderr)
        return e.code
    except ConfigError as e:
        print(f"guardgate calibrate: configuration error:\n{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("guardgate calibrate: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    path: Path = args.data
    examples = read_examples(path)
    check_both_classes(path, [e.label for e in examples])  # before spending guard time
    if args.concurrency < 1:
        raise CalibrationError("--concurrency must be at least 1")

    unscored = [e for e in examples if e.risk is None]
    risks = {e.line: e.risk for e in examples if e.risk is not None}
    if unscored:
        if args.config is None:
            raise CalibrationError(f"{path}: {len(unscored)} lines have no `risk` (first: line {unscored[0].line}); "
                                   "pass --config gateway.yaml so the guard can score them")
        got, errors = asyncio.run(_score_with_config(args.config, unscored, path, args.concurrency,
                                                     args.skip_errors))
        risks.update(got)
        for message in errors[:MAX_LISTED_ERRORS]:
            print(message, file=sys.stderr)
        if len(errors) > MAX_LISTED_ERRORS:
            print(f"... and {len(errors) - MAX_LISTED_ERRORS} more guard errors", file=sys.stderr)
        if errors and not args.skip_errors:
            raise CalibrationError("the guard could not score the lines above; fix the guard, or pass "
                                   "--skip-errors to leave such lines out", code=1)
        if errors:
            print(f"skipped {len(errors)} lines the guard could not score", file=sys.stderr)
    kept = [e for e in examples if e.line in risks]
    if not kept:
        raise CalibrationError(f"{path}: no examples left to calibrate on", code=1)
    labels = [e.label for e in kept]
    check_both_classes(path, labels, note=" left after skipping guard errors" if len(kept) < len(examples) else "")

    rows = sweep([risks[e.line] for e in kept], labels)
    best = best_threshold(rows, args.metric)
    precomputed = sum(1 for e in kept if e.risk is not None)
    print(f"{len(kept)} examples: {sum(labels)} labelled 1, {len(kept) - sum(labels)} labelled 0; "
          f"{len(kept) - precomputed} scored by the guard, {precomputed} with a precomputed risk")
    print("flagged when risk >= threshold; precision is 0.000 when nothing is flagged")
    print(format_table(rows, best.threshold, len(kept)))
    print()
    print(format_choice(rows, best, args.metric, len(kept)))

    if not args.no_plot:
        try:
            plot_curve(rows, best, args.metric, args.plot)
        except ImportError:
            print("guardgate calibrate: matplotlib is not installed, so no plot was drawn; install it with "
                  "pip install matplotlib (or, from GuardGate's clone, pip install '.[calibrate]')", file=sys.stderr)
        except OSError as e:
            raise CalibrationError(f"{args.plot}: cannot write the plot: {e.strerror or e}") from None
        else:
            print(f"plot: {args.plot}")

    if args.write_tenant is not None:
        write_tenant(args.write_tenant, best.threshold)
        print(f"wrote strictness: {best.threshold} to {args.write_tenant}")
    return 0


def write_tenant(path: Path, value: int) -> None:
    """Set `strictness:` in a tenant policy file, or create the file with `tenant: <stem>`."""
    try:
        if path.exists():
            with open(path, encoding="utf-8", newline="") as f:  # newline="": keep CRLF files CRLF
                text = f.read()
            try:
                new = with_strictness(text, value)
            except ValueError as e:
                raise CalibrationError(f"{path}: {e}") from None
        else:
            if not path.parent.is_dir():
                raise CalibrationError(f"{path}: folder {path.parent} does not exist")
            new = yaml.safe_dump({"tenant": path.stem, "strictness": value}, sort_keys=False)
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(new)
    except UnicodeDecodeError:
        raise CalibrationError(f"{path}: not UTF-8 text; is it a policy file?") from None
    except OSError as e:
        raise CalibrationError(f"{path}: cannot write: {e.strerror or e}") from None


def main(argv: list[str] | None = None) -> int:
    """`python -m gateway.calibrate --data dev.jsonl ...`, the same as `guardgate calibrate`."""
    parser = argparse.ArgumentParser(prog="python -m gateway.calibrate", description=_SUMMARY)
    _add_arguments(parser)
    return run_calibrate(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
