"""The replicated token bucket: a state-based CRDT of consumption counters.

Model
-----
A bucket has a capacity `C` and refills at `r` tokens per second, so a token
taken now is back after the window `W = C / r` seconds. Instead of a level
that every replica would have to agree on, each replica counts what *it*
admitted, per key and per time slot (`slot_s` seconds, 1 s by default)::

    state[key][replica][slot] = tokens that replica admitted in that slot

Only the owning replica ever increments its own counters, so every counter
only grows, and merging two states is the pointwise maximum. That merge is
commutative, associative and idempotent: replicas may exchange whole states
in any order, any number of times, and end up equal.

The tokens available for a key are the capacity minus everything every
replica consumed in the slots still inside the window::

    available = C - sum(state[key][*][s] for s in live slots)

The window's partial slot: a slot is live for `ceil(W / slot_s) + 1` slots
including the current one, and the oldest one counts whole. A token taken at
time `t` therefore comes back between `t + W` and `t + W + slot_s`: the
limiter errs on the side of refusing, by at most `r * slot_s` tokens, and never
hands a token back early. Slots older than the window are pruned.

Slots are wall-clock seconds, so replicas must share a clock (NTP): a replica
whose clock runs `d` seconds ahead ages counters out `d` seconds early, which
adds up to `r * d` tokens to the error bound below.

Error bound
-----------
Each replica admits on its local view, which lacks what the other replicas
admitted since they last gossiped. If every replica starts a gossip interval
with the same view and admits at most `m` tokens of a key during it, the
cluster's consumption within one window stays under::

    C + (R - 1) * min(m, C)

for `R` replicas: each of them may spend the same last tokens once. In words:
a cluster of R replicas over-admits by at most (R - 1) times what one replica
admits per gossip interval, never by more than (R - 1) * C. The property tests
in `tests/unit/test_crdt.py` check this bound.

Corrupt values
--------------
A counter is valid when it is a finite number between 0 and the key's
capacity: one replica can never admit more than the capacity within a window,
so anything above it is corruption, as are NaN, infinities, negatives, text
and NULL. Corrupt counters are treated as absent (zero), and are never sent to
peers nor accepted from them. This errs towards admitting: a corrupt counter
costs at most that one counter's tokens, and a peer holding the true value
restores it at the next gossip round through the max-merge.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeGuard

# replica -> slot -> tokens that replica admitted in that slot
Counters = dict[str, dict[int, float]]
# key -> counters of that key
State = dict[str, Counters]


@dataclass(frozen=True)
class BucketSpec:
    """Capacity and refill rate of the buckets whose key matches a pattern."""

    capacity: float
    refill_per_s: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.capacity) and self.capacity > 0):
            msg = f"bucket capacity must be a positive number, not {self.capacity!r}"
            raise ValueError(msg)
        if not (math.isfinite(self.refill_per_s) and self.refill_per_s > 0):
            msg = f"refill rate must be a positive number, not {self.refill_per_s!r}"
            raise ValueError(msg)

    @property
    def window_s(self) -> float:
        """Seconds after which a token taken now is available again."""
        return self.capacity / self.refill_per_s

    def live_slots(self, slot_s: float) -> int:
        """How many slots, the current one included, count against the bucket."""
        return math.ceil(self.window_s / slot_s - 1e-9) + 1

    def first_live_slot(self, now_slot: int, slot_s: float) -> int:
        return now_slot - self.live_slots(slot_s) + 1


def slot_of(now: float, slot_s: float) -> int:
    """The slot that wall-clock time `now` (seconds since the epoch) falls in."""
    return math.floor(now / slot_s)


def is_valid_count(value: object, capacity: float) -> TypeGuard[float]:
    """Whether `value` can be a counter of a bucket with this capacity."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and 0 <= value <= capacity


def merge_counters(mine: Counters, theirs: Counters) -> Counters:
    """Pointwise maximum of two keys' counters, as a new mapping."""
    merged = {replica: dict(slots) for replica, slots in mine.items()}
    for replica, slots in theirs.items():
        into = merged.setdefault(replica, {})
        for slot, value in slots.items():
            if value > into.get(slot, 0.0):
                into[slot] = value
            else:
                into.setdefault(slot, value)
    return merged


def merge(mine: State, theirs: State) -> State:
    """Pointwise maximum of two states: commutative, associative, idempotent."""
    merged = {key: merge_counters(counters, {}) for key, counters in mine.items()}
    for key, counters in theirs.items():
        merged[key] = merge_counters(merged.get(key, {}), counters)
    return merged


