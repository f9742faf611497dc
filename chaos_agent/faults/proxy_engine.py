"""Latency without netem: nftables redirects TCP connections to a delay proxy.

`LatencyDriver` delegates here when a fault asks for `engine: proxy`, or for
`auto` on a kernel without sch_netem. The engine has the shape of a
`FaultDriver`:

- check: only delay and jitter, only TCP ports, namespace exists, policy caps;
- prepare: the nft table name and the namespace (with its inode), nothing else
  is needed to revert;
- apply: start a `DelayProxy` listening inside the target namespace, then one
  nft table of our own in that namespace that redirects new connections
  (ingress: arriving for a local port, prerouting; egress: locally opened
  towards a port, output) to it, read the rules back;
- revert: remove the redirects (new connections go direct again), stop
  accepting, let connections already proxied run on without delay until they
  close, then delete the table.

The proxy runs inside the agent process. If the agent dies (SIGKILL), the
rules outlive it and redirect new connections to a port nobody listens on, so
they are refused until reconcile at the next start reverts the journal record:
that needs only the table name and the namespace, both in the record.

Never redirected: the proxy's own outbound connections (fwmark), the agent's
broker and the fault's exempt networks, and anything that is not TCP over
IPv4 (UDP and IPv6 are not shaped at all).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final

import structlog

from chaos_agent import nft
from chaos_agent.delay_proxy import (
    PROXY_MARK,
    DelayProxy,
    NetnsSockets,
    ProxyError,
    ProxySettings,
    bind_listener,
)
from chaos_agent.faults.base import (
    Availability,
    FaultContext,
    FaultFailed,
    FaultRejected,
    Record,
)
from chaos_agent.netlink import resolve_host
from chaos_agent.nft import NftError
from chaos_agent.policy import PolicyViolation
from chaos_agent.targets import resolve_netns_path
from chaos_agent.wire import LatencyFault

ENGINE: Final = "proxy"
SHAPES: Final = "per stream, new connections after apply"
TABLE_PREFIX: Final = "aftershock_px_"
_TABLE_RE: Final = re.compile(r"^aftershock_px_[0-9a-f]{16}$")

# nft's numeric hook priorities (nft(8), "standard priority names"): dstnat
# for redirects, filter for the guard on the listen port.
_PRIORITY_DSTNAT: Final = -100
_PRIORITY_FILTER: Final = 0

log = structlog.get_logger("chaos_agent.faults.proxy_engine")

# How long connections proxied before revert may go on after it. Until they
# close, the fault's table stays without its redirects (see `_drain_ruleset`);
# then they are cut and the table goes.
DRAIN_GRACE_S: Final = 600.0

# Proxies started by this process, by table name, so that revert can find the
# listener whichever engine instance applied it.
_RUNNING: dict[str, DelayProxy] = {}
# Reverted faults whose proxied connections are still open, by table name.
_DRAINING: dict[str, asyncio.Task[None]] = {}


def table_name(fault_id: str) -> str:
    """The nft table owned by one fault: `aftershock_px_` + 16 hex digits."""
    try:
        digest = uuid.UUID(fault_id).hex
    except ValueError:
        digest = hashlib.sha256(fault_id.encode()).hexdigest()
    return TABLE_PREFIX + digest[:16]


# ------------------------------------------------------------------- ruleset


@dataclass(frozen=True)
class Exemptions:
    """Traffic the redirect rules must leave alone."""

    networks: tuple[ipaddress.IPv4Network, ...] = ()
    # The agent's broker: its IPv4 addresses and port. No address (the name
    # did not resolve) exempts the whole port, to stay on the safe side.
    broker_addresses: tuple[ipaddress.IPv4Address, ...] = ()
    broker_port: int | None = None


def build_ruleset(
    table: str,
    *,
    listen_port: int,
    ports: list[int],
    direction: str,
    exemptions: Exemptions,
    interface: str | None = None,
    mark: int = PROXY_MARK,
) -> str:
    """The nft script that creates `table` afresh with the redirect rules.

    Built only from validated values (a checked table name, ints, ipaddress
    objects, an interface name the wire model restricts), never from raw
    strings, and fed to `nft -f -`.
    """
    if not _TABLE_RE.fullmatch(table):
        msg = f"{table!r} is not an aftershock proxy table name"
        raise ValueError(msg)
    if not ports or direction not in ("ingress", "egress", "both"):
        msg = f"need ports and a direction, got ports={ports} direction={direction!r}"
        raise ValueError(msg)

    port_set = ", ".join(str(int(p)) for p in sorted(set(ports)))
    skip = [f"meta mark {int(mark):#x} return"]
    for net in exemptions.networks:
        skip += [f"ip daddr {net} return", f"ip saddr {net} return"]
    if exemptions.broker_port is not None:
        port = int(exemptions.broker_port)
        skip += [
            f"ip daddr {address} tcp dport {port} return"
            for address in exemptions.broker_addresses
        ] or [f"tcp dport {port} return"]

    redirect = f"tcp dport {{ {port_set} }} redirect to :{listen_port}"
    chains = []
    if direction in ("ingress", "both"):
        where = f'iifname "{interface}" ' if interface else ""
        hook = f"type nat hook prerouting priority {_PRIORITY_DSTNAT}; policy accept;"
        chains.append(_chain("ingress", hook, [*skip, where + redirect]))
    if direction in ("egress", "both"):
        where = f'oifname "{interface}" ' if interface else ""
        hook = f"type nat hook output priority {_PRIORITY_DSTNAT}; policy accept;"
        chains.append(_chain("egress", hook, [*skip, where + redirect]))
    # The listener is bound to every address; only redirected connections may
    # reach it, or anyone could use it as a relay into the namespace.
    chains.append(
        _chain(
            "guard",
            f"type filter hook input priority {_PRIORITY_FILTER}; policy accept;",
            [
                f"tcp dport {listen_port} ct status dnat accept",
                f"tcp dport {listen_port} reject with tcp reset",
            ],
        )
    )

    # add + delete first: a table left by a half-done apply is replaced, not
    # merged, all in one transaction.
    head = f"add table ip {table}\ndelete table ip {table}\n"
    return head + f"table ip {table} {{\n" + "".join(chains) + "}\n"


def _chain(name: str, hook: str, rules: list[str]) -> str:
    body = "".join(f"\t\t{rule}\n" for rule in rules)
    return f"\tchain {name} {{\n\t\t{hook}\n{body}\t}}\n"


async def run_nft(netns: Path | None, script: str, *, check_only: bool = False) -> str:
    """Feed `script` to `nft -f -` inside `netns`; return nft's output."""
    args = ["-c", "-f", "-"] if check_only else ["-f", "-"]
    return await nft.run(netns, args, script)


