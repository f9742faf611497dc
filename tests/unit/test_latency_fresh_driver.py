"""The agent builds a fresh driver per command and checks it before any probe."""

from __future__ import annotations

from pathlib import Path

import pytest

from chaos_agent.faults.base import FaultContext, FaultRejected
from chaos_agent.faults.latency import LatencyDriver
from chaos_agent.policy import Policy
from chaos_agent.wire import LatencyFault


def test_proxy_engine_passes_check_on_an_unprobed_driver(tmp_path: Path) -> None:
    """Test that check() of a proxy-engine fault on a driver whose available()
    never ran does not reject it as unavailable (prepare probes for real)."""
    driver = LatencyDriver(FaultContext(policy=Policy(), state_dir=tmp_path))

    driver.check(LatencyFault(delay_ms=100, engine="proxy", ports=[8080]))


def test_proxy_engine_check_still_applies_its_own_limits(tmp_path: Path) -> None:
    """Test that the proxy engine's own refusals reach check() on a fresh
    driver: a proxy fault names the ports it delays."""
    driver = LatencyDriver(FaultContext(policy=Policy(), state_dir=tmp_path))

    with pytest.raises(FaultRejected, match="port"):
        driver.check(LatencyFault(delay_ms=100, engine="proxy"))


def test_auto_picks_the_proxy_for_ports_even_where_netem_exists(
    tmp_path: Path,
) -> None:
    """Test that `auto` with ports (which netem cannot select) runs on the
    proxy engine on a kernel with netem, and on netem without ports."""
    driver = LatencyDriver(FaultContext(policy=Policy(), state_dir=tmp_path))
    driver._netem = True  # as probed on a kernel with sch_netem

    with_ports = LatencyFault(delay_ms=100, ports=[8080], direction="ingress")
    assert driver._choose_engine(with_ports) == "proxy"
    assert driver._choose_engine(LatencyFault(delay_ms=100)) == "netem"