def consumed(
    counters: Counters, spec: BucketSpec, now_slot: int, slot_s: float
) -> float:
    """Tokens of one key consumed by every replica in the live slots."""
    first = spec.first_live_slot(now_slot, slot_s)
    return sum(
        value
        for slots in counters.values()
        for slot, value in slots.items()
        if first <= slot <= now_slot
    )


def available(
    counters: Counters, spec: BucketSpec, now_slot: int, slot_s: float
) -> float:
    """Tokens of one key that may be taken now, as far as this view knows."""
    return max(0.0, spec.capacity - consumed(counters, spec, now_slot, slot_s))


def retry_after_s(
    counters: Counters,
    spec: BucketSpec,
    wanted: float,
    now: float,
    slot_s: float,
) -> float:
    """Seconds until `wanted` tokens are available, if nobody takes any more."""
    now_slot = slot_of(now, slot_s)
    first = spec.first_live_slot(now_slot, slot_s)
    per_slot: dict[int, float] = {}
    for slots in counters.values():
        for slot, value in slots.items():
            if first <= slot <= now_slot:
                per_slot[slot] = per_slot.get(slot, 0.0) + value

    free = spec.capacity - sum(per_slot.values())
    for slot in sorted(per_slot):
        if free >= wanted:
            break
        free += per_slot[slot]
        # The slot stops counting when it falls out of the live range.
        freed_at = (slot + spec.live_slots(slot_s)) * slot_s
        if free >= wanted:
            return max(0.0, freed_at - now)
    return 0.0


def add(counters: Counters, replica: str, slot: int, tokens: float) -> float:
    """Count `tokens` admitted by `replica` in `slot`; return the new counter."""
    slots = counters.setdefault(replica, {})
    slots[slot] = slots.get(slot, 0.0) + tokens
    return slots[slot]


def prune(counters: Counters, first_live: int) -> list[tuple[str, int]]:
    """Drop slots before `first_live`; return the (replica, slot) pairs dropped."""
    dropped = []
    for replica, slots in list(counters.items()):
        for slot in [s for s in slots if s < first_live]:
            del slots[slot]
            dropped.append((replica, slot))
        if not slots:
            del counters[replica]
    return dropped


def live_view(
    state: State,
    spec_for: Callable[[str], BucketSpec],
    now_slot: int,
    slot_s: float,
) -> State:
    """The part of `state` still inside each key's window (what gossip sends)."""
    view: State = {}
    for key, counters in state.items():
        first = spec_for(key).first_live_slot(now_slot, slot_s)
        live = {
            replica: {s: v for s, v in slots.items() if first <= s <= now_slot}
            for replica, slots in counters.items()
        }
        live = {replica: slots for replica, slots in live.items() if slots}
        if live:
            view[key] = live
    return view


def encode_state(state: State) -> dict[str, dict[str, dict[str, float]]]:
    """`state` as JSON-ready nested mappings (slots become string keys)."""
    return {
        key: {
            replica: {str(slot): value for slot, value in slots.items()}
            for replica, slots in counters.items()
        }
        for key, counters in state.items()
    }


def decode_state(
    raw: object, capacity_of: Callable[[str], float] = lambda _key: math.inf
) -> tuple[State, int]:
    """Parse a peer's encoded state, keeping only valid counters.

    `capacity_of` gives a key's capacity for the validity check. Returns the
    state and how many counters were dropped as corrupt or malformed.
    """
    state: State = {}
    dropped = 0
    if not isinstance(raw, dict):
        msg = "a gossiped state must be a JSON object of key -> replica -> slot"
        raise ValueError(msg)
    for key, counters in raw.items():
        if not isinstance(counters, dict):
            dropped += 1
            continue
        capacity = capacity_of(key)
        for replica, slots in counters.items():
            for slot, value in _slot_items(slots):
                if slot is not None and is_valid_count(value, capacity):
                    state.setdefault(key, {}).setdefault(replica, {})[slot] = value
                else:
                    dropped += 1
    return state, dropped


def _slot_items(slots: object) -> Iterable[tuple[int | None, object]]:
    if not isinstance(slots, dict):
        return [(None, None)]
    return [(_as_slot(s), v) for s, v in slots.items()]


def _as_slot(raw: object) -> int | None:
    try:
        return int(str(raw))
    except ValueError:
        return None