async def list_rules(netns: Path | None, table: str) -> list[str]:
    """The rules of `table` as nft prints them, or [] when it does not exist."""
    try:
        text = await run_nft(netns, f"list table ip {table}\n")
    except NftError as exc:
        if _is_missing(exc):
            return []
        raise
    return [
        line.strip()
        for line in text.splitlines()
        if line.strip()
        and not line.strip().startswith(("table ", "chain ", "type ", "}"))
    ]


def _is_missing(exc: NftError) -> bool:
    return "No such file or directory" in str(exc)


# -------------------------------------------------------------------- engine


class ProxyEngine:
    """Latency for TCP streams through a userspace proxy behind nftables.

    Same shape as a `FaultDriver[LatencyFault]`; `LatencyDriver` delegates to
    it. Records carry `"engine": "proxy"`.
    """

    type: ClassVar[str] = "latency"

    def __init__(self, context: FaultContext) -> None:
        self.context = context
        self._log = context.log.bind(fault="latency", engine=ENGINE)

    async def available(self) -> Availability:
        """Whether nft can install a nat redirect here (checked, not applied)."""
        missing = [tool for tool in ("nft", "nsenter") if shutil.which(tool) is None]
        if missing:
            return Availability(
                ok=False,
                reason=f"{' and '.join(missing)} not found: install the nftables "
                "and util-linux packages",
            )

        probe = build_ruleset(
            table_name("00000000-0000-0000-0000-000000000000"),
            listen_port=9,
            ports=[9],
            direction="both",
            exemptions=Exemptions(),
        )
        try:
            await run_nft(None, probe, check_only=True)
        except NftError as exc:
            return Availability(
                ok=False,
                reason=f"nftables cannot redirect here ({exc}); the proxy engine "
                "needs nf_nat and CAP_NET_ADMIN",
            )
        return Availability(
            ok=True,
            facts={
                "engine": ENGINE,
                "nat_redirect": True,
                "shapes": SHAPES,
                "protocols": ["tcp"],
                "address_families": ["ipv4"],
            },
        )

    def check(self, fault: LatencyFault) -> None:
        """Refuse what a TCP stream delay cannot do, or policy forbids."""
        unsupported = [
            name
            for name in (
                "loss_pct",
                "duplicate_pct",
                "corrupt_pct",
                "reorder_pct",
                "correlation_pct",
            )
            if getattr(fault, name)
        ]
        if fault.rate_kbit is not None:
            unsupported.append("rate_kbit")
        if unsupported:
            msg = (
                f"the proxy engine delays TCP streams and cannot apply "
                f"{', '.join(unsupported)}; drop them, or use engine 'netem' on a "
                "kernel with sch_netem (or a bandwidth fault for a rate)"
            )
            raise FaultRejected(msg)
        if not fault.ports:
            msg = (
                "the proxy engine delays TCP connections to given ports: set ports "
                "(UDP is not supported)"
            )
            raise FaultRejected(msg)

        policy = self.context.policy
        if fault.delay_ms + fault.jitter_ms > policy.max_delay_ms:
            msg = (
                f"delay {fault.delay_ms:g} ms + jitter {fault.jitter_ms:g} ms exceeds "
                f"this agent's max_delay_ms ({policy.max_delay_ms:g} ms)"
            )
            raise PolicyViolation(msg)
        if fault.where.interface:
            policy.check_interface(fault.where.interface)
        elif policy.allowed_interfaces:
            # Without an interface the redirects match on every interface,
            # including those the policy keeps out of reach.
            allowed = ", ".join(policy.allowed_interfaces)
            msg = (
                "this agent's policy limits faults to some interfaces "
                f"({allowed}); name one with interface="
            )
            raise PolicyViolation(msg)

        # Raises FaultRejected, listing what exists, for a missing namespace.
        resolve_netns_path(fault.where)

    async def prepare(self, fault_id: str, fault: LatencyFault) -> Record:
        resolved = resolve_netns_path(fault.where)
        netns = None if resolved is None else Path(resolved)
        inode = None
        if netns is not None:
            info = netns.stat()
            inode = [info.st_dev, info.st_ino]
        return {
            "engine": ENGINE,
            "table": table_name(fault_id),
            "netns": None if netns is None else str(netns),
            # A pid's namespace path can name another namespace after the pid
            # is reused; revert compares the inode before touching anything.
            "netns_inode": inode,
        }

    async def apply(
        self, fault_id: str, fault: LatencyFault, record: Record
    ) -> dict[str, Any]:
        table = _checked_table(record)
        netns = _record_netns(record)
        log = self._log.bind(fault_id=fault_id, table=table)

        if table in _RUNNING:
            msg = (
                f"fault {fault_id} is already applied (table {table}); revert it first"
            )
            raise FaultFailed(msg)
        try:
            proxy = await self._start_proxy(netns, fault)
            _RUNNING[table] = proxy
            listen_port = proxy.listen_address[1]
            record["listen_port"] = listen_port

            exemptions = await self._exemptions(fault)
            script = build_ruleset(
                table,
                listen_port=listen_port,
                ports=list(fault.ports),
                direction=fault.direction,
                exemptions=exemptions,
                interface=fault.where.interface,
            )
            await run_nft(netns, script)
            rules = await list_rules(netns, table)
        except (OSError, ProxyError, NftError) as exc:
            await self.revert(record)
            msg = f"could not apply the proxy latency engine: {exc}"
            raise FaultFailed(msg) from exc

        redirects = [rule for rule in rules if " redirect to " in rule]
        expected = 2 if fault.direction == "both" else 1
        if len(redirects) != expected:
            await self.revert(record)
            msg = (
                f"read back {len(redirects)} redirect rules in table {table}, "
                f"expected {expected}; reverted"
            )
            raise FaultFailed(msg)

        log.info(
            "fault_applied",
            listen_port=listen_port,
            ports=list(fault.ports),
            direction=fault.direction,
            delay_ms=fault.delay_ms,
            jitter_ms=fault.jitter_ms,
        )
        return {
            "engine": ENGINE,
            "shapes": SHAPES,
            "delayed": "bytes sent towards the delayed port",
            "netns": record["netns"] or "agent",
            "table": table,
            "listen_port": listen_port,
            "ports": sorted(set(fault.ports)),
            "direction": fault.direction,
            "delay_ms": fault.delay_ms,
            "jitter_ms": fault.jitter_ms,
            "interface": fault.where.interface or "all",
            "exempt_broker": exemptions.broker_port is not None,
            "rules": rules,
        }

    async def revert(self, record: Record) -> dict[str, Any]:
        """Remove the redirect rules and stop accepting.

        Connections proxied before revert stay open and relay without delay
        until either end closes them (at most DRAIN_GRACE_S); meanwhile the
        table stays without its redirects, because established redirected
        connections need the nat hooks and conntrack that it keeps in use
        (see `_drain_ruleset`). From a fresh process there is no proxy and no
        open connection: the table is simply deleted.
        """
        table = _checked_table(record)
        netns = _record_netns(record)
        log = self._log.bind(table=table)

        if table in _draining_here():
            return {"engine": ENGINE, "table": table, "already_gone": True}

        gone_why = _namespace_gone(netns, record.get("netns_inode"))
        proxy = _RUNNING.get(table)
        still_open = proxy.stats.active if proxy is not None else 0
        table_removed = False
        try:
            if gone_why is None and still_open:
                await _run_unless_missing(netns, _drain_ruleset(table))
            elif gone_why is None:
                table_removed = await _delete_table(netns, table)
        except NftError as exc:
            # The proxy keeps serving, so redirected traffic still flows
            # (delayed) while the operator fixes nft; revert can be retried.
            log.error("fault_revert_failed", error=str(exc))
            msg = f"could not remove the rules of nft table {table}: {exc}"
            raise FaultFailed(msg) from exc

        # The rules are gone, so new connections go direct and closing the
        # listener refuses nobody.
        if proxy is not None:
            del _RUNNING[table]
            proxy.close()
            if still_open and gone_why is None:
                _DRAINING[table] = asyncio.create_task(
                    _drain(proxy, netns, table), name=f"drain:{table}"
                )

        log.info(
            "fault_reverted",
            table_removed=table_removed,
            namespace_gone=gone_why,
            listener_closed=proxy is not None,
            connections_left_open=still_open,
        )
        return {
            "engine": ENGINE,
            "table": table,
            "rules_removed": True,
            "table_removed": table_removed,
            "already_gone": not table_removed and not still_open,
            "namespace_gone": gone_why,
            "listener_closed": proxy is not None,
            "connections_left_open": still_open,
        }

    # ----------------------------------------------------------------- helpers

    async def _start_proxy(self, netns: Path | None, fault: LatencyFault) -> DelayProxy:
        sockets = NetnsSockets(netns)
        try:
            listener = await bind_listener(sockets, set(fault.ports))
            proxy = DelayProxy(
                listener,
                ProxySettings(delay_ms=fault.delay_ms, jitter_ms=fault.jitter_ms),
                sockets,
            )
            await proxy.start()
        except BaseException:
            sockets.close()
            raise
        return proxy

    async def _exemptions(self, fault: LatencyFault) -> Exemptions:
        # IPv6 networks need no rule: the table only redirects IPv4.
        networks = tuple(
            net for net in fault.exempt if isinstance(net, ipaddress.IPv4Network)
        )
        host, port = self.context.broker_host, self.context.broker_port
        if not fault.exempt_broker or port is None or port not in fault.ports:
            # The broker connection is only at risk when its port is delayed.
            return Exemptions(networks=networks)
        return Exemptions(
            networks=networks,
            broker_addresses=await self._broker_addresses(host),
            broker_port=port,
        )

    async def _broker_addresses(
        self, host: str | None
    ) -> tuple[ipaddress.IPv4Address, ...]:
        if not host:
            return ()
        try:
            networks = await asyncio.to_thread(resolve_host, host)
        except OSError as exc:
            self._log.warning(
                "broker_unresolved", host=host, error=str(exc), exempt="whole port"
            )
            return ()
        return tuple(
            net.network_address
            for net in networks
            if isinstance(net, ipaddress.IPv4Network)
        )


