"""decide(verdict, policy, stage): every branch."""

from __future__ import annotations

import pytest

from gateway.guard.base import Verdict
from gateway.policy.decide import decide, threshold_for
from gateway.policy.schema import Policy, PromptStagePolicy, ResponseStagePolicy


@pytest.mark.parametrize("strictness,threshold", [("strict", 20), ("moderate", 40), ("loose", 60), (55, 55), (0, 0)])
def test_presets_and_integers(strictness, threshold):
    policy = Policy(strictness=strictness)
    assert decide(Verdict(threshold, ("VIO",)), policy, "prompt").outcome == "block"  # risk >= threshold flags
    if threshold > 0:
        below = decide(Verdict(threshold - 1, ("VIO",)), policy, "prompt")
        assert below.outcome == "allow" and not below.flagged
        assert below.threshold == threshold


def test_default_is_moderate_40():
    assert decide(Verdict(40, ("SAFE",)), Policy(), "prompt").threshold == 40


def test_category_override_is_stricter_or_looser():
    policy = Policy(strictness="moderate", categories={"SEX": 10, "MIS": "loose"})
    assert decide(Verdict(15, ("SEX",)), policy, "prompt").outcome == "block"
    d = decide(Verdict(50, ("MIS",)), policy, "prompt")
    assert d.outcome == "allow" and d.threshold == 60 and "category MIS" in d.reason


def test_several_categories_take_the_strictest():
    policy = Policy(strictness="moderate", categories={"MIS": 80})
    # VIO has no override, so it counts at the general 40.
    assert decide(Verdict(50, ("MIS", "VIO")), policy, "prompt").threshold == 40
    policy = Policy(strictness="moderate", categories={"MIS": 80, "VIO": 70})
    assert decide(Verdict(50, ("MIS", "VIO")), policy, "prompt").threshold == 70


def test_safe_verdicts_use_the_general_threshold():
    assert threshold_for(Verdict(30, ("SAFE",)), Policy(strictness=25, categories={"VIO": 5})) == (25, "strictness 25")


@pytest.mark.parametrize("action", ["block", "flag", "shadow"])
def test_the_stage_action_applies_only_when_flagged(action):
    policy = Policy(prompt=PromptStagePolicy(action=action), response=ResponseStagePolicy(action="block"))
    assert decide(Verdict(90, ("VIO",)), policy, "prompt").outcome == action
    assert decide(Verdict(90, ("VIO",)), policy, "response").outcome == "block"
    assert decide(Verdict(10, ("SAFE",)), policy, "prompt").outcome == "allow"


def test_decision_carries_its_reason():
    d = decide(Verdict(72, ("ILG",)), Policy(strictness="loose"), "response")
    assert (d.stage, d.risk, d.categories, d.threshold) == ("response", 72, ("ILG",), 60)
    assert d.reason == "risk 72 >= 60 (strictness loose)"
