"""Latency: delay, jitter, loss, duplication, corruption, reordering, rate.

Two engines. `netem` shapes every packet leaving an interface in the kernel
(sch_netem through pyroute2), read back after apply. `proxy` delays TCP
streams in user space (`chaos_agent.faults.proxy_engine`) where the kernel has
no netem. `auto` picks netem when the kernel has it. The record names the
engine, so revert goes to the one that applied the fault.

netem shapes egress only: a delay on an interface lengthens every round trip
through it once, in the outgoing direction.
"""

from __future__ import annotations

import importlib
from typing import Any, Final

from pyroute2.netlink.rtnl.tcmsg.common import tick_in_usec

from chaos_agent.faults.base import (
    Availability,
    FaultDriver,
    FaultFailed,
    FaultRejected,
    Record,
)
from chaos_agent.faults.shaping import (
    apply_shaping,
    exempt_networks,
    prepare_shaping,
    revert_shaping,
)
from chaos_agent.netlink import kernel_has_qdisc
from chaos_agent.policy import PolicyViolation
from chaos_agent.wire import LatencyFault

NETEM_MISSING: Final = (
    "the kernel has no sch_netem: load the module (modprobe sch_netem) or use "
    "--engine proxy"
)
# netem's rate is a 32-bit count of bytes per second.
MAX_NETEM_RATE_KBIT: Final = (2**32 - 1) // 125
U32_MAX: Final = 2**32 - 1


class LatencyDriver(FaultDriver[LatencyFault]):
    type = "latency"

    _netem: bool | None = None
    _netem_reason: str = "not probed yet"
    _proxy: Any = None
    _proxy_missing: str | None = None

    # ------------------------------------------------------------ capability

    async def available(self) -> Availability:
        await self._probe()
        engines = self._engines()
        facts = {"netem": bool(self._netem), "engines": engines}
        if engines:
            return Availability(ok=True, facts=facts)
        reason = f"{NETEM_MISSING} ({self._netem_reason}); proxy: {self._proxy_missing}"
        return Availability(ok=False, reason=reason, facts=facts)

    async def _probe(self) -> None:
        if self._netem is None:
            self._netem, self._netem_reason = await kernel_has_qdisc("netem")
        if self._proxy is None and self._proxy_missing is None:
            self._load_proxy()
            if self._proxy is not None:
                proxy = await self._proxy.available()
                if not proxy.ok:
                    self._proxy_missing = f"the proxy engine cannot run: {proxy.reason}"
                    self._proxy = None

    def _load_proxy(self) -> None:
        try:
            module = importlib.import_module("chaos_agent.faults.proxy_engine")
        except ImportError as exc:
            self._proxy_missing = f"the proxy engine is not in this build ({exc})"
            return
        self._proxy = module.ProxyEngine(self.context)

    def _engines(self) -> list[str]:
        engines = ["netem"] if self._netem else []
        if self._proxy is not None:
            engines.append("proxy")
        return engines

    # ------------------------------------------------------------ parameters

    def check(self, fault: LatencyFault) -> None:
        policy = self.context.policy
        if fault.where.interface is not None:
            policy.check_interface(fault.where.interface)
        if fault.delay_ms + fault.jitter_ms > policy.max_delay_ms:
            msg = (
                f"delay {fault.delay_ms:g} ms + jitter {fault.jitter_ms:g} ms exceeds "
                f"this agent's max_delay_ms ({policy.max_delay_ms:g})"
            )
            raise PolicyViolation(msg)
        if fault.loss_pct > policy.max_loss_pct:
            msg = (
                f"loss {fault.loss_pct:g}% exceeds this agent's max_loss_pct "
                f"({policy.max_loss_pct:g})"
            )
            raise PolicyViolation(msg)

        engine = self._choose_engine(fault)
        if engine == "netem":
            check_netem_parameters(fault)
        elif hasattr(self._proxy, "check"):
            self._proxy.check(fault)

    def _choose_engine(self, fault: LatencyFault) -> str:
        """The engine that will run `fault`, or FaultRejected saying why none.

        `auto` prefers netem (per packet, every protocol) unless the fault
        selects TCP ports or ingress, which only the proxy shapes. Before the
        first `available()` the kernel is not probed yet; netem is then
        assumed and apply reports a missing netem.
        """
        if self._proxy is None and self._proxy_missing is None:
            # The agent builds a fresh driver per command and may call check()
            # without available(); the proxy module loads without probing.
            self._load_proxy()
        netem = self._netem is not False
        if fault.engine == "netem" and not netem:
            raise FaultRejected(NETEM_MISSING)
        if fault.engine == "proxy" and self._proxy is None:
            msg = f"engine proxy is not available here: {self._proxy_missing}"
            raise FaultRejected(msg)
        if fault.engine == "auto":
            # Ports and ingress are the proxy's alone: a fault that names them
            # asks for what only the proxy can do, whatever the kernel has.
            wants_proxy = bool(fault.ports) or fault.direction == "ingress"
            if netem and not (wants_proxy and self._proxy is not None):
                return "netem"
            if self._proxy is None:
                msg = f"{NETEM_MISSING}; and {self._proxy_missing}"
                raise FaultRejected(msg)
            return "proxy"
        return fault.engine

    # ----------------------------------------------------------------- apply

    async def prepare(self, fault_id: str, fault: LatencyFault) -> Record:
        await self._probe()
        # check() may have run before the kernel was probed and assumed netem.
        engine = self._choose_engine(fault)
        if engine == "netem":
            check_netem_parameters(fault)
        elif hasattr(self._proxy, "check"):
            self._proxy.check(fault)
        if engine == "proxy":
            inner = await self._proxy.prepare(fault_id, fault)
            return {"engine": "proxy", "fault_id": fault_id, "proxy": inner}

        exempt = await exempt_networks(self.context, fault.exempt, fault.exempt_broker)
        return await prepare_shaping(
            self.context, fault_id, "netem", fault.where, exempt
        )

    async def apply(
        self, fault_id: str, fault: LatencyFault, record: Record
    ) -> dict[str, Any]:
        if record["engine"] == "proxy":
            detail: dict[str, Any] = await self._proxy.apply(
                fault_id, fault, record["proxy"]
            )
            return {"engine": "proxy", **detail}

        qdisc = await apply_shaping(
            record, "netem", netem_parameters(fault), NETEM_MISSING
        )
        kernel = read_netem(qdisc)
        # The agent logs fault_applied with this detail; this is the kernel's side.
        self.context.log.debug(
            "qdisc_read_back",
            fault="latency",
            engine="netem",
            interface=record["interface"],
            netns=record["netns_path"] or "host",
            **kernel,
        )
        return {
            "engine": "netem",
            "interface": record["interface"],
            "netns": record["netns_path"] or "host",
            "exempt": record["exempt"],
            **kernel,
        }

    # ---------------------------------------------------------------- revert

    async def revert(self, record: Record) -> dict[str, Any]:
        if record.get("engine") == "proxy":
            if self._proxy is None:
                self._load_proxy()
            if self._proxy is None:
                msg = f"cannot revert a proxy latency fault: {self._proxy_missing}"
                raise FaultFailed(msg)
            detail: dict[str, Any] = await self._proxy.revert(record["proxy"])
            return {"engine": "proxy", **detail}
        return {"engine": "netem", **await revert_shaping(record)}


