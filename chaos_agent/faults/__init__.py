"""Fault kinds: one module per kind, each a `FaultDriver` (see `base`).

Drivers are imported on first use, so a node without a fault kind's
dependencies (pyroute2 on a box without netlink, say) still runs the rest.
"""

from __future__ import annotations

import importlib
from typing import Any, Final

from chaos_agent.faults.base import FaultContext, FaultDriver

# fault type -> "module:class"
DRIVERS: Final[dict[str, str]] = {
    "cpu": "chaos_agent.faults.cpu:CpuDriver",
    "memory": "chaos_agent.faults.memory:MemoryDriver",
    "latency": "chaos_agent.faults.latency:LatencyDriver",
    "bandwidth": "chaos_agent.faults.bandwidth:BandwidthDriver",
    "partition": "chaos_agent.faults.partition:PartitionDriver",
    "corrupt-state": "chaos_agent.faults.corrupt_state:CorruptStateDriver",
    "process": "chaos_agent.faults.process:ProcessDriver",
}


class UnknownFaultType(LookupError):
    pass


def load_driver(fault_type: str, context: FaultContext) -> FaultDriver[Any]:
    """Instantiate the driver for `fault_type`.

    Raises UnknownFaultType when no driver is registered, and ImportError when
    its module is not present in this build.
    """
    try:
        target = DRIVERS[fault_type]
    except KeyError:
        known = ", ".join(sorted(DRIVERS))
        msg = f"unknown fault type {fault_type!r} (known: {known})"
        raise UnknownFaultType(msg) from None
    module_name, _, class_name = target.partition(":")
    module = importlib.import_module(module_name)
    driver_class: type[FaultDriver[Any]] = getattr(module, class_name)
    return driver_class(context)
