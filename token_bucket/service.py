"""The rating API of one replica over HTTP (aiohttp), and its gossip loop.

Routes::

    POST /v1/take/{key}?n=1     200 {"allowed": true, "remaining": ...}
                                429 {"allowed": false, ...} + Retry-After
    GET  /v1/buckets/{key}      this replica's view: tokens, capacity, ...
    GET  /v1/state              every live counter (what peers pull)
    GET  /healthz               200 while the replica serves
    GET  /metrics               Prometheus text format
    PUT  /v1/admin/gossip       {"paused": true|false}, only with --admin

Gossip is pull-based: every `gossip_interval` the replica fetches each peer's
`/v1/state`, measures drift against it, and merges it. A state pulled from a
peer carries everything that peer knows, so R replicas agree one interval
after the last change, whatever the order of the pulls.

Gossip sends every live counter of every key each round: a round costs
O(keys x replicas) bytes per peer. That is fine for a reference system with
thousands of keys; deltas since the last pull would be needed for millions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from token_bucket import crdt
from token_bucket.metrics import ReplicaMetrics
from token_bucket.replica import Replica, parse_tokens
from token_bucket.settings import ReplicaSettings

log = structlog.get_logger("token_bucket.service")

REPLICA_KEY = web.AppKey("replica", Replica)
METRICS_KEY = web.AppKey("metrics", ReplicaMetrics)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# A peer slower than this counts as failed for the round; the next round
# tries again, so a slow peer delays convergence but never gossip itself.
PULL_TIMEOUT_S = 2.0
MAX_KEY_LENGTH = 256


def build_app(settings: ReplicaSettings) -> web.Application:
    """The aiohttp application of one replica, gossip loop included."""
    metrics = ReplicaMetrics()
    replica = Replica(settings, metrics)
    app = web.Application(middlewares=[_measure])
    app[REPLICA_KEY] = replica
    app[METRICS_KEY] = metrics
    app.router.add_post("/v1/take/{key}", _take)
    app.router.add_get("/v1/buckets/{key}", _bucket)
    app.router.add_get("/v1/state", _state)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    if settings.admin:
        app.router.add_put("/v1/admin/gossip", _admin_gossip)
    app.cleanup_ctx.append(_lifecycle)
    return app


@web.middleware
async def _measure(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith(("/v1/take/", "/v1/buckets/")):
        return await handler(request)

    metrics = request.app[METRICS_KEY]
    started = time.perf_counter()
    try:
        return await handler(request)
    except sqlite3.Error as exc:
        # The state file is unreadable (corrupted pages, a lock held too long):
        # answer 503 and keep serving, an operator must look at the file.
        metrics.errors.inc()
        metrics.requests.labels(result="error").inc()
        log.error("state_file_error", path=request.path, error=str(exc))
        return web.json_response({"error": f"state file error: {exc}"}, status=503)
    finally:
        metrics.latency.observe(time.perf_counter() - started)


async def _take(request: web.Request) -> web.Response:
    replica = request.app[REPLICA_KEY]
    metrics = request.app[METRICS_KEY]
    key = request.match_info["key"]
    try:
        _check_key(key)
        tokens = parse_tokens(request.query.get("n", "1"))
    except ValueError as exc:
        return web.json_response({"error": str(exc)}, status=400)

    capacity = replica.settings.buckets.spec_for(key).capacity
    if tokens > capacity:
        msg = f"n={tokens:g} exceeds the bucket capacity {capacity:g}: never admitted"
        return web.json_response({"error": msg}, status=400)

    result = replica.take(key, tokens)
    body = {
        "key": key,
        "allowed": result.allowed,
        "remaining": result.remaining,
        "capacity": result.capacity,
        "replica": replica.settings.replica_id,
    }
    if result.allowed:
        metrics.requests.labels(result="allowed").inc()
        return web.json_response(body)
    metrics.requests.labels(result="limited").inc()
    retry_after = max(1, math.ceil(result.retry_after_s))
    body["retry_after_s"] = result.retry_after_s
    return web.json_response(
        body, status=429, headers={"Retry-After": str(retry_after)}
    )


async def _bucket(request: web.Request) -> web.Response:
    key = request.match_info["key"]
    try:
        _check_key(key)
    except ValueError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    return web.json_response(request.app[REPLICA_KEY].view(key))


async def _state(request: web.Request) -> web.Response:
    replica = request.app[REPLICA_KEY]
    body = {
        "replica": replica.settings.replica_id,
        "slot_s": replica.settings.slot_s,
        "keys": crdt.encode_state(replica.live_state()),
    }
    return web.json_response(body)


async def _healthz(request: web.Request) -> web.Response:
    replica = request.app[REPLICA_KEY]
    return web.json_response({"ok": True, "replica": replica.settings.replica_id})


async def _metrics(request: web.Request) -> web.Response:
    payload = generate_latest(request.app[METRICS_KEY].registry)
    response = web.Response(body=payload)
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return response


async def _admin_gossip(request: web.Request) -> web.Response:
    replica = request.app[REPLICA_KEY]
    try:
        body = await request.json()
        paused = body["paused"]
        if not isinstance(paused, bool):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        msg = 'send {"paused": true} or {"paused": false}'
        return web.json_response({"error": msg}, status=400)
    replica.gossip_paused = paused
    replica.log.info("gossip_paused" if paused else "gossip_resumed")
    return web.json_response({"paused": paused})


def _check_key(key: str) -> None:
    if not key or len(key) > MAX_KEY_LENGTH:
        msg = f"a bucket key is 1-{MAX_KEY_LENGTH} characters"
        raise ValueError(msg)


# ------------------------------------------------------------------ gossip


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    replica = app[REPLICA_KEY]
    pidfile = replica.settings.pidfile
    if pidfile is not None:
        _write_pidfile(pidfile)
    timeout = aiohttp.ClientTimeout(total=PULL_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        task = asyncio.create_task(
            _gossip_loop(replica, app[METRICS_KEY], session),
            name=f"gossip-{replica.settings.replica_id}",
        )
        replica.log.info(
            "replica_started",
            peers=list(replica.settings.peers),
            gossip_interval_s=replica.settings.gossip_interval_s,
        )
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    replica.close()
    if pidfile is not None:
        _remove_pidfile(pidfile)
    replica.log.info("replica_stopped")


async def _gossip_loop(
    replica: Replica, metrics: ReplicaMetrics, session: aiohttp.ClientSession
) -> None:
    interval = replica.settings.gossip_interval_s
    while True:
        await asyncio.sleep(interval)
        if replica.gossip_paused:
            continue
        try:
            await gossip_round(replica, metrics, session)
        except sqlite3.Error as exc:
            metrics.errors.inc()
            replica.log.error("gossip_state_file_error", error=str(exc))


async def gossip_round(
    replica: Replica, metrics: ReplicaMetrics, session: aiohttp.ClientSession
) -> None:
    """Pull every peer once, measure drift against each, merge what they have."""
    pulls = await asyncio.gather(
        *(_pull(peer, replica, metrics, session) for peer in replica.settings.peers)
    )
    drift = 0.0
    for theirs in pulls:
        if theirs is None:
            continue
        drift = max(drift, replica.drift(theirs))
        replica.merge(theirs)
    metrics.drift.set(drift)
    metrics.gossip_rounds.inc()
    replica.prune()


async def _pull(
    peer: str,
    replica: Replica,
    metrics: ReplicaMetrics,
    session: aiohttp.ClientSession,
) -> crdt.State | None:
    url = peer.rstrip("/") + "/v1/state"
    try:
        async with session.get(url) as response:
            response.raise_for_status()
            raw = await response.read()
        metrics.gossip_bytes.inc(len(raw))
        body = json.loads(raw)
        return replica.decode_peer_state(body["keys"])
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
        metrics.gossip_failures.inc()
        # Heals itself: the next round pulls again.
        replica.log.warning("gossip_pull_failed", peer=peer, error=repr(exc))
        return None


def _write_pidfile(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(f"{os.getpid()}\n")
    temporary.replace(path)


def _remove_pidfile(path: Path) -> None:
    # Only our own: a restarted replica may already have written its pid.
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text().strip()) == os.getpid():
            path.unlink()
