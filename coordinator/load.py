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

Connections are kept alive, as real clients do, but only for
`connection_max_age_s`: then a fresh pool takes the new requests and the old
one closes once its requests have ended. Clients behind a load balancer see
the same recycling, and it is what lets a fault that only reaches new
connections (the proxy latency engine, see docs/latency-proxy.md) reach the
load within that age.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
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
    # Connection pools opened: one, plus one per `connection_max_age_s`.
    pools: int = 0
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
        connection_max_age_s: float | None = 5.0,
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
        self.connection_max_age_s = connection_max_age_s
        self.phase = "warmup"
        self.records: list[RequestRecord] = []
        self.stats = LoadStats()
        self._stop = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._pool: _Pool | None = None
        self._retiring: set[asyncio.Task[None]] = set()

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
        self._pool = self._open_pool()
        try:
            await self._schedule(duration_s)

            # Stragglers end by their own timeout; the margin covers the close.
            if self._in_flight:
                await asyncio.wait(self._in_flight, timeout=self.timeout_s + 1.0)
        finally:
            await self._pool.session.close()
            if self._retiring:
                await asyncio.wait(self._retiring, timeout=self.timeout_s + 1.0)
        log.info(
            "load_finished",
            sent=self.stats.sent,
            pools=self.stats.pools,
            max_launch_lag_ms=round(self.stats.max_launch_lag_s * 1000, 1),
        )

    def _open_pool(self) -> _Pool:
        self.stats.pools += 1
        connector = aiohttp.TCPConnector(limit=self.connections, limit_per_host=0)
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        return _Pool(session, opened_at=self.clock.now())

    def _current_pool(self, now: float) -> _Pool:
        """The pool new requests go to: a fresh one once the current one has
        reached the connections' maximum age."""
        assert self._pool is not None, "the load is not running"
        max_age = self.connection_max_age_s
        if max_age is not None and now - self._pool.opened_at >= max_age:
            retired = self._pool
            self._pool = self._open_pool()
            task = asyncio.get_running_loop().create_task(_close_when_idle(retired))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        return self._pool

    async def _schedule(self, duration_s: float | None) -> None:
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
            pool = self._current_pool(now)
            while due <= now and due < end:
                self._launch(pool, seq, due, now - due)
                seq += 1
                due = start + seq * interval

    def _launch(self, pool: _Pool, seq: int, due: float, lag: float) -> None:
        self.stats.sent += 1
        if lag > self.stats.max_launch_lag_s:
            self.stats.max_launch_lag_s = lag
        request = self._request(pool.session, seq, due)
        task = asyncio.get_running_loop().create_task(request)
        for running in (self._in_flight, pool.in_flight):
            running.add(task)
            task.add_done_callback(running.discard)

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


@dataclass
class _Pool:
    """One keep-alive connection pool and the requests running on it."""

    session: aiohttp.ClientSession
    opened_at: float
    in_flight: set[asyncio.Task[None]] = field(default_factory=set)


async def _close_when_idle(pool: _Pool) -> None:
    """Close a retired pool once its requests have ended (each ends by its
    own timeout), so no request is cut by the recycling."""
    if pool.in_flight:
        await asyncio.wait(set(pool.in_flight))
    await pool.session.close()
