"""Bandwidth: cap an interface's egress rate with a token bucket (tbf).

tbf on band 1 of the agent's root prio qdisc, exempt destinations on band 2
(see `chaos_agent.netlink`). Parameters: rate, burst (the bucket, bytes) and
latency (how long a packet may wait for tokens before it is dropped).
"""

from __future__ import annotations

from typing import Any, Final

from chaos_agent.faults.base import Availability, FaultDriver, FaultRejected, Record
from chaos_agent.faults.shaping import (
    apply_shaping,
    exempt_networks,
    prepare_shaping,
    revert_shaping,
)
from chaos_agent.netlink import kernel_has_qdisc
from chaos_agent.wire import BandwidthFault

TBF_MISSING: Final = (
    "the kernel has no sch_tbf: load the module (modprobe sch_tbf) or run a kernel "
    "built with CONFIG_NET_SCH_TBF"
)
# tbf's rate travels as a 32-bit count of bytes per second through pyroute2.
MAX_TBF_RATE_KBIT: Final = (2**32 - 1) // 125


class BandwidthDriver(FaultDriver[BandwidthFault]):
    type = "bandwidth"

    _tbf: bool | None = None
    _tbf_reason: str = "not probed yet"

    async def available(self) -> Availability:
        if self._tbf is None:
            self._tbf, self._tbf_reason = await kernel_has_qdisc("tbf")
        facts = {"tbf": self._tbf}
        if self._tbf:
            return Availability(ok=True, facts=facts)
        return Availability(
            ok=False, reason=f"{TBF_MISSING} ({self._tbf_reason})", facts=facts
        )

    def check(self, fault: BandwidthFault) -> None:
        if fault.where.interface is not None:
            self.context.policy.check_interface(fault.where.interface)
        if self._tbf is False:
            raise FaultRejected(TBF_MISSING)
        if fault.rate_kbit > MAX_TBF_RATE_KBIT:
            msg = (
                f"rate {fault.rate_kbit} kbit is above tbf's 32-bit limit "
                f"({MAX_TBF_RATE_KBIT} kbit); a cap that high does not shape anyway"
            )
            raise FaultRejected(msg)
        if fault.burst_bytes < 1600:
            msg = (
                f"burst {fault.burst_bytes} bytes is below one full-size frame "
                f"(1600 bytes with headers): nothing would ever be sent"
            )
            raise FaultRejected(msg)

    async def prepare(self, fault_id: str, fault: BandwidthFault) -> Record:
        exempt = await exempt_networks(self.context, fault.exempt, fault.exempt_broker)
        return await prepare_shaping(self.context, fault_id, "tbf", fault.where, exempt)

    async def apply(
        self, fault_id: str, fault: BandwidthFault, record: Record
    ) -> dict[str, Any]:
        params = {
            "rate": fault.rate_kbit * 125,
            "burst": fault.burst_bytes,
            "latency": int(fault.latency_ms * 1000),
        }
        qdisc = await apply_shaping(record, "tbf", params, TBF_MISSING)
        kernel = read_tbf(qdisc)
        # The agent logs fault_applied with this detail; this is the kernel's side.
        self.context.log.debug(
            "qdisc_read_back",
            fault="bandwidth",
            interface=record["interface"],
            netns=record["netns_path"] or "host",
            **kernel,
        )
        return {
            "interface": record["interface"],
            "netns": record["netns_path"] or "host",
            "exempt": record["exempt"],
            **kernel,
        }

    async def revert(self, record: Record) -> dict[str, Any]:
        return await revert_shaping(record)


def read_tbf(qdisc: Any) -> dict[str, Any]:
    """The kernel's tbf settings: rate in kbit, queue limit in bytes."""
    parms = qdisc.get_attr("TCA_OPTIONS").get_attr("TCA_TBF_PARMS")
    return {
        "qdisc": "tbf",
        "rate_kbit": parms["rate"] // 125,
        "limit_bytes": parms["limit"],
    }
