"""The `token-bucket` command: run one replica of the rating API."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import structlog
import typer
from aiohttp import web

from token_bucket.service import build_app
from token_bucket.settings import (
    DEFAULT_SPEC,
    BucketRules,
    ReplicaSettings,
    parse_duration,
    parse_rule,
)

app = typer.Typer(
    help="Reference system under test: a rate-limiting API whose replicas share "
    "a CRDT token bucket through gossip, with state in SQLite.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Keep `serve` a subcommand even while it is the only one."""


@app.command()
def serve(
    replica_id: Annotated[
        str, typer.Option(help="Name of this replica, unique in the cluster.")
    ],
    state: Annotated[
        Path,
        typer.Option(
            help="SQLite file of this replica's counters (created if absent)."
        ),
    ],
    listen: Annotated[
        str, typer.Option(help="HOST:PORT to serve on.")
    ] = "127.0.0.1:8080",
    peers: Annotated[
        str,
        typer.Option(help="Comma-separated base URLs of the other replicas."),
    ] = "",
    gossip_interval: Annotated[
        str, typer.Option(help="How often to pull every peer's state: 0.5s, 500ms.")
    ] = "0.5s",
    bucket: Annotated[
        list[str] | None,
        typer.Option(
            help="PATTERN=CAPACITY/REFILL_PER_S for keys matching an fnmatch "
            "pattern; repeat it, the first match wins. Other keys get "
            f"{DEFAULT_SPEC.capacity:g}/{DEFAULT_SPEC.refill_per_s:g}; "
            "'*=20/2' changes that default.",
        ),
    ] = None,
    slot: Annotated[
        str,
        typer.Option(
            help="Length of a counter slot; tokens return up to one slot late."
        ),
    ] = "1s",
    pidfile: Annotated[
        Path | None, typer.Option(help="Write this process's pid here while it runs.")
    ] = None,
    admin: Annotated[
        bool,
        typer.Option(
            help="Expose PUT /v1/admin/gossip to pause gossip (tests and benchmarks "
            "only: anyone who can reach the port can partition the replica)."
        ),
    ] = False,
) -> None:
    """Run one replica until SIGTERM or SIGINT."""
    try:
        host, _, port = listen.rpartition(":")
        rules = tuple(parse_rule(text) for text in bucket or [])
        settings = ReplicaSettings(
            replica_id=replica_id,
            state_path=state,
            peers=tuple(p.strip() for p in peers.split(",") if p.strip()),
            buckets=BucketRules(rules),
            gossip_interval_s=parse_duration(gossip_interval),
            slot_s=parse_duration(slot),
            admin=admin,
            pidfile=pidfile,
        )
        if not host or not port.isdigit():
            msg = f"--listen {listen!r} is not HOST:PORT, e.g. 127.0.0.1:8080"
            raise ValueError(msg)
        if settings.gossip_interval_s <= 0 or settings.slot_s <= 0:
            msg = "--gossip-interval and --slot must be longer than zero"
            raise ValueError(msg)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None

    _configure_logging()
    web.run_app(
        build_app(settings), host=host, port=int(port), print=None, access_log=None
    )


def _configure_logging() -> None:
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def main() -> None:
    app()