def check_netem_parameters(fault: LatencyFault) -> None:
    """Reject what netem (through pyroute2's encoder) cannot do, by name."""
    if fault.ports:
        msg = (
            "netem delays every packet on the interface; ports select streams only "
            "for the proxy engine (use --engine proxy, or drop ports)"
        )
        raise FaultRejected(msg)
    if fault.direction == "ingress":
        msg = (
            "netem shapes egress only; direction ingress needs the proxy engine "
            "(use --engine proxy)"
        )
        raise FaultRejected(msg)
    if fault.correlation_pct and not (
        fault.jitter_ms or fault.loss_pct or fault.duplicate_pct
    ):
        msg = "correlation applies to jitter, loss or duplicate: give one of them too"
        raise FaultRejected(msg)
    if fault.reorder_pct and not fault.delay_ms:
        msg = "netem reorders by sending some packets without the delay: set delay_ms"
        raise FaultRejected(msg)
    if fault.rate_kbit is not None and fault.rate_kbit > MAX_NETEM_RATE_KBIT:
        msg = f"netem rate is capped at {MAX_NETEM_RATE_KBIT} kbit (32-bit bytes/s)"
        raise FaultRejected(msg)


def netem_parameters(fault: LatencyFault) -> dict[str, Any]:
    """pyroute2 netem keywords (times in microseconds, rates in bytes/s)."""
    params: dict[str, Any] = {
        "delay": int(fault.delay_ms * 1000),
        "jitter": int(fault.jitter_ms * 1000),
        "loss": fault.loss_pct,
        "duplicate": fault.duplicate_pct,
    }
    correlation = fault.correlation_pct
    if correlation and fault.jitter_ms and fault.delay_ms:
        params["delay_corr"] = correlation
    if correlation and fault.loss_pct:
        params["loss_corr"] = correlation
    if correlation and fault.duplicate_pct:
        params["dup_corr"] = correlation
    if fault.corrupt_pct:
        params["prob_corrupt"] = fault.corrupt_pct
    if fault.reorder_pct:
        params["prob_reorder"] = fault.reorder_pct
        params["corr_reorder"] = correlation
    if fault.rate_kbit is not None:
        params["rate"] = fault.rate_kbit * 125
    return params


def read_netem(qdisc: Any) -> dict[str, Any]:
    """The kernel's netem settings, in the fault's units (ms, percent, kbit)."""
    options = qdisc.get_attr("TCA_OPTIONS")
    values: dict[str, Any] = {
        "qdisc": "netem",
        "delay_ms": _ticks_to_ms(options["delay"]),
        "jitter_ms": _ticks_to_ms(options["jitter"]),
        "loss_pct": _u32_to_pct(options["loss"]),
        "duplicate_pct": _u32_to_pct(options["duplicate"]),
        "limit_packets": options["limit"],
    }
    corr = options.get_attr("TCA_NETEM_CORR")
    if corr is not None:
        values["delay_correlation_pct"] = _u32_to_pct(corr["delay_corr"])
    corrupt = options.get_attr("TCA_NETEM_CORRUPT")
    if corrupt is not None:
        values["corrupt_pct"] = _u32_to_pct(corrupt["prob_corrupt"])
    reorder = options.get_attr("TCA_NETEM_REORDER")
    if reorder is not None:
        values["reorder_pct"] = _u32_to_pct(reorder["prob_reorder"])
    rate = options.get_attr("TCA_NETEM_RATE")
    # The kernel reports a rate section even when no rate was set (rate 0).
    if rate is not None and rate["rate"]:
        values["rate_kbit"] = rate["rate"] // 125
    return values


def _ticks_to_ms(ticks: int) -> float:
    return round(ticks / float(tick_in_usec) / 1000, 3)


def _u32_to_pct(value: int) -> float:
    return round(value / U32_MAX * 100, 3)
