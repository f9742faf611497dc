"""One replica's bucket logic: serve takes from the local view, merge gossip.

No HTTP here: `token_bucket.service` puts this behind aiohttp. Every method
runs on the event loop thread; SQLite calls are short (one upsert per take)
and are made synchronously, which keeps the ordering of takes trivial.
The cost: while another process holds the file's write lock (a chaos agent
corrupting it), the whole replica waits, up to the store's busy timeout --
which is what a real single-writer service would do, and shows in p99.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from token_bucket import crdt
from token_bucket.crdt import State
from token_bucket.metrics import ReplicaMetrics
from token_bucket.settings import ReplicaSettings
from token_bucket.store import Store

log = structlog.get_logger("token_bucket.replica")


@dataclass(frozen=True)
class TakeResult:
    allowed: bool
    remaining: float
    capacity: float
    retry_after_s: float = 0.0


class Replica:
    """The CRDT state of one replica, backed by its SQLite file."""

    def __init__(
        self,
        settings: ReplicaSettings,
        metrics: ReplicaMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.log = log.bind(replica=settings.replica_id)
        self.store = Store(settings.state_path)
        self.counter_id = settings.replica_id
        if self.store.quarantined is not None:
            # The counters this replica wrote before are lost here but live on
            # at its peers. Counting anew under the same name would be hidden
            # by the peers' higher copies (max-merge) until those slots age
            # out; a new incarnation's name keeps every new take visible.
            self.counter_id = f"{settings.replica_id}+{int(clock())}"
            self.log.warning("counting_as_new_incarnation", counter_id=self.counter_id)
        self.state: State = {}
        self.corrupt_rows: set[tuple[str, str, int]] = set()
        self.gossip_paused = False
        self._reload()

    def close(self) -> None:
        self.store.close()

    # ------------------------------------------------------------- serving

    def take(self, key: str, tokens: float) -> TakeResult:
        """Admit `tokens` of `key` if this replica's view has them."""
        self.refresh()
        spec = self.settings.buckets.spec_for(key)
        now = self.clock()
        now_slot = crdt.slot_of(now, self.settings.slot_s)
        counters = self.state.setdefault(key, {})
        free = crdt.available(counters, spec, now_slot, self.settings.slot_s)

        if free < tokens:
            wait = crdt.retry_after_s(counters, spec, tokens, now, self.settings.slot_s)
            return TakeResult(False, free, spec.capacity, wait)

        own = self.counter_id
        value = crdt.add(counters, own, now_slot, tokens)
        self.store.write([(key, own, now_slot, value)])
        self.corrupt_rows.discard((key, own, now_slot))
        self.metrics.corrupt_rows.set(len(self.corrupt_rows))
        return TakeResult(True, free - tokens, spec.capacity)

    def view(self, key: str) -> dict[str, Any]:
        """This replica's view of one bucket, for `GET /v1/buckets/{key}`."""
        self.refresh()
        spec = self.settings.buckets.spec_for(key)
        now_slot = crdt.slot_of(self.clock(), self.settings.slot_s)
        counters = self.state.get(key, {})
        first = spec.first_live_slot(now_slot, self.settings.slot_s)
        by_replica = {
            replica: sum(v for s, v in slots.items() if first <= s <= now_slot)
            for replica, slots in counters.items()
        }
        return {
            "key": key,
            "replica": self.settings.replica_id,
            "tokens": crdt.available(counters, spec, now_slot, self.settings.slot_s),
            "capacity": spec.capacity,
            "refill_per_s": spec.refill_per_s,
            "window_s": spec.window_s,
            "consumed_by_replica": by_replica,
            "corrupt_rows": sum(1 for k, _, _ in self.corrupt_rows if k == key),
        }

    def refresh(self) -> None:
        """Read the file again if someone else wrote to it."""
        if self.store.changed_elsewhere():
            self.log.info("state_changed_on_disk", path=str(self.store.path))
            self._reload()

    def _reload(self) -> None:
        # Reads every row: O(rows) per outside write. Fine while outside writes
        # are rare (operators, chaos agents); a busy second writer would need
        # a change log instead.
        loaded = self.store.load(self._capacity_of)
        self.state = loaded.state
        self.corrupt_rows = {(r.key, r.replica, r.slot) for r in loaded.corrupt}
        self.metrics.corrupt_rows.set(len(self.corrupt_rows))
        if loaded.corrupt:
            self.metrics.errors.inc(len(loaded.corrupt))
            sample = [
                {
                    "key": r.key,
                    "replica": r.replica,
                    "slot": r.slot,
                    "value": repr(r.value),
                }
                for r in loaded.corrupt[:5]
            ]
            # Heals itself: peers or the moving window replace these counters.
            self.log.warning(
                "corrupt_rows_ignored", count=len(loaded.corrupt), sample=sample
            )

    def _capacity_of(self, key: str) -> float:
        return self.settings.buckets.spec_for(key).capacity

    # -------------------------------------------------------------- gossip

    def live_state(self) -> State:
        """Every counter still inside its window: what peers pull."""
        self.refresh()
        now_slot = crdt.slot_of(self.clock(), self.settings.slot_s)
        spec_for = self.settings.buckets.spec_for
        return crdt.live_view(self.state, spec_for, now_slot, self.settings.slot_s)

    def decode_peer_state(self, raw: object) -> State:
        """A peer's encoded state, with invalid counters dropped and counted."""
        state, dropped = crdt.decode_state(raw, self._capacity_of)
        if dropped:
            self.metrics.errors.inc(dropped)
            self.log.warning("peer_sent_corrupt_counters", dropped=dropped)
        return state

    def drift(self, theirs: State) -> float:
        """Max over sampled keys of |mine - theirs| / capacity, in tokens now."""
        self.refresh()
        now_slot = crdt.slot_of(self.clock(), self.settings.slot_s)
        keys = sorted(set(self.state) | set(theirs))
        if len(keys) > self.settings.drift_sample_keys:
            keys = random.sample(keys, self.settings.drift_sample_keys)
        worst = 0.0
        for key in keys:
            spec = self.settings.buckets.spec_for(key)
            mine = crdt.available(
                self.state.get(key, {}), spec, now_slot, self.settings.slot_s
            )
            other = crdt.available(
                theirs.get(key, {}), spec, now_slot, self.settings.slot_s
            )
            worst = max(worst, abs(mine - other) / spec.capacity)
        return worst

    def merge(self, theirs: State) -> int:
        """Merge a peer's state; write the counters that grew. Returns how many."""
        self.refresh()
        grown = []
        for key, counters in theirs.items():
            mine = self.state.setdefault(key, {})
            for replica, slots in counters.items():
                into = mine.setdefault(replica, {})
                for slot, value in slots.items():
                    if value > into.get(slot, 0.0) or (
                        (key, replica, slot) in self.corrupt_rows
                    ):
                        into[slot] = value
                        grown.append((key, replica, slot, value))
        if grown:
            self.store.write(grown)
            for key, replica, slot, _ in grown:
                self.corrupt_rows.discard((key, replica, slot))
            self.metrics.corrupt_rows.set(len(self.corrupt_rows))
        return len(grown)

    def prune(self) -> int:
        """Drop counters that fell out of their window, in memory and on disk."""
        self.refresh()
        now_slot = crdt.slot_of(self.clock(), self.settings.slot_s)
        cutoffs = []
        dropped = 0
        for key in {*self.state, *(k for k, _, _ in self.corrupt_rows)}:
            spec = self.settings.buckets.spec_for(key)
            first = spec.first_live_slot(now_slot, self.settings.slot_s)
            dropped += len(crdt.prune(self.state.get(key, {}), first))
            cutoffs.append((key, first))
            if key in self.state and not self.state[key]:
                del self.state[key]
        self.store.delete_before(cutoffs)
        self.corrupt_rows = {
            (k, r, s)
            for k, r, s in self.corrupt_rows
            if not isinstance(s, int)
            or s
            >= self.settings.buckets.spec_for(k).first_live_slot(
                now_slot, self.settings.slot_s
            )
        }
        self.metrics.corrupt_rows.set(len(self.corrupt_rows))
        return dropped


def parse_tokens(raw: str) -> float:
    """Parse the `n` of a take: a positive finite number of tokens."""
    try:
        tokens = float(raw)
    except ValueError:
        msg = f"n={raw!r} is not a number of tokens; write e.g. ?n=1"
        raise ValueError(msg) from None
    if not math.isfinite(tokens) or tokens <= 0:
        msg = f"n={raw!r} must be a positive number of tokens"
        raise ValueError(msg)
    return tokens
