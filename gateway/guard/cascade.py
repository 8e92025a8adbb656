"""`cascade`: the embedded CPU guard first; the GPU guard only where the embedded score is uncertain.

Clear cases (an embedded risk below the band, or above it) cost no GPU time; texts whose embedded risk
falls inside the band go to the GPU guard, whose verdict replaces the embedded one, and so do texts the
first guard read only in part (too long to read whole). The trade: a text the embedded guard gets
confidently wrong is never seen by the GPU guard.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.guard.base import Guard, GuardInput, Verdict, reasoning_default


class CascadeGuard:
    def __init__(self, first: Guard, second: Guard, uncertain: tuple[int, int]) -> None:
        lo, hi = uncertain
        if not 0 <= lo <= hi <= 100:
            raise ValueError("the uncertain band is [low, high] with 0 <= low <= high <= 100")
        self.first, self.second, self.uncertain = first, second, (lo, hi)
        self._identity = f"cascade|{first.identity}|{second.identity}|uncertain={lo}-{hi}"
        self.scored = self.escalated = 0  # texts seen, and of those sent to the second guard

    @property
    def identity(self) -> str:
        return self._identity

    @property
    def reasoning_default(self) -> bool | None:
        """The second guard's: an input's reasoning switch is passed to it (the first has none)."""
        return reasoning_default(self.second)

    def needs_second(self, verdict: Verdict) -> bool:
        lo, hi = self.uncertain
        return lo <= verdict.risk <= hi

    async def score(self, inputs: Sequence[GuardInput]) -> list[Verdict]:
        with_coverage = getattr(self.first, "score_with_coverage", None)
        if with_coverage is not None:
            verdicts, covered = await with_coverage(inputs)
        else:
            verdicts, covered = await self.first.score(inputs), [True] * len(inputs)
        unsure = [i for i, v in enumerate(verdicts) if self.needs_second(v) or not covered[i]]
        self.scored += len(inputs)
        if unsure:
            # A failure here is a guard error like any other: the policy's on_guard_error decides.
            second = await self.second.score([inputs[i] for i in unsure])
            self.escalated += len(unsure)
            for i, verdict in zip(unsure, second):
                verdicts[i] = verdict
        return verdicts

    def stats(self) -> dict[str, int]:
        return {"scored": self.scored, "escalated": self.escalated}

    async def ready(self) -> tuple[bool, str]:
        (ok1, why1), (ok2, why2) = await self.first.ready(), await self.second.ready()
        return ok1 and ok2, f"first: {why1}; second: {why2}"

    async def aclose(self) -> None:
        await self.first.aclose()
        await self.second.aclose()
