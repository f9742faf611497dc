"""Agent-side guardrails that no command can override.

The coordinator may ask for anything; the agent applies only what its own
policy allows. A fault outside policy is rejected with a reason that names the
cap and how to raise it, and nothing is changed.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from chaos_agent.wire import FAULT_TYPES


class PolicyViolation(Exception):
    """A fault that this agent's policy does not allow; the text says which cap."""


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    allowed_faults: list[str] = Field(default_factory=lambda: list(FAULT_TYPES))
    max_duration_s: float = Field(default=1800.0, gt=0)
    max_lease_s: float = Field(default=300.0, gt=0)
    max_cpu_load_percent: int = Field(default=100, ge=1, le=100)
    # Share of the node's total memory a memory fault may hold.
    max_memory_percent: float = Field(default=80.0, gt=0, le=100)
    # Memory left free whatever a fault asks, so the node never meets the
    # OOM killer because of an experiment.
    memory_reserve_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    max_delay_ms: float = Field(default=5000.0, ge=0)
    max_loss_pct: float = Field(default=100.0, ge=0, le=100)
    # Empty: every interface may be faulted.
    allowed_interfaces: list[str] = []
    # Directories under which corrupt-state may touch files. Empty: none.
    allowed_state_paths: list[Path] = []
    # Process names a process fault may never touch, on top of pid 1 and the
    # agent itself.
    protected_processes: list[str] = ["systemd", "init", "sshd", "kubelet"]

    def check_fault_type(self, fault_type: str) -> None:
        if fault_type not in self.allowed_faults:
            allowed = ", ".join(self.allowed_faults) or "none"
            msg = (
                f"fault type {fault_type!r} is not allowed by this agent's policy "
                f"(allowed: {allowed}); add it to allowed_faults in the agent settings"
            )
            raise PolicyViolation(msg)

    def check_duration(self, duration_s: float, lease_s: float) -> None:
        if duration_s > self.max_duration_s:
            msg = (
                f"duration {duration_s:g}s exceeds this agent's max_duration_s "
                f"({self.max_duration_s:g}s)"
            )
            raise PolicyViolation(msg)
        if lease_s > self.max_lease_s:
            msg = (
                f"lease {lease_s:g}s exceeds this agent's max_lease_s "
                f"({self.max_lease_s:g}s)"
            )
            raise PolicyViolation(msg)

    def check_state_path(self, path: Path) -> Path:
        """Return `path` resolved, if it lies under an allowed state path."""
        resolved = path.resolve()
        for root in self.allowed_state_paths:
            if resolved.is_relative_to(root.resolve()):
                return resolved
        roots = ", ".join(str(r) for r in self.allowed_state_paths) or "none"
        msg = (
            f"state path {str(path)!r} is outside this agent's allowed_state_paths "
            f"({roots})"
        )
        raise PolicyViolation(msg)

    def check_interface(self, interface: str) -> None:
        if self.allowed_interfaces and interface not in self.allowed_interfaces:
            msg = (
                f"interface {interface!r} is not in this agent's allowed_interfaces "
                f"({', '.join(self.allowed_interfaces)})"
            )
            raise PolicyViolation(msg)
