"""The memory baseline of bench.agent: a bare aiomqtt client, connected and
subscribed to the broadcast command topic, doing nothing else. It imports
nothing of ours, so its RSS is the least any Python agent on this MQTT stack
holds.

    python -m bench.bare_client mqtt://HOST:PORT   # prints "ready", then idles
"""

from __future__ import annotations

import asyncio
import socket
import sys
from urllib.parse import urlsplit

import aiomqtt


async def idle(broker_url: str) -> None:
    address = urlsplit(broker_url)
    async with aiomqtt.Client(
        address.hostname or "127.0.0.1",
        address.port or 1883,
        protocol=aiomqtt.ProtocolVersion.V311,
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    ) as client:
        await client.subscribe("aftershock/v1/_all/_all/cmd", qos=1)
        print("ready", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(idle(sys.argv[1]))
