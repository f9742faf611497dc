"""What the qdisc faults (latency through netem, bandwidth through tbf) share.

prepare: resolve the target, refuse an interface that already carries a root
qdisc someone installed (ours or an operator's), list the exempt networks.
apply: install root prio `a5xx:` + the shaping qdisc on band 1 + exempt
filters, undoing all of it if any step fails. revert: delete `a5xx:` if it is
still ours; a namespace, interface or qdisc already gone is success.
"""

from __future__ import annotations

import asyncio
import errno
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from chaos_agent.faults.base import FaultContext, FaultFailed, FaultRejected, Record
from chaos_agent.netlink import (
    NetnsMissing,
    Network,
    child_qdisc,
    fault_band,
    format_handle,
    install_shaper,
    link_names,
    owned_handle,
    remove_owned_root,
    resolve_host,
    root_qdisc,
    rtnl,
)
from chaos_agent.targets import ResolvedTarget, resolve
from chaos_agent.wire import NetworkTarget, parse_network


async def exempt_networks(
    context: FaultContext, exempt: list[Network], exempt_broker: bool
) -> list[Network]:
    """The fault's exempt networks plus, unless turned off, the broker's
    addresses (safety invariant 7: a fault never cuts the agent's channel)."""
    networks = list(exempt)
    if exempt_broker and context.broker_host:
        try:
            broker = await asyncio.to_thread(resolve_host, context.broker_host)
        except OSError as exc:
            msg = (
                f"cannot resolve the broker host {context.broker_host!r} to exempt "
                f"it from the fault ({exc}); fix the name or set exempt_broker=false"
            )
            raise FaultRejected(msg) from None
        networks.extend(n for n in broker if n not in networks)
    return networks


async def prepare_shaping(
    context: FaultContext,
    fault_id: str,
    kind: str,
    where: NetworkTarget,
    exempt: list[Network],
) -> Record:
    """Resolve the target and check its root qdisc can be taken over."""
    target = await resolve(where)
    context.policy.check_interface(target.interface)
    await _check_root_free(target)
    handle = owned_handle(fault_id)
    return {
        "engine": kind,
        "fault_id": fault_id,
        **target.as_record(),
        "handle": handle,
        "exempt": [str(n) for n in exempt],
    }


async def _check_root_free(target: ResolvedTarget) -> None:
    async with rtnl(target.netns_path) as ipr:
        root = await root_qdisc(ipr, target.ifindex)
    if root is None or root.is_kernel_default:
        return
    where = f"{target.interface} in {target.netns_label}"
    if root.is_owned:
        msg = (
            f"{where} already carries an aftershock fault (root qdisc "
            f"{root.describe()}); revert it first, faults on one interface "
            f"do not stack"
        )
    else:
        msg = (
            f"{where} has a root qdisc installed by someone else "
            f"({root.describe()}); aftershock replaces only the kernel's default "
            f"qdisc, so restoring it later is exact"
        )
    raise FaultRejected(msg)


async def apply_shaping(
    record: Record, kind: str, params: dict[str, Any], missing_hint: str
) -> Any:
    """Install the qdiscs of `record` and return the shaping qdisc read back.

    On any error everything installed so far is removed before FaultFailed;
    `missing_hint` explains an ENOENT (the kernel lacks the qdisc kind).
    """
    handle = int(record["handle"])
    exempt = [parse_network(n) for n in record["exempt"]]
    try:
        async with rtnl(record["netns_path"]) as ipr:
            ifindex = await _current_ifindex(ipr, record)
            try:
                await install_shaper(ipr, ifindex, handle, kind, params, exempt)
                return await _read_back(ipr, ifindex, handle, kind)
            except NetlinkError as exc:
                await remove_owned_root(ipr, ifindex, handle)
                if exc.code == errno.ENOENT:
                    raise FaultFailed(missing_hint) from None
                msg = (
                    f"the kernel refused the {kind} qdisc on {record['interface']}: "
                    f"{exc}; nothing was left installed"
                )
                raise FaultFailed(msg) from None
    except NetnsMissing as exc:
        raise FaultFailed(str(exc)) from None


async def _current_ifindex(ipr: Any, record: Record) -> int:
    interfaces = await link_names(ipr)
    name = str(record["interface"])
    if name not in interfaces:
        msg = f"interface {name} disappeared before the fault could be applied"
        raise FaultFailed(msg)
    return interfaces[name]


async def _read_back(ipr: Any, ifindex: int, handle: int, kind: str) -> Any:
    qdisc = await child_qdisc(ipr, ifindex, fault_band(handle))
    if qdisc is None or qdisc.get("TCA_KIND") != kind:
        band = format_handle(fault_band(handle))
        msg = f"the {kind} qdisc is not on class {band} after apply"
        raise FaultFailed(msg)
    return qdisc


async def revert_shaping(record: Record) -> dict[str, Any]:
    """Remove the fault's root qdisc; what is already gone counts as done."""
    handle = int(record["handle"])
    base = {"interface": record["interface"], "qdisc": format_handle(handle)}
    try:
        async with rtnl(record["netns_path"]) as ipr:
            interfaces = await link_names(ipr)
            ifindex = interfaces.get(str(record["interface"]))
            if ifindex is None:
                return {**base, "outcome": "interface gone"}
            outcome = await remove_owned_root(ipr, ifindex, handle)
    except NetnsMissing:
        return {**base, "outcome": "namespace gone"}
    return {**base, "outcome": outcome}
