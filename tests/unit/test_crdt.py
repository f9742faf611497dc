"""The token-bucket CRDT: merge laws, convergence, the over-admission bound."""

from __future__ import annotations

import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from token_bucket import crdt
from token_bucket.crdt import BucketSpec, Counters, State

SLOT_S = 1.0
SPEC = BucketSpec(capacity=10.0, refill_per_s=1.0)

replicas = st.sampled_from(["a", "b", "c", "d"])
slots = st.integers(min_value=95, max_value=100)
counts = st.floats(min_value=0, max_value=10, allow_nan=False)
counters_st = st.dictionaries(replicas, st.dictionaries(slots, counts), max_size=4)
states = st.dictionaries(st.sampled_from(["k1", "k2", "k3"]), counters_st, max_size=3)

# Every property runs without a per-example deadline: the machines that run
# the suite are shared, and a slow example is not a wrong one.


@settings(deadline=None)
@given(states, states)
def test_merge_is_commutative(a: State, b: State) -> None:
    """Test that merging a into b gives what merging b into a gives."""
    assert crdt.merge(a, b) == crdt.merge(b, a)


@settings(deadline=None)
@given(states, states, states)
def test_merge_is_associative(a: State, b: State, c: State) -> None:
    """Test that the grouping of merges does not matter."""
    assert crdt.merge(crdt.merge(a, b), c) == crdt.merge(a, crdt.merge(b, c))


@settings(deadline=None)
@given(states)
def test_merge_is_idempotent(a: State) -> None:
    """Test that merging a state into itself changes nothing."""
    assert crdt.merge(a, a) == a


@settings(deadline=None)
@given(states, states)
def test_merge_never_loses_consumption(a: State, b: State) -> None:
    """Test that a merged view counts at least what either side counted."""
    merged = crdt.merge(a, b)
    for key in {*a, *b}:
        for side in (a, b):
            assert crdt.consumed(merged.get(key, {}), SPEC, 100, SLOT_S) >= (
                crdt.consumed(side.get(key, {}), SPEC, 100, SLOT_S) - 1e-9
            )


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2), st.integers(1, 3)), max_size=40),
    st.randoms(use_true_random=False),
)
def test_replicas_that_gossip_converge(
    takes: list[tuple[int, int]], rng: random.Random
) -> None:
    """Test that replicas taking tokens locally agree after pulling each other."""
    views: list[Counters] = [{}, {}, {}]
    names = ["a", "b", "c"]
    for who, tokens in takes:
        if crdt.available(views[who], SPEC, 100, SLOT_S) >= tokens:
            crdt.add(views[who], names[who], 100, tokens)

    # Every replica pulls every other once, in a random order.
    pulls = [(i, j) for i in range(3) for j in range(3) if i != j]
    rng.shuffle(pulls)
    for puller, peer in pulls + pulls:
        views[puller] = crdt.merge_counters(views[puller], views[peer])

    assert views[0] == views[1] == views[2]


@settings(max_examples=100, deadline=None)
@given(
    st.integers(min_value=2, max_value=5),
    st.lists(st.lists(st.integers(0, 4), min_size=5, max_size=5), max_size=8),
)
def test_over_admission_stays_within_the_documented_bound(
    replica_count: int, rounds: list[list[int]]
) -> None:
    """Test that R replicas admit at most C + (R - 1) * min(m, C) in one window.

    Each round, every replica takes up to its share (at most m tokens) on its
    local view, then all replicas gossip, as in the module's error bound.
    """
    names = [f"r{i}" for i in range(replica_count)]
    views: list[Counters] = [{} for _ in names]
    admitted = 0.0
    most_per_round = 0.0
    for wants in rounds:
        for i, name in enumerate(names):
            want = float(wants[i % len(wants)])
            if want and crdt.available(views[i], SPEC, 100, SLOT_S) >= want:
                crdt.add(views[i], name, 100, want)
                admitted += want
                most_per_round = max(most_per_round, want)
        everything: Counters = {}
        for view in views:
            everything = crdt.merge_counters(everything, view)
        views = [crdt.merge_counters(everything, {}) for _ in names]

    bound = SPEC.capacity + (replica_count - 1) * min(most_per_round, SPEC.capacity)
    assert admitted <= bound