async def sweep_tables(netns: Path | None = None) -> list[str]:
    """Delete every proxy table in a namespace; return their names.

    For reconcile beyond the journal: a table is left behind only if the
    agent died after revert, while connections it had proxied were still
    draining (see `shutdown`). Such a table redirects nothing.
    """
    text = await run_nft(netns, "list tables ip\n")
    names = [
        line.split()[-1]
        for line in text.splitlines()
        if line.startswith("table ip ") and _TABLE_RE.fullmatch(line.split()[-1])
    ]
    swept = [name for name in names if await _delete_table(netns, name)]
    if swept:
        log.warning("proxy_tables_swept", netns=str(netns or "agent"), tables=swept)
    return swept


async def shutdown() -> None:
    """Cut connections still open after revert and delete their tables.

    For the agent's exit path, after it has reverted every fault. An agent
    that exits without calling it (or is killed) while reverted connections
    still drain leaves their tables behind: no redirect in them, only one
    accept rule, until `sweep_tables` or an operator removes them.
    """
    tasks = list(_draining_here().values())
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _draining_here() -> dict[str, asyncio.Task[None]]:
    """The drain tasks of the running event loop; forget any other loop's.

    The agent runs one loop for its whole life, but a process that runs
    several in turn (the tests do, one per test) can be left with the task
    of a loop that closed before the task finished. Such a task never runs
    again, and awaiting it from another loop raises: it is dropped, and its
    table is left to `sweep_tables`.
    """
    loop = asyncio.get_running_loop()
    for table, task in list(_DRAINING.items()):
        if task.get_loop() is not loop:
            log.warning("proxy_drain_orphaned", table=table, done=task.done())
            del _DRAINING[table]
    return _DRAINING


