"""Netlink plumbing shared by the network faults: namespaces and qdiscs.

Every qdisc the agent installs is a root `htb` qdisc whose major handle starts
with 0xa5 (`a5xx:`), the low byte taken from the fault id. Class 1 carries the
fault (netem or tbf) and takes every packet by default; class 2 is left
untouched, and u32 filters steer exempt destinations (the broker,
`fault.exempt`) to it. Both classes may send at 100 Gbit/s, so htb itself
shapes nothing. Deleting the root qdisc deletes all of it and gives the
interface back its kernel default.

Why htb and not the simpler `prio`: htb is in every kernel that has tbf,
including ones built without sch_prio (like the development machines).

Revert is idempotent by errno: a namespace, an interface or a qdisc that is
already gone counts as reverted.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import socket
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Any, Final

from pyroute2 import AsyncIPRoute
from pyroute2 import config as pyroute2_config
from pyroute2.netlink.exceptions import NetlinkError

# pyroute2 opens a socket in another namespace from a forked child and ends
# that child with SIGTERM. The child inherits the agent's asyncio signal
# wake-up fd, so without this its SIGTERM reaches the agent's loop as if the
# agent itself had been told to stop (seen: an agent shutting down while it
# applied a fault). With it, the child takes SIGTERM with the default action.
pyroute2_config.disable_mp_signal = True

Network = IPv4Network | IPv6Network

# Every qdisc handle the agent installs has this major prefix: a5xx:0.
OWNED_MAJOR_PREFIX: Final = 0xA5
TC_H_ROOT: Final = 0xFFFFFFFF
ETH_P_IP: Final = 0x0800
ETH_P_IPV6: Final = 0x86DD
# The rate of the htb classes: high enough that htb never holds a packet back.
UNSHAPED_BYTES_PER_S: Final = 100_000_000_000 // 8

# What the kernel answers when the thing to delete is not there: no such
# namespace entry, no such device, or (for a qdisc dump/delete on a device
# that has only its default qdisc) an invalid argument.
GONE_ERRNOS: Final = frozenset({errno.ENOENT, errno.ENODEV, errno.EINVAL})

NETNS_RUN_DIRS: Final = (Path("/run/netns"), Path("/var/run/netns"))


class NetnsMissing(LookupError):
    """A namespace path that does not exist (never created on demand)."""


@dataclass(frozen=True)
class RootQdisc:
    """The root qdisc of an interface as the kernel reports it."""

    kind: str
    handle: int

    @property
    def is_kernel_default(self) -> bool:
        # The qdiscs the kernel attaches itself (noqueue, pfifo_fast, mq,
        # fq_codel...) carry handle 0:, every added one a non-zero handle.
        return self.handle == 0

    @property
    def is_owned(self) -> bool:
        return is_owned_handle(self.handle)

    def describe(self) -> str:
        return f"{self.kind} {format_handle(self.handle)}"


def owned_handle(fault_id: str) -> int:
    """The root qdisc handle for `fault_id`: a5xx:0, xx from the id's hash.

    The low byte tells two faults' qdiscs apart, so a stale revert of one
    fault does not delete another fault's qdisc (1 in 256 chance remains).
    """
    low = hashlib.sha256(fault_id.encode()).digest()[0]
    return ((OWNED_MAJOR_PREFIX << 8) | low) << 16


def is_owned_handle(handle: int) -> bool:
    return (handle >> 24) == OWNED_MAJOR_PREFIX


def format_handle(handle: int) -> str:
    return f"{handle >> 16:x}:{handle & 0xFFFF:x}"


def is_gone(exc: BaseException) -> bool:
    """Whether `exc` means "the thing is not there" (revert counts it done)."""
    if isinstance(exc, NetlinkError):
        return exc.code in GONE_ERRNOS
    if isinstance(exc, OSError):
        return exc.errno in GONE_ERRNOS
    return False


# ----------------------------------------------------------------- namespaces


def netns_exists(path: str | None) -> bool:
    return path is None or Path(path).exists()


@asynccontextmanager
async def rtnl(netns_path: str | None = None) -> AsyncIterator[Any]:
    """An AsyncIPRoute in the namespace at `netns_path` (None: the agent's).

    Never creates a namespace: the path must exist, and pyroute2 is told not
    to create one (flags=0) in case it disappears between check and open.
    """
    if not netns_exists(netns_path):
        msg = f"network namespace {netns_path} does not exist"
        raise NetnsMissing(msg)
    if netns_path is None:
        ipr = AsyncIPRoute()
    else:
        ipr = AsyncIPRoute(netns=netns_path, flags=0)
    async with ipr:
        yield ipr


async def link_names(ipr: Any) -> dict[str, int]:
    """Interface name -> index, for every interface in the namespace."""
    return {
        str(link.get("ifname")): int(link["index"])
        async for link in await ipr.link("dump")
    }


# --------------------------------------------------------------------- qdiscs


async def root_qdisc(ipr: Any, ifindex: int) -> RootQdisc | None:
    async for qdisc in await ipr.tc("dump", index=ifindex):
        if qdisc["index"] == ifindex and qdisc["parent"] == TC_H_ROOT:
            return RootQdisc(
                kind=str(qdisc.get("TCA_KIND")), handle=int(qdisc["handle"])
            )
    return None


async def child_qdisc(ipr: Any, ifindex: int, parent: int) -> Any | None:
    """The qdisc attached to class `parent`, as a raw tcmsg, or None."""
    async for qdisc in await ipr.tc("dump", index=ifindex):
        if qdisc["index"] == ifindex and qdisc["parent"] == parent:
            return qdisc
    return None


def fault_band(handle: int) -> int:
    """The htb class that carries the fault (`a5xx:1`)."""
    return handle | 1


def exempt_band(handle: int) -> int:
    return handle | 2


async def install_shaper(
    ipr: Any,
    ifindex: int,
    handle: int,
    kind: str,
    params: dict[str, Any],
    exempt: Iterable[Network],
) -> None:
    """Install root htb `handle`, `kind` under class 1, exempt filters to 2.

    `add` (not `replace`) makes the kernel refuse with EEXIST when someone
    installed a root qdisc between our check and this call.
    """
    await ipr.tc("add", "htb", index=ifindex, handle=handle, default=1)
    for band in (fault_band(handle), exempt_band(handle)):
        await ipr.tc(
            "add-class",
            "htb",
            index=ifindex,
            handle=band,
            parent=handle,
            rate=UNSHAPED_BYTES_PER_S,
        )
    await ipr.tc(
        "add", kind, index=ifindex, handle=0, parent=fault_band(handle), **params
    )
    for number, network in enumerate(exempt, start=1):
        await ipr.tc(
            "add-filter",
            "u32",
            index=ifindex,
            parent=handle,
            prio=number,
            protocol=ETH_P_IP if network.version == 4 else ETH_P_IPV6,
            target=exempt_band(handle),
            keys=u32_destination_keys(network),
        )


def u32_destination_keys(network: Network) -> list[str]:
    """u32 match keys (`value/mask+offset`) for a destination network.

    The offsets are those of the destination address in the IP header: 16 for
    IPv4, 24..36 in four 32-bit words for IPv6.
    """
    address = network.network_address.packed
    mask = network.netmask.packed
    first_offset = 16 if network.version == 4 else 24
    keys = []
    for word in range(len(address) // 4):
        value = int.from_bytes(address[word * 4 : word * 4 + 4], "big")
        word_mask = int.from_bytes(mask[word * 4 : word * 4 + 4], "big")
        if word_mask:
            keys.append(f"0x{value:08x}/0x{word_mask:08x}+{first_offset + word * 4}")
    # A /0 network matches everything: one key with an empty mask says so.
    return keys or [f"0x0/0x0+{first_offset}"]


async def remove_owned_root(ipr: Any, ifindex: int, handle: int) -> str:
    """Delete our root qdisc `handle` on `ifindex`; say what happened.

    Returns "removed", "absent" (nothing of ours there) or "foreign" (another
    qdisc is root now: it is left alone).
    """
    try:
        root = await root_qdisc(ipr, ifindex)
    except NetlinkError as exc:
        if is_gone(exc):
            return "absent"
        raise
    if root is None or root.is_kernel_default:
        return "absent"
    if root.handle != handle:
        return "foreign"
    try:
        await ipr.tc("del", root.kind, index=ifindex, handle=handle, parent=TC_H_ROOT)
    except NetlinkError as exc:
        if is_gone(exc):
            return "absent"
        raise
    return "removed"


async def sweep_owned_qdiscs(netns_path: str | None = None) -> list[str]:
    """Delete every root qdisc the agent owns (a5xx:) in a namespace.

    For reconcile at start after a journal was lost: touches nothing else.
    Returns the interfaces it cleaned.
    """
    cleaned = []
    async with rtnl(netns_path) as ipr:
        names = {index: name for name, index in (await link_names(ipr)).items()}
        for index, name in names.items():
            root = await root_qdisc(ipr, index)
            if root is not None and root.is_owned:
                outcome = await remove_owned_root(ipr, index, root.handle)
                if outcome == "removed":
                    cleaned.append(name)
    return cleaned


# -------------------------------------------------------------- capabilities


async def kernel_has_qdisc(kind: str) -> tuple[bool, str]:
    """Whether this kernel can attach a qdisc of `kind`, and how we know.

    Cheap facts first (a loaded or built-in module); otherwise a probe in a
    throwaway, anonymous namespace (`unshare --net`) that vanishes with the
    probe process, so nothing on the node changes.
    """
    known = await asyncio.to_thread(_module_present, f"sch_{kind}")
    if known is not None:
        return True, known
    return await _probe_qdisc(kind)


def _module_present(module: str) -> str | None:
    """How we know `module` is loaded or can be, or None when we do not."""
    if Path(f"/sys/module/{module}").exists():
        return f"{module} is loaded"
    modules_dir = Path("/lib/modules") / os.uname().release
    for listing in ("modules.builtin", "modules.dep"):
        path = modules_dir / listing
        if path.exists() and f"/{module}.ko" in path.read_text(errors="replace"):
            return f"{module} is listed in {path}"
    return None


async def _probe_qdisc(kind: str) -> tuple[bool, str]:
    params = {
        "netem": ["delay", "1ms"],
        "tbf": ["rate", "1mbit", "burst", "32k", "latency", "50ms"],
    }
    command = [
        "unshare",
        "--net",
        "--",
        "tc",
        "qdisc",
        "add",
        "dev",
        "lo",
        "root",
        kind,
        *params.get(kind, []),
    ]
    try:
        process = await asyncio.create_subprocess_exec(
            *command,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError:
        return (
            False,
            "cannot probe: unshare or tc is missing (install util-linux, iproute2)",
        )
    _, stderr = await process.communicate()
    if process.returncode == 0:
        return True, f"a probe attached {kind} in a throwaway namespace"
    reason = stderr.decode(errors="replace").strip() or f"exit {process.returncode}"
    return False, f"the kernel refused a {kind} qdisc: {reason}"


# ------------------------------------------------------------------ addresses


def resolve_host(host: str) -> list[Network]:
    """Every address `host` (a name or a literal) resolves to, as /32 or /128.

    Blocking (getaddrinfo): call it from a thread in async code.
    """
    try:
        return [ip_network(ip_address(host))]
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    addresses = {
        ip_network(ip_address(str(info[4][0]).split("%")[0])) for info in infos
    }
    return sorted(addresses, key=lambda n: (n.version, n))
