"""The study as data: groups, claims and targets name registered strategies and read as what they check."""

from __future__ import annotations

from ckptbench import STRATEGIES, TensorStore, get_strategy
from ckptbench.study import (
    BASELINE,
    BENCH,
    BEST,
    CLAIMS,
    EIGHT_WAY,
    GROUPS,
    SINGLE_KNOB,
    TARGETS,
    TENSORSTORE_EIGHT,
    Criterion,
    ordered,
)


def test_groups_name_registered_strategies_in_the_study_order():
    assert list(STRATEGIES)[: len(EIGHT_WAY)] == list(EIGHT_WAY)
    for group in GROUPS.values():
        assert set(group) <= set(STRATEGIES)
    assert {BASELINE, BEST, *BENCH, *SINGLE_KNOB} <= set(STRATEGIES)
    assert set(SINGLE_KNOB) < set(EIGHT_WAY)


def test_the_tensorstore_approaches_come_from_the_registry():
    assert tuple(n for n in EIGHT_WAY if isinstance(get_strategy(n), TensorStore)) == TENSORSTORE_EIGHT
    assert "pytorch" not in TENSORSTORE_EIGHT


def test_each_single_knob_ablation_changes_one_baseline_knob():
    baseline = get_strategy(BASELINE).config()
    for name in SINGLE_KNOB:
        changed = {k for k, v in get_strategy(name).config().items() if baseline.get(k) != v}
        assert len(changed) == 1, (name, changed)


def test_claims_and_targets_are_keyed_and_unique():
    assert len({c.key for c in CLAIMS}) == len(CLAIMS)
    assert len({t.key for t in TARGETS}) == len(TARGETS)
    for claim in CLAIMS:
        assert claim.criteria
        assert claim.claim
        assert claim.study
        for criterion in claim.criteria:
            if isinstance(criterion, Criterion):
                assert {criterion.ratio.strategy, criterion.ratio.reference} <= set(STRATEGIES)


def test_ordered_puts_the_eight_first_then_the_registry_then_the_rest():
    assert ordered(["custom", "ts+best", "ts+ocdbt", "pytorch"]) == ["pytorch", "ts+ocdbt", "ts+best", "custom"]