async def _drain(proxy: DelayProxy, netns: Path | None, table: str) -> None:
    try:
        async with asyncio.timeout(DRAIN_GRACE_S):
            await proxy.drained()
    except TimeoutError:
        log.warning("proxy_drain_timeout", table=table, cut=proxy.stats.active)
    finally:
        try:
            await proxy.abort()
            await _delete_table(netns, table)
        except NftError as exc:
            log.error("proxy_table_left_behind", table=table, error=str(exc))
        finally:
            # Even when the clean-up itself is cancelled (a second cancel,
            # or the loop shutting down): a stale entry would make a later
            # revert of this table answer "already gone" without acting.
            _DRAINING.pop(table, None)


def _drain_ruleset(table: str) -> str:
    """`table` without its redirects, but with what open connections need.

    Redirected connections are translated packet by packet by the kernel's
    nat hooks, from bindings kept in conntrack. Both are registered only
    while something uses them: a nat base chain for the nat hooks, a rule
    with a conntrack expression for conntrack. In a namespace where nothing
    else uses them (measured here: flushing every rule of the table resets
    open connections), removing them would reset every proxied connection.
    So the chains stay, emptied, and one rule that changes nothing (the
    input policy accepts anyway) keeps conntrack in use.
    """
    return (
        f"flush table ip {table}\n"
        f"add rule ip {table} guard ct state established,related accept\n"
    )


