"""What every guard backend shares: its inputs, its verdicts and its errors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Stage = Literal["prompt", "response"]

# The one category set every backend maps onto (the FlexGuard card's).
HARM_CATEGORIES: tuple[str, ...] = ("VIO", "ILG", "SEX", "INF", "DIS", "MIS", "JAIL")
SAFE = "SAFE"


@dataclass(frozen=True, slots=True)
class GuardInput:
    """One thing to score. Prompt stage: the user text. Response stage: the user text and the answer."""

    stage: Stage
    user: str
    assistant: str | None = None
    # Whether a reasoning guard writes its reasoning before the verdict; None: as the guard is configured.
    # Part of the verdict's cache key when set (the guard is asked something else).
    reasoning: bool | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a guard says about one input, independent of any policy."""

    risk: int  # 0..100
    categories: tuple[str, ...]  # ("SAFE",) or a sorted subset of HARM_CATEGORIES

    def __post_init__(self) -> None:
        if not 0 <= self.risk <= 100:
            raise ValueError(f"risk must be in [0, 100], got {self.risk}")

    @property
    def harm_categories(self) -> tuple[str, ...]:
        return tuple(c for c in self.categories if c != SAFE)


GuardErrorKind = Literal["timeout", "unreachable", "bad_status", "unparsable"]


class GuardError(Exception):
    """The guard could not give a verdict. Never treated as SAFE; the policy decides what follows."""

    def __init__(self, kind: GuardErrorKind, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


def reasoning_default(guard: object) -> bool | None:
    """Whether the guard reasons unless told otherwise; None for a guard that has no reasoning switch."""
    value = getattr(guard, "reasoning_default", None)
    return value if isinstance(value, bool) else None


class Guard(Protocol):
    """Anything that turns inputs into verdicts."""

    @property
    def identity(self) -> str:
        """Backend, model and template version: part of every cache key."""
        ...

    async def score(self, inputs: Sequence[GuardInput]) -> list[Verdict]:
        """One verdict per input, in order. Raises GuardError if any cannot be scored."""
        ...

    async def ready(self) -> tuple[bool, str]:
        """Whether the guard answers now, and a short reason for /readyz."""
        ...

    async def aclose(self) -> None: ...
