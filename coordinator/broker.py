"""An embedded MQTT 3.1.1 broker (amqtt) for laptops, demos and tests.

Retained messages, QoS 1 and last wills work, which is all the protocol
needs. It keeps nothing on disk: a restart forgets retained statuses and
halts, so production fleets should use Mosquitto (or another durable broker).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog

log = structlog.get_logger(__name__)

DEFAULT_LISTEN: Final = "127.0.0.1:1883"

_ANONYMOUS: Final = "amqtt.plugins.authentication.AnonymousAuthPlugin"
_PASSWORD_FILE: Final = "amqtt.plugins.authentication.FileAuthPlugin"


class BrokerConfigError(ValueError):
    """A broker setting that cannot work; the text says what to change."""


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_listen(text: str) -> ListenAddress:
    """`HOST:PORT`, `[IPv6]:PORT` or `:PORT` (loopback)."""
    form = "use HOST:PORT, e.g. 127.0.0.1:1883, [::1]:1883 or 0.0.0.0:1883"
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        msg = f"--listen {text!r} has no valid port: {form}"
        raise BrokerConfigError(msg)
    host = host.removeprefix("[").removesuffix("]") or "127.0.0.1"
    return ListenAddress(host, int(port_text))


def broker_config(
    listen: ListenAddress,
    *,
    password_file: Path | None = None,
    allow_anonymous: bool | None = None,
) -> dict[str, Any]:
    """amqtt's configuration for one TCP listener.

    Anonymous clients are allowed by default on loopback only; on any other
    address the broker needs a password file or an explicit `allow_anonymous`,
    because an open broker lets anyone on the network command the agents.
    """
    if allow_anonymous is None:
        allow_anonymous = password_file is None and listen.is_loopback
    if not allow_anonymous and password_file is None:
        msg = (
            f"listening on {listen} without a password file would let anyone on "
            "the network command the agents: give --password-file FILE, or "
            "--allow-anonymous if the network is trusted"
        )
        raise BrokerConfigError(msg)
    if password_file is not None and not password_file.is_file():
        msg = f"password file {str(password_file)!r} does not exist"
        raise BrokerConfigError(msg)

    plugins: dict[str, Any] = {}
    if allow_anonymous:
        plugins[_ANONYMOUS] = {"allow_anonymous": True}
    if password_file is not None:
        plugins[_PASSWORD_FILE] = {"password_file": str(password_file)}
    return {
        "listeners": {"default": {"type": "tcp", "bind": str(listen)}},
        # No $SYS publishing and no packet logging: noise on a small broker.
        "plugins": plugins,
    }


def hash_password(password: str) -> str:
    """An Argon2 hash for a `user:hash` line of the broker's password file."""
    from pwdlib import PasswordHash
    from pwdlib.hashers.argon2 import Argon2Hasher

    return PasswordHash((Argon2Hasher(),)).hash(password)


def _make_broker(config: dict[str, Any]) -> Any:
    # Imported here: amqtt is slow to import and only this command needs it.
    from amqtt.broker import Broker
    from amqtt.session import Session

    class OwnRetainedOnlyBroker(Broker):  # type: ignore[misc]
        """amqtt 0.12 replays, to every client that connects, the retained
        messages of every subscription filter any client holds: a coordinator
        subscribing only to halts also got every agent's status, some halts
        twice. This skips filters the receiving session does not hold."""

        async def _publish_retained_messages_for_subscription(
            self, subscription: tuple[str, int], session: Session
        ) -> None:
            holders = self._subscriptions.get(subscription[0], [])
            if any(held.client_id == session.client_id for held, _ in holders):
                await super()._publish_retained_messages_for_subscription(
                    subscription, session
                )

    return OwnRetainedOnlyBroker(config)


async def serve(
    listen: ListenAddress,
    *,
    password_file: Path | None = None,
    allow_anonymous: bool | None = None,
    stop: asyncio.Event | None = None,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Run the broker until `stop` is set, or SIGTERM or SIGINT arrives;
    `ready` gets its URL once it listens.

    Its sockets get TCP_NODELAY from asyncio, which sets it on every TCP
    connection, so QoS 1 round trips do not stall on Nagle's algorithm.
    """
    config = broker_config(
        listen, password_file=password_file, allow_anonymous=allow_anonymous
    )
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    # amqtt logs every connection at INFO through the standard library.
    logging.getLogger("amqtt").setLevel(logging.WARNING)
    broker = _make_broker(config)
    try:
        await broker.start()
    except Exception as exc:
        msg = f"the broker cannot listen on {listen}: {exc}"
        raise BrokerConfigError(msg) from None
    if ready is not None:
        ready(f"mqtt://{listen}")
    log.info(
        "broker_started", listen=str(listen), anonymous=_ANONYMOUS in config["plugins"]
    )

    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await broker.shutdown()
        log.info("broker_stopped", listen=str(listen))
