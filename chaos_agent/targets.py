"""Where a network fault lands: a network namespace and an interface in it.

A `NetworkTarget` from the wire names the namespace one of three ways (a name
under /run/netns, a `/proc/<pid>/ns/net` path, a pid) or not at all (the
agent's own), and the interface by name, by the route to a destination, or
not at all (the interface of the default route).

Resolution never creates anything: a namespace or interface that does not
exist is a `FaultRejected` that lists what does exist.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any, Final

from chaos_agent.faults.base import FaultRejected
from chaos_agent.netlink import NETNS_RUN_DIRS, NetnsMissing, link_names, rtnl
from chaos_agent.wire import NetworkTarget

# Paths a netns_path may take: a process's namespace or a named one. Anything
# else (a regular file, a device) is refused before it reaches setns().
_PROC_NETNS_RE: Final = re.compile(r"^/proc/([0-9]+)/ns/net$")


@dataclass(frozen=True)
class ResolvedTarget:
    """A namespace (None: the agent's own) and one interface in it."""

    netns_path: str | None
    interface: str
    ifindex: int

    @property
    def netns_label(self) -> str:
        return self.netns_path or "host"

    def as_record(self) -> dict[str, Any]:
        return {
            "netns_path": self.netns_path,
            "interface": self.interface,
            "ifindex": self.ifindex,
        }


def named_namespaces() -> list[str]:
    names: set[str] = set()
    for directory in NETNS_RUN_DIRS:
        if directory.is_dir():
            names.update(entry.name for entry in directory.iterdir())
    return sorted(names)


def resolve_netns_path(where: NetworkTarget) -> str | None:
    """The namespace file of `where`, None for the agent's own namespace.

    Raises FaultRejected when the namespace does not exist.
    """
    if where.netns is not None:
        path = Path("/run/netns") / where.netns
        if not path.exists():
            known = ", ".join(named_namespaces()) or "none"
            msg = (
                f"network namespace {where.netns!r} does not exist "
                f"(named namespaces here: {known}); aftershock never creates one"
            )
            raise FaultRejected(msg)
        return _same_as_own(str(path))

    if where.netns_pid is not None:
        return _process_netns(where.netns_pid)

    if where.netns_path is not None:
        return _checked_netns_path(where.netns_path)

    return None


def _process_netns(pid: int) -> str | None:
    path = f"/proc/{pid}/ns/net"
    if not Path(f"/proc/{pid}").exists():
        msg = f"no process with pid {pid}: its network namespace cannot be targeted"
        raise FaultRejected(msg)
    if not Path(path).exists():
        msg = f"{path} is not readable; the agent needs root and the host pid namespace"
        raise FaultRejected(msg)
    return _same_as_own(path)


def _checked_netns_path(raw: str) -> str | None:
    match = _PROC_NETNS_RE.fullmatch(raw)
    if match is not None:
        return _process_netns(int(match.group(1)))

    path = Path(raw)
    if path.parent not in NETNS_RUN_DIRS:
        msg = (
            f"netns_path {raw!r} is neither /proc/<pid>/ns/net nor a file in "
            f"/run/netns; give the namespace by pid or by name instead"
        )
        raise FaultRejected(msg)
    if not path.exists():
        known = ", ".join(named_namespaces()) or "none"
        msg = f"network namespace file {raw} does not exist (named namespaces: {known})"
        raise FaultRejected(msg)
    return _same_as_own(raw)


def _same_as_own(path: str) -> str | None:
    """None when `path` is the agent's own namespace, so no fork is needed."""
    try:
        theirs = os.stat(path)
        ours = os.stat("/proc/self/ns/net")
    except OSError:
        return path
    if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino):
        return None
    return path


async def resolve(where: NetworkTarget) -> ResolvedTarget:
    """Find the namespace and the interface `where` names, creating nothing."""
    netns_path = resolve_netns_path(where)
    try:
        async with rtnl(netns_path) as ipr:
            interfaces = await link_names(ipr)
            interface = await _pick_interface(ipr, where, interfaces, netns_path)
    except NetnsMissing as exc:
        raise FaultRejected(str(exc)) from None
    return ResolvedTarget(netns_path, interface, interfaces[interface])


async def _pick_interface(
    ipr: Any, where: NetworkTarget, interfaces: dict[str, int], netns_path: str | None
) -> str:
    where_label = netns_path or "the agent's namespace"
    known = ", ".join(sorted(interfaces))
    if where.interface is not None:
        if where.interface not in interfaces:
            msg = (
                f"interface {where.interface!r} does not exist in {where_label} "
                f"(interfaces there: {known})"
            )
            raise FaultRejected(msg)
        return where.interface

    by_index = {index: name for name, index in interfaces.items()}
    if where.route_to is not None:
        oif = await _route_oif(ipr, where.route_to)
        if oif is None or oif not in by_index:
            msg = (
                f"no route to {where.route_to} in {where_label}; name the "
                f"interface instead (interfaces there: {known})"
            )
            raise FaultRejected(msg)
        return by_index[oif]

    oif = await _default_route_oif(ipr)
    if oif is None or oif not in by_index:
        msg = (
            f"{where_label} has no default route to pick an interface from; "
            f"name one with interface= (interfaces there: {known})"
        )
        raise FaultRejected(msg)
    return by_index[oif]


async def _route_oif(ipr: Any, destination: str) -> int | None:
    try:
        address = ip_address(destination)
    except ValueError:
        msg = f"route_to {destination!r} is not an IP address"
        raise FaultRejected(msg) from None
    try:
        routes = await ipr.route("get", dst=str(address))
    except Exception:
        return None
    for route in routes:
        oif = route.get("RTA_OIF")
        if oif is not None:
            return int(oif)
    return None


async def _default_route_oif(ipr: Any) -> int | None:
    """Output interface of the preferred default route, IPv4 before IPv6."""
    for family in (2, 10):  # AF_INET, AF_INET6
        best: tuple[int, int] | None = None
        async for route in await ipr.route("dump", family=family):
            if route["dst_len"] != 0 or route.get("RTA_TABLE") != 254:
                continue
            oif = route.get("RTA_OIF")
            if oif is None:
                multipath = route.get("RTA_MULTIPATH") or []
                oif = multipath[0]["oif"] if multipath else None
            if oif is None:
                continue
            metric = int(route.get("RTA_PRIORITY") or 0)
            if best is None or metric < best[0]:
                best = (metric, int(oif))
        if best is not None:
            return best[1]
    return None
