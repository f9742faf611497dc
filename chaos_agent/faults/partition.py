"""Partition: drop traffic to and from peers with nftables.

Each fault gets its own table, `inet aftershock_<id>`, with input, output and
forward chains (as `direction` asks) that accept exempt networks (the broker,
`fault.exempt`) first and then drop the peers. Revert deletes the table;
nothing else on the node is touched, so other firewalls (kube-proxy,
firewalld) keep working, and their accept verdicts cannot let a peer through
(a drop in any base chain wins).

Rules go through the `nft` binary as a ruleset on stdin, built only from
`ipaddress` objects and a validated interface name; no shell is involved.
Why not pyroute2's nftables module: it takes hand-assembled expression
bytecode, where `nft` compiles, checks and commits a whole ruleset in one
atomic transaction. In another namespace `nft` runs under `nsenter --net`,
which enters an existing namespace and never creates one.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from typing import Any, Final

from chaos_agent import nft
from chaos_agent.faults.base import (
    Availability,
    FaultDriver,
    FaultFailed,
    FaultRejected,
    Record,
)
from chaos_agent.faults.shaping import exempt_networks
from chaos_agent.netlink import Network, netns_exists
from chaos_agent.nft import NftError
from chaos_agent.targets import resolve, resolve_netns_path
from chaos_agent.wire import PartitionFault, parse_network

TABLE_PREFIX: Final = "aftershock_"
NFT_MISSING: Final = (
    "nftables is not usable here: install the nftables package (apt-get install "
    "nftables) on a kernel with nf_tables"
)
# Before the usual filter priority (0), so our drops are decided first.
CHAIN_PRIORITY: Final = -10
_INTERFACE_RE: Final = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")


class PartitionDriver(FaultDriver[PartitionFault]):
    type = "partition"

    _nftables: bool | None = None
    _nft_reason: str = "not probed yet"

    async def available(self) -> Availability:
        if self._nftables is None:
            self._nftables, self._nft_reason = await probe_nftables()
        facts = {"nftables": self._nftables}
        if self._nftables:
            return Availability(ok=True, facts=facts)
        reason = f"{NFT_MISSING} ({self._nft_reason})"
        return Availability(ok=False, reason=reason, facts=facts)

    def check(self, fault: PartitionFault) -> None:
        if self._nftables is False:
            raise FaultRejected(NFT_MISSING)
        if fault.where.interface is not None:
            self.context.policy.check_interface(fault.where.interface)

    async def prepare(self, fault_id: str, fault: PartitionFault) -> Record:
        # Without an interface the partition holds for the whole namespace: a
        # peer is cut off whichever way its packets would go.
        interface: str | None = None
        if fault.where.interface or fault.where.route_to:
            target = await resolve(fault.where)
            self.context.policy.check_interface(target.interface)
            netns_path, interface = target.netns_path, target.interface
        else:
            netns_path = resolve_netns_path(fault.where)

        exempt = await exempt_networks(self.context, fault.exempt, fault.exempt_broker)
        return {
            "engine": "nftables",
            "fault_id": fault_id,
            "netns_path": netns_path,
            "table": table_name(fault_id),
            "interface": interface,
            "direction": fault.direction,
            "peers": [str(p) for p in fault.peers],
            "exempt": [str(n) for n in exempt],
        }

    async def apply(
        self, fault_id: str, fault: PartitionFault, record: Record
    ) -> dict[str, Any]:
        ruleset = build_ruleset(
            table=record["table"],
            peers=[parse_network(p) for p in record["peers"]],
            exempt=[parse_network(n) for n in record["exempt"]],
            direction=record["direction"],
            interface=record["interface"],
        )
        try:
            await run_nft(record["netns_path"], ["-f", "-"], ruleset)
            listing = await run_nft(
                record["netns_path"], ["-j", "list", "table", "inet", record["table"]]
            )
        except NftError as exc:
            await self.revert(record)
            msg = (
                f"nft refused the partition ruleset: {exc}; nothing was left installed"
            )
            raise FaultFailed(msg) from None

        drops = count_drop_rules(listing)
        # The agent logs fault_applied with this detail; this is the kernel's side.
        self.context.log.debug(
            "nft_table_installed",
            fault="partition",
            table=record["table"],
            peers=len(record["peers"]),
            drop_rules=drops,
        )
        return {
            "table": f"inet {record['table']}",
            "netns": record["netns_path"] or "host",
            "interface": record["interface"] or "any",
            "peers": record["peers"],
            "exempt": record["exempt"],
            "drop_rules": drops,
        }

    async def revert(self, record: Record) -> dict[str, Any]:
        table = str(record["table"])
        if not netns_exists(record["netns_path"]):
            return {"table": table, "outcome": "namespace gone"}
        if not await table_exists(record["netns_path"], table):
            return {"table": table, "outcome": "absent"}
        # Adding then deleting in one transaction succeeds whether or not the
        # table is still there a moment later.
        ruleset = f"add table inet {table}\ndelete table inet {table}\n"
        await run_nft(record["netns_path"], ["-f", "-"], ruleset)
        return {"table": table, "outcome": "removed"}


def table_name(fault_id: str) -> str:
    """`aftershock_` + 12 hex digits of the fault id (readable, nft-safe)."""
    digits = re.sub(r"[^0-9a-f]", "", fault_id.lower())
    if len(digits) < 12:
        digits = hashlib.sha256(fault_id.encode()).hexdigest()
    return TABLE_PREFIX + digits[:12]


def build_ruleset(
    table: str,
    peers: list[Network],
    exempt: list[Network],
    direction: str,
    interface: str | None,
) -> str:
    """The nft ruleset of a partition, replacing any table of the same name."""
    if not re.fullmatch(rf"{TABLE_PREFIX}[0-9a-f]{{12}}", table):
        msg = (
            f"refusing to build a ruleset for table {table!r}: not an aftershock table"
        )
        raise ValueError(msg)
    if interface is not None and not _INTERFACE_RE.fullmatch(interface):
        msg = f"refusing interface name {interface!r} in an nft rule"
        raise ValueError(msg)

    inbound = direction in ("both", "ingress")
    outbound = direction in ("both", "egress")
    # Forwarded packets get one chain per direction: an accept for an exempt
    # source must not let the same packet past a drop for its destination.
    chains: list[tuple[str, str, list[str]]] = []
    if inbound:
        from_peers = _rules("saddr", exempt, peers, "iifname", interface)
        chains += [
            ("input", "input", from_peers),
            ("forward_in", "forward", from_peers),
        ]
    if outbound:
        to_peers = _rules("daddr", exempt, peers, "oifname", interface)
        chains += [("output", "output", to_peers), ("forward_out", "forward", to_peers)]

    lines = [
        f"add table inet {table}",
        f"delete table inet {table}",
        f"table inet {table} {{",
    ]
    for chain, hook, rules in chains:
        lines.append(f"  chain {chain} {{")
        lines.append(
            f"    type filter hook {hook} priority {CHAIN_PRIORITY}; policy accept;"
        )
        lines.extend(f"    {rule}" for rule in rules)
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _rules(
    field: str,
    exempt: list[Network],
    peers: list[Network],
    interface_key: str,
    interface: str | None,
) -> list[str]:
    """Accept rules for exempt networks, then drop rules for the peers."""
    on = f'{interface_key} "{interface}" ' if interface else ""
    rules = []
    for family, version in (("ip", 4), ("ip6", 6)):
        allowed = [str(n) for n in exempt if n.version == version]
        if allowed:
            rules.append(f"{family} {field} {{ {', '.join(allowed)} }} accept")
    for family, version in (("ip", 4), ("ip6", 6)):
        blocked = [str(n) for n in peers if n.version == version]
        if blocked:
            rules.append(f"{on}{family} {field} {{ {', '.join(blocked)} }} drop")
    return rules


def count_drop_rules(listing: str) -> int:
    """How many drop rules the kernel holds in a `nft -j list table` answer."""
    try:
        items = json.loads(listing)["nftables"]
    except (ValueError, KeyError):
        return 0
    drops = 0
    for item in items:
        rule = item.get("rule") if isinstance(item, dict) else None
        if rule and any("drop" in expr for expr in rule.get("expr", [])):
            drops += 1
    return drops


async def table_exists(netns_path: str | None, table: str) -> bool:
    listing = await run_nft(netns_path, ["-j", "list", "tables", "inet"])
    return table in _table_names(listing)


def _table_names(listing: str) -> list[str]:
    try:
        items = json.loads(listing)["nftables"]
    except (ValueError, KeyError):
        return []
    return [item["table"]["name"] for item in items if "table" in item]


async def sweep_owned_tables(netns_path: str | None = None) -> list[str]:
    """Delete every `inet aftershock_*` table in a namespace (reconcile)."""
    listing = await run_nft(netns_path, ["-j", "list", "tables", "inet"])
    swept = []
    for name in _table_names(listing):
        if re.fullmatch(rf"{TABLE_PREFIX}[0-9a-f]{{12}}", name):
            await run_nft(netns_path, ["delete", "table", "inet", name])
            swept.append(name)
    return swept


async def probe_nftables() -> tuple[bool, str]:
    if shutil.which("nft") is None:
        return False, "no nft binary on PATH"
    try:
        await run_nft(None, ["list", "tables"])
    except NftError as exc:
        return False, str(exc)
    return True, "nft list tables works"


async def run_nft(netns_path: str | None, args: list[str], stdin: str = "") -> str:
    """Run `nft ARGS` (in the namespace at `netns_path`), return its stdout."""
    return await nft.run(netns_path, args, stdin)
