"""Probes: what the runner measures besides its own load.

- `DriftProbe` reads the same buckets from every replica at once
  (`GET /v1/buckets/{key}`) and turns the answers into drift samples;
- `scrape_metrics` reads a service's `/metrics` with prometheus_client's own
  text parser;
- `PrometheusProbe` asks a Prometheus server for a range (`query_range`),
  for clusters where the service is scraped already;
- `TelemetryProbe` keeps the agents' node samples (CPU, memory) as they
  arrive over MQTT.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import structlog
from prometheus_client.parser import text_string_to_metric_families

from chaos_agent import wire
from coordinator.analysis import DriftSample
from coordinator.load import Clock, Replica
from coordinator.mqtt import Received
from coordinator.report import TelemetryPoint

log = structlog.get_logger("coordinator.probes")


class ProbeError(RuntimeError):
    """A probe that got no usable answer; the text names the source."""


# ---------------------------------------------------------------------- drift


class DriftProbe:
    """Reads `keys` from every replica concurrently, one sample per key.

    The reads of one key start together, so the replicas answer within a few
    milliseconds of each other; the bucket refills meanwhile by at most
    rate x that spread, which is negligible against a capacity.
    """

    def __init__(
        self,
        replicas: Sequence[Replica],
        keys: Sequence[str],
        clock: Clock,
        *,
        timeout_s: float = 1.0,
    ) -> None:
        self.replicas = list(replicas)
        self.keys = list(keys)
        self.clock = clock
        self.timeout_s = timeout_s
        self.samples: list[DriftSample] = []

    async def sample(self, http: aiohttp.ClientSession) -> list[DriftSample]:
        """Take one sample of every key; replicas that do not answer are
        left out of that sample (and logged)."""
        t = self.clock.now()
        found = await asyncio.gather(*(self._key(http, t, key) for key in self.keys))
        taken = [s for s in found if s is not None]
        self.samples += taken
        return taken

    async def _key(
        self, http: aiohttp.ClientSession, t: float, key: str
    ) -> DriftSample | None:
        answers = await asyncio.gather(
            *(self._read(http, r, key) for r in self.replicas)
        )
        tokens = {
            r.name: a[0] for r, a in zip(self.replicas, answers, strict=True) if a
        }
        capacities = [a[1] for a in answers if a]
        if not capacities:
            return None
        return DriftSample(t, key, tokens, max(capacities))

    async def _read(
        self, http: aiohttp.ClientSession, replica: Replica, key: str
    ) -> tuple[float, float] | None:
        url = f"{replica.url.rstrip('/')}/v1/buckets/{key}"
        try:
            timeout = aiohttp.ClientTimeout(total=self.timeout_s)
            async with http.get(url, timeout=timeout) as response:
                if response.status != 200:
                    log.debug(
                        "bucket_read_failed",
                        replica=replica.name,
                        status=response.status,
                    )
                    return None
                body = await response.json(content_type=None)
            return float(body["tokens"]), float(body["capacity"])
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            # Debug only: a dead replica would log this every sampling; the
            # drift samples without it already say so.
            log.debug(
                "bucket_read_failed", replica=replica.name, error=type(exc).__name__
            )
        except (KeyError, TypeError, ValueError) as exc:
            log.warning(
                "bucket_answer_unreadable", replica=replica.name, error=str(exc)
            )
        return None


# -------------------------------------------------------------------- metrics


# Metric name -> [(labels, value)], as parsed from a /metrics page.
Samples = dict[str, list[tuple[dict[str, str], float]]]


async def scrape_metrics(
    http: aiohttp.ClientSession, url: str, timeout_s: float = 2.0
) -> Samples:
    """Samples of a Prometheus text endpoint: name -> [(labels, value)].

    Histogram and counter samples keep their suffixed names
    (`bucket_latency_seconds_bucket`, `bucket_requests_total`).
    """
    try:
        async with http.get(
            url, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as response:
            if response.status != 200:
                msg = f"{url} answered {response.status}, not metrics"
                raise ProbeError(msg)
            text = await response.text()
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        msg = f"cannot scrape {url}: {type(exc).__name__} {exc}"
        raise ProbeError(msg) from None

    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(
                (dict(sample.labels), sample.value)
            )
    return samples


# What the service's own /metrics says over a run: counters as deltas.
SERVICE_COUNTERS: Final[tuple[tuple[str, str, dict[str, str]], ...]] = (
    ("allowed", "bucket_requests_total", {"result": "allowed"}),
    ("limited", "bucket_requests_total", {"result": "limited"}),
    ("error", "bucket_requests_total", {"result": "error"}),
    ("errors_total", "bucket_errors_total", {}),
    ("gossip_failures", "bucket_gossip_failures_total", {}),
)


def _value(samples: Samples, name: str, labels: dict[str, str]) -> float | None:
    for found, value in samples.get(name, []):
        if all(found.get(k) == v for k, v in labels.items()):
            return value
    return None


def service_deltas(before: Samples, after: Samples) -> dict[str, float]:
    """The service's counters over a run, and its drift gauge at the end.

    A counter lower at the end than at the start means the process restarted
    (counters start again from zero): its end value is then the best lower
    bound, and `restarted` is 1.
    """
    figures: dict[str, float] = {"restarted": 0.0}
    for label, name, labels in SERVICE_COUNTERS:
        end = _value(after, name, labels)
        if end is None:
            continue
        start = _value(before, name, labels) or 0.0
        if end < start:
            figures["restarted"] = 1.0
            start = 0.0
        figures[label] = end - start
    drift = _value(after, "bucket_state_drift", {})
    if drift is not None:
        figures["state_drift"] = drift
    return figures


# ----------------------------------------------------------------- prometheus


@dataclass(frozen=True)
class Series:
    """One series of a range query: its labels and (unix time, value) points."""

    labels: dict[str, str]
    points: list[tuple[float, float]]


class PrometheusProbe:
    """Range queries against a Prometheus server's HTTP API."""

    def __init__(self, base_url: str, timeout_s: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    async def query_range(
        self,
        http: aiohttp.ClientSession,
        query: str,
        start: float,
        end: float,
        step_s: float = 1.0,
    ) -> list[Series]:
        """`query` evaluated every `step_s` from `start` to `end` (unix time).

        NaN points (a rate over too few samples) are dropped.
        """
        params = {
            "query": query,
            "start": f"{start:.3f}",
            "end": f"{end:.3f}",
            "step": f"{step_s:g}",
        }
        url = f"{self.base_url}/api/v1/query_range"
        body = await self._get(http, url, params)
        if body.get("status") != "success":
            msg = f"Prometheus refused {query!r}: {body.get('error', body)}"
            raise ProbeError(msg)

        found = []
        for result in body["data"]["result"]:
            points = [(float(t), float(v)) for t, v in result["values"]]
            points = [(t, v) for t, v in points if not math.isnan(v)]
            found.append(Series(dict(result["metric"]), points))
        return found

    async def _get(
        self, http: aiohttp.ClientSession, url: str, params: dict[str, str]
    ) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with http.get(url, params=params, timeout=timeout) as response:
                body: dict[str, Any] = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            reason = f"{type(exc).__name__} {exc}"
            msg = f"cannot query Prometheus at {self.base_url}: {reason}"
            raise ProbeError(msg) from None
        return body


# ------------------------------------------------------------------ telemetry


class TelemetryProbe:
    """Keeps the telemetry samples agents publish, on the run clock."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.points: list[TelemetryPoint] = []

    def take(self, message: Received) -> bool:
        """Keep `message` if it is a telemetry sample; return whether it was."""
        if not message.topic.endswith("/telemetry"):
            return False
        try:
            sample = wire.decode(wire.Telemetry, message.payload)
        except wire.WireError as exc:
            log.warning("telemetry_ignored", topic=message.topic, error=str(exc))
            return False
        self.points.append(
            TelemetryPoint(
                self.clock.now(), sample.node, sample.cpu_percent, sample.memory_percent
            )
        )
        return True