@settings(max_examples=100, deadline=None)
@given(
    st.integers(min_value=2, max_value=4),
    st.lists(
        st.tuples(
            st.integers(0, 4), st.lists(st.integers(0, 6), min_size=4, max_size=4)
        ),
        max_size=30,
    ),
)
def test_the_bound_holds_in_every_window_as_time_moves(
    replica_count: int, rounds: list[tuple[int, list[int]]]
) -> None:
    """Test that the over-admission bound holds for the live window at every
    moment while slots age out between gossip rounds."""
    names = [f"r{i}" for i in range(replica_count)]
    views: list[Counters] = [{} for _ in names]
    now_slot = 100
    most_per_round = 0.0
    for advance, wants in rounds:
        now_slot += advance
        for i, name in enumerate(names):
            want = float(wants[i])
            if want and crdt.available(views[i], SPEC, now_slot, SLOT_S) >= want:
                crdt.add(views[i], name, now_slot, want)
                most_per_round = max(most_per_round, want)
        everything: Counters = {}
        for view in views:
            everything = crdt.merge_counters(everything, view)
        views = [crdt.merge_counters(everything, {}) for _ in names]

        in_window = crdt.consumed(everything, SPEC, now_slot, SLOT_S)
        bound = SPEC.capacity + (replica_count - 1) * min(most_per_round, SPEC.capacity)
        assert in_window <= bound


def test_a_single_replica_never_admits_more_than_the_capacity() -> None:
    """Test that one replica alone is an exact limiter within its window."""
    counters: Counters = {}
    admitted = 0
    for _ in range(25):
        if crdt.available(counters, SPEC, 100, SLOT_S) >= 1:
            crdt.add(counters, "a", 100, 1)
            admitted += 1

    assert admitted == SPEC.capacity


def test_tokens_come_back_after_the_window_and_at_most_one_slot_late() -> None:
    """Test that a token taken at t counts until t + W and is free by t + W + slot."""
    counters: Counters = {}
    taken_at = 100.5
    crdt.add(counters, "a", crdt.slot_of(taken_at, SLOT_S), 10)

    still_counted = crdt.slot_of(taken_at + SPEC.window_s, SLOT_S)
    free_again = crdt.slot_of(taken_at + SPEC.window_s + SLOT_S, SLOT_S)

    assert crdt.available(counters, SPEC, still_counted, SLOT_S) == 0
    assert crdt.available(counters, SPEC, free_again, SLOT_S) == SPEC.capacity


def test_retry_after_points_at_the_slot_that_frees_enough_tokens() -> None:
    """Test that retry_after_s is when the oldest consumption leaves the window."""
    counters: Counters = {"a": {100: 4.0, 105: 6.0}}
    now = 106.2

    wait = crdt.retry_after_s(counters, SPEC, 3, now, SLOT_S)

    # Slot 100 counts for live_slots = 11 slots: it stops counting at t = 111.
    assert math.isclose(wait, 111 - now)


def test_prune_drops_only_slots_before_the_window() -> None:
    """Test that prune removes old slots and keeps live ones."""
    counters: Counters = {"a": {80: 1.0, 95: 2.0}, "b": {70: 3.0}}

    dropped = crdt.prune(counters, SPEC.first_live_slot(100, SLOT_S))

    assert sorted(dropped) == [("a", 80), ("b", 70)]
    assert counters == {"a": {95: 2.0}}


def test_decode_drops_corrupt_counters_and_counts_them() -> None:
    """Test that NaN, negative, above-capacity and text counters are refused."""
    raw = {
        "k": {
            "a": {"100": 1.0, "101": float("nan"), "102": -1, "103": 11, "104": "x"},
            "b": {"nope": 1.0},
        }
    }

    state, dropped = crdt.decode_state(raw, lambda _key: SPEC.capacity)

    assert state == {"k": {"a": {100: 1.0}}}
    assert dropped == 5


def test_bucket_spec_refuses_a_zero_refill_rate() -> None:
    """Test that a spec without refill is refused with the reason."""
    try:
        BucketSpec(capacity=10, refill_per_s=0)
    except ValueError as exc:
        assert "refill rate" in str(exc)
    else:
        raise AssertionError("a zero refill rate was accepted")
