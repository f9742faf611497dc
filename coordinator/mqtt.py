"""How the coordinator talks to the broker: URLs, clients and a small transport.

Everything above this module (fleet view, commands, CLI) speaks to a
`Transport`: subscribe, publish, and one stream of received messages. The real
one wraps an aiomqtt client; tests swap in an in-memory one instead of
patching calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Final, Protocol
from urllib.parse import unquote, urlsplit

import aiomqtt

DEFAULT_BROKER_URL: Final = "mqtt://127.0.0.1:1883"
_DEFAULT_PORTS: Final = {"mqtt": 1883, "mqtts": 8883}

# Without TCP_NODELAY every QoS 1 round trip stalls ~45 ms on Nagle's algorithm
# meeting delayed ACKs (measured on the project's machines, see TESTING.md).
NODELAY: Final = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class BrokerUrlError(ValueError):
    """A broker URL that cannot be used; the text shows the expected form."""


class BrokerUnreachable(ConnectionError):
    """The broker refused or did not answer; the text names the URL."""


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker is and how to reach it, parsed from an mqtt[s]:// URL."""

    host: str
    port: int
    tls: bool
    # Credentials may also come in the URL (mqtt://user:pass@host); flags win.
    username: str | None = None
    password: str | None = None

    @property
    def url(self) -> str:
        """The URL without credentials, safe to print in errors and logs."""
        scheme = "mqtts" if self.tls else "mqtt"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """Parse `mqtt://host[:port]` or `mqtts://host[:port]` (TLS)."""
    form = "use mqtt://HOST[:PORT] or mqtts://HOST[:PORT], e.g. mqtt://127.0.0.1:1883"
    parts = urlsplit(url.strip())
    if parts.scheme not in _DEFAULT_PORTS:
        msg = f"broker URL {url!r} has no mqtt or mqtts scheme: {form}"
        raise BrokerUrlError(msg)
    if not parts.hostname:
        msg = f"broker URL {url!r} names no host: {form}"
        raise BrokerUrlError(msg)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        msg = f"broker URL {url!r} has a path or query, which MQTT ignores: {form}"
        raise BrokerUrlError(msg)
    try:
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
    except ValueError:
        msg = f"broker URL {url!r} has an invalid port: {form}"
        raise BrokerUrlError(msg) from None

    return BrokerAddress(
        host=parts.hostname,
        port=port,
        tls=parts.scheme == "mqtts",
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


@dataclass(frozen=True)
class BrokerSettings:
    """Everything needed to open a connection to the broker."""

    address: BrokerAddress
    username: str | None = None
    password: str | None = None
    # mqtts only: a CA bundle to trust instead of the system's, and a client
    # certificate and key for brokers that require mutual TLS.
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    connect_timeout_s: float = 5.0

    @classmethod
    def from_url(
        cls,
        url: str,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> BrokerSettings:
        address = parse_broker_url(url)
        if (cert_file or ca_file) and not address.tls:
            msg = f"--ca and --cert need a TLS broker URL: use mqtts://, not {url!r}"
            raise BrokerUrlError(msg)
        if bool(cert_file) != bool(key_file):
            msg = "give --cert and --key together (the client certificate and its key)"
            raise BrokerUrlError(msg)
        return cls(
            address=address,
            username=username or address.username,
            password=password or address.password,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
        )


def make_client(
    settings: BrokerSettings,
    *,
    identifier: str | None = None,
    will: aiomqtt.Will | None = None,
) -> aiomqtt.Client:
    """An aiomqtt client for `settings`, MQTT 3.1.1, with TCP_NODELAY."""
    tls_context = None
    if settings.address.tls:
        tls_context = ssl.create_default_context(cafile=settings.ca_file)
        if settings.cert_file:
            tls_context.load_cert_chain(settings.cert_file, settings.key_file)

    return aiomqtt.Client(
        settings.address.host,
        settings.address.port,
        username=settings.username,
        password=settings.password,
        identifier=identifier or f"aftershock-{uuid.uuid4().hex[:12]}",
        protocol=aiomqtt.ProtocolVersion.V311,
        clean_session=True,
        will=will,
        timeout=settings.connect_timeout_s,
        tls_context=tls_context,
        socket_options=[NODELAY],
    )


# ----------------------------------------------------------------- transport


@dataclass(frozen=True)
class Received:
    """One message as it came off the broker."""

    topic: str
    payload: bytes
    retain: bool = False


class ConnectionLost(ConnectionError):
    """The broker connection dropped while the coordinator was using it."""


class Transport(Protocol):
    """The three things the coordinator does with a broker connection."""

    async def subscribe(self, *topic_filters: str) -> None:
        """Subscribe at QoS 1; return once the broker has confirmed."""

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish; at QoS 1 return once the broker has acknowledged.

        Raises `ConnectionLost` when the connection is gone (so do subscribe
        and receive).
        """

    async def receive(self) -> Received:
        """The next message received on this connection.

        Cancelling a waiting `receive` (a timeout) loses no message. Raises
        `ConnectionLost` once the connection is gone.
        """
        ...


# Opens a connection for the length of an `async with` block.
Connector = Callable[[], AbstractAsyncContextManager[Transport]]


class MqttTransport:
    """`Transport` over a connected aiomqtt client.

    One task drains the client into a queue, because `asyncio.Queue.get` can
    be cancelled without losing an item and the client's iterator cannot
    promise that.
    """

    def __init__(self, client: aiomqtt.Client) -> None:
        self._client = client
        self._inbox: asyncio.Queue[Received | None] = asyncio.Queue()
        self._reader = asyncio.create_task(self._drain(), name="mqtt-reader")

    async def _drain(self) -> None:
        try:
            async for message in self._client.messages:
                payload = _payload_bytes(message.payload)
                self._inbox.put_nowait(
                    Received(str(message.topic), payload, message.retain)
                )
        except aiomqtt.MqttError:
            pass
        finally:
            self._inbox.put_nowait(None)

    async def subscribe(self, *topic_filters: str) -> None:
        if not topic_filters:
            return
        try:
            await self._client.subscribe([(t, 1) for t in topic_filters])
        except aiomqtt.MqttError as exc:
            msg = f"subscribing to {', '.join(topic_filters)} failed: {exc}"
            raise ConnectionLost(msg) from exc

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        try:
            await self._client.publish(topic, payload, qos=qos, retain=retain)
        except aiomqtt.MqttError as exc:
            msg = f"publishing on {topic} failed: {exc}"
            raise ConnectionLost(msg) from exc

    async def receive(self) -> Received:
        message = await self._inbox.get()
        if message is None:
            # Leave the marker for any later caller, then report the loss.
            self._inbox.put_nowait(None)
            msg = "the broker connection was lost"
            raise ConnectionLost(msg)
        return message

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


def _payload_bytes(payload: object) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    if payload is None:
        return b""
    return str(payload).encode()


def mqtt_connector(settings: BrokerSettings) -> Connector:
    """A `Connector` that opens a real broker connection from `settings`."""

    @asynccontextmanager
    async def connect() -> AsyncIterator[Transport]:
        client = make_client(settings)
        try:
            await client.__aenter__()
        except aiomqtt.MqttError as exc:
            msg = (
                f"cannot connect to the broker at {settings.address.url} ({exc}): "
                "start one with `aftershock broker` or point --broker "
                "(or AFTERSHOCK_BROKER) at a running one"
            )
            raise BrokerUnreachable(msg) from None
        transport = MqttTransport(client)
        try:
            yield transport
        finally:
            await transport.close()
            # A connection that is already gone has nothing left to close.
            with contextlib.suppress(aiomqtt.MqttError):
                await client.__aexit__(None, None, None)

    return connect
