"""Open-loop HTTP load: requests leave on a fixed schedule, whatever the
answers take.

A closed-loop generator (send, wait, send) slows down exactly when the system
does, and so hides the queueing a real user would suffer. Here every send time
is fixed in advance (request `n` is due at `start + n / rate`) and latency is
measured from that intended time, so a request that waited for a connection
or for a late event loop counts the wait.

Requests go round robin over the replicas; the key advances once per round,
so every key is taken from every replica in turn and the replicas' shared
buckets are really exercised.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import aiohttp
import structlog

log = structlog.get_logger("coordinator.load")

# Records kept in memory: 1000 req/s for an hour. Beyond it the oldest stay and
# new ones are counted but not kept, so memory stays bounded on long runs.
MAX_RECORDS: Final = 3_600_000


class Clock:
    """The run's clock: seconds since the run started, on the monotonic
    clock, with the wall time of that start for the journal."""

    def __init__(self) -> None:
        self.origin = time.monotonic()
        self.wall_origin = time.time()

    def now(self) -> float:
        return time.monotonic() - self.origin

    def wall(self, t: float) -> float:
        """Unix time of run time `t`."""
        return self.wall_origin + t


@dataclass(frozen=True)
class Replica:
    """One replica of the system under test, as the load sees it."""

    name: str
    url: str


@dataclass(slots=True)
class RequestRecord:
    """One request: when it was due, where it went, and how it ended."""

    # Intended send time, seconds on the run clock.
    t: float
    replica: str
    phase: str
    key: str
    # HTTP status, 0 when no answer came (see `error`).
    status: int
    # From the intended send time to the end of the answer.
    latency_s: float
    error: str | None = None

    @property
    def failed(self) -> bool:
        """5xx and transport errors fail; 429 is a rate limiter's right answer."""
        return self.error is not None or self.status >= 500

    @property
    def done_at(self) -> float:
        return self.t + self.latency_s


@dataclass
class LoadStats:
    """How well the generator kept its own schedule."""

    sent: int = 0
    dropped_records: int = 0
    # How late the generator itself launched a request (event loop lag): if
    # this grows, the figures describe the generator, not the system.
    max_launch_lag_s: float = 0.0


class LoadGenerator:
    """Sends `rate` requests per second, open loop, until stopped.

    `phase` may be changed while it runs; each request records the phase in
    force at its intended send time.
    """

    def __init__(
        self,
        replicas: Sequence[Replica],
        keys: Sequence[str],
        rate: float,
        clock: Clock,
        *,
        method: str = "POST",
        path: str = "/v1/take/{key}",
        timeout_s: float = 2.0,
        connections: int = 64,
    ) -> None:
        if not replicas:
            msg = "the load needs at least one replica to send to"
            raise ValueError(msg)
        if not keys:
            msg = "the load needs at least one key"
            raise ValueError(msg)
        if rate <= 0:
            msg = f"the load rate must be positive (got {rate})"
            raise ValueError(msg)
        self.replicas = list(replicas)
        self.keys = list(keys)
        self.rate = rate
        self.clock = clock
        self.method = method
        self.path = path
        self.timeout_s = timeout_s
        self.connections = connections
        self.phase = "warmup"
        self.records: list[RequestRecord] = []
        self.stats = LoadStats()
        self._stop = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()

    def stop(self) -> None:
        """End the schedule; requests already sent still finish."""
        self._stop.set()

    def recent(self, since: float) -> list[RequestRecord]:
        """Requests due at or after run time `since` that have finished."""
        found = []
        # Records are appended as they finish; one due at `since` finishes
        # after `since`, so the scan stops at the first earlier finish.
        for record in reversed(self.records):
            if record.done_at < since:
                break
            if record.t >= since:
                found.append(record)
        return found

    async def run(self, duration_s: float | None = None) -> None:
        """Send until `duration_s` has passed (None: until `stop`)."""
        connector = aiohttp.TCPConnector(limit=self.connections, limit_per_host=0)
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            await self._schedule(http, duration_s)

            # Stragglers end by their own timeout; the margin covers the close.
            if self._in_flight:
                await asyncio.wait(self._in_flight, timeout=self.timeout_s + 1.0)
        log.info(
            "load_finished",
            sent=self.stats.sent,
            max_launch_lag_ms=round(self.stats.max_launch_lag_s * 1000, 1),
        )

    async def _schedule(
        self, http: aiohttp.ClientSession, duration_s: float | None
    ) -> None:
        interval = 1.0 / self.rate
        start = self.clock.now()
        end = start + duration_s if duration_s is not None else float("inf")
        seq = 0
        while not self._stop.is_set():
            due = start + seq * interval
            if due >= end:
                return
            wait = due - self.clock.now()
            if wait > 0:
                try:
                    await asyncio.wait_for(self._stop.wait(), timeout=wait)
                    return
                except TimeoutError:
                    pass

            # Launch everything that is due by now: after a late wake-up the
            # schedule catches up instead of sliding.
            now = self.clock.now()
            while due <= now and due < end:
                self._launch(http, seq, due, now - due)
                seq += 1
                due = start + seq * interval

    def _launch(
        self, http: aiohttp.ClientSession, seq: int, due: float, lag: float
    ) -> None:
        self.stats.sent += 1
        if lag > self.stats.max_launch_lag_s:
            self.stats.max_launch_lag_s = lag
        task = asyncio.get_running_loop().create_task(self._request(http, seq, due))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _request(self, http: aiohttp.ClientSession, seq: int, due: float) -> None:
        count = len(self.replicas)
        replica = self.replicas[seq % count]
        key = self.keys[(seq // count) % len(self.keys)]
        phase = self.phase
        url = replica.url.rstrip("/") + self.path.replace("{key}", key)

        status, error = 0, None
        try:
            async with http.request(self.method, url) as response:
                await response.read()
                status = response.status
        except TimeoutError:
            error = "timeout"
        except aiohttp.ClientError as exc:
            error = type(exc).__name__
        except OSError as exc:
            error = type(exc).__name__

        latency = self.clock.now() - due
        if len(self.records) >= MAX_RECORDS:
            self.stats.dropped_records += 1
            return
        self.records.append(
            RequestRecord(due, replica.name, phase, key, status, latency, error)
        )
