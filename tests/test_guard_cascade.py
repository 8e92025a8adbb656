"""The cascade's routing: only texts in the uncertain band reach the second guard."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from gateway.guard.base import GuardError, GuardInput, Verdict
from gateway.guard.cascade import CascadeGuard


class ScriptedGuard:
    """A stand-in for a remote model: risk = the number in the text, or a fixed answer."""

    def __init__(self, name: str, fixed: Verdict | None = None, error: GuardError | None = None) -> None:
        self.identity, self.fixed, self.error = name, fixed, error
        self.seen: list[str] = []

    async def score(self, inputs: Sequence[GuardInput]) -> list[Verdict]:
        self.seen += [i.user for i in inputs]
        if self.error:
            raise self.error
        return [self.fixed or Verdict(int(i.user.split()[-1]), ("VIO",) if int(i.user.split()[-1]) >= 40 else ("SAFE",))
                for i in inputs]

    async def ready(self) -> tuple[bool, str]:
        return True, "ok"

    async def aclose(self) -> None:
        pass


def test_clear_cases_stay_with_the_first_guard_and_unsure_ones_go_on():
    first = ScriptedGuard("embedded")
    second = ScriptedGuard("gpu", fixed=Verdict(77, ("ILG",)))
    cascade = CascadeGuard(first, second, (20, 60))
    texts = ["text 5", "text 19", "text 20", "text 45", "text 60", "text 61", "text 99"]
    verdicts = asyncio.run(cascade.score([GuardInput("prompt", t) for t in texts]))
    assert [v.risk for v in verdicts] == [5, 19, 77, 77, 77, 61, 99]
    assert second.seen == ["text 20", "text 45", "text 60"]  # in one batch, in order
    assert cascade.stats() == {"scored": 7, "escalated": 3}


def test_a_second_guard_failure_is_a_guard_error():
    cascade = CascadeGuard(ScriptedGuard("embedded"), ScriptedGuard("gpu", error=GuardError("timeout", "slow")),
                           (20, 60))
    assert asyncio.run(cascade.score([GuardInput("prompt", "fine 3")]))[0].risk == 3  # not asked: no error
    with pytest.raises(GuardError):
        asyncio.run(cascade.score([GuardInput("prompt", "unsure 30")]))


def test_identity_names_both_guards_and_the_band():
    cascade = CascadeGuard(ScriptedGuard("a"), ScriptedGuard("b"), (10, 70))
    assert cascade.identity == "cascade|a|b|uncertain=10-70"
    with pytest.raises(ValueError):
        CascadeGuard(ScriptedGuard("a"), ScriptedGuard("b"), (70, 10))


class PartlyReadingGuard(ScriptedGuard):
    """A first guard that says which texts it read only in part (the embedded guard's long texts)."""

    async def score_with_coverage(self, inputs: Sequence[GuardInput]) -> tuple[list[Verdict], list[bool]]:
        return await self.score(inputs), ["long" not in i.user for i in inputs]


def test_a_text_the_first_guard_read_only_in_part_goes_on_whatever_its_score():
    first = PartlyReadingGuard("embedded")
    second = ScriptedGuard("gpu", fixed=Verdict(88, ("VIO",)))
    cascade = CascadeGuard(first, second, (20, 60))
    verdicts = asyncio.run(cascade.score([GuardInput("prompt", t) for t in ["short 3", "long 3", "long 95"]]))
    assert [v.risk for v in verdicts] == [3, 88, 88]
    assert second.seen == ["long 3", "long 95"]
