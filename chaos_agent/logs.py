"""Logging for the agent: structlog events as JSON lines, pretty on a TTY.

Every event is a name and keys (`log.info("fault_applied", fault="cpu")`);
bound context (`command_id`, `experiment`) is added where a message enters.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

LogFormat = Literal["auto", "json", "console"]


def configure(level: str = "info", fmt: LogFormat = "auto") -> None:
    """Send structlog events (and stdlib logs of libraries) to stderr.

    `auto` writes JSON lines unless stderr is a terminal, so a log collector
    gets one parseable object per line and a person gets readable colours.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        msg = f"unknown log level {level!r}: use debug, info, warning or error"
        raise ValueError(msg)

    pretty = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer()
        if pretty
        else structlog.processors.JSONRenderer()
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )

    # Libraries (aiomqtt, aiohttp) log through the standard library; keep
    # their warnings, drop their chatter.
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr)