async def _delete_table(netns: Path | None, table: str) -> bool:
    """Delete `table`; False when it was already gone."""
    return await _run_unless_missing(netns, f"delete table ip {table}\n")


async def _run_unless_missing(netns: Path | None, script: str) -> bool:
    """Run `script`; False when the table it names was already gone."""
    try:
        await run_nft(netns, script)
    except NftError as exc:
        if _is_missing(exc):
            return False
        raise
    return True


def _checked_table(record: Record) -> str:
    table = record.get("table")
    if not isinstance(table, str) or not _TABLE_RE.fullmatch(table):
        msg = f"record names no aftershock proxy table ({table!r}); nft left untouched"
        raise FaultFailed(msg)
    return table


def _record_netns(record: Record) -> Path | None:
    value = record.get("netns")
    if value is None:
        return None
    if not isinstance(value, str) or not os.path.isabs(value):
        msg = f"record has a bad namespace path {value!r}; expected an absolute path"
        raise FaultFailed(msg)
    return Path(value)


def _namespace_gone(netns: Path | None, inode: Any) -> str | None:
    """Why the recorded namespace no longer exists, or None if it does."""
    if netns is None:
        return None
    try:
        info = netns.stat()
    except FileNotFoundError:
        return f"{netns} no longer exists"
    if inode is not None and [info.st_dev, info.st_ino] != list(inode):
        return f"{netns} now names another namespace"
    return None
