"""Tests of `aftershock keygen` and the global `--signing-key` option."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from chaos_agent import wire
from coordinator.cli import app


def test_keygen_writes_a_pair_the_agents_can_trust(tmp_path: Path) -> None:
    """Test that keygen's .pub verifies what its .key signs, and --json names
    both files and the key id."""
    result = CliRunner().invoke(app, ["keygen", "--out", str(tmp_path), "--json"])

    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout)
    private_key = wire.load_private_key(Path(written["private_key"]))
    trusted = wire.load_trusted_keys([Path(written["public_key"])])
    assert list(trusted) == [written["key_id"]]
    halt = wire.sign(wire.Halt(halted=True), private_key)
    assert wire.verify(halt, trusted) == written["key_id"]


def test_keygen_never_overwrites_a_key(tmp_path: Path) -> None:
    """Test that a second keygen into the same place fails and keeps the key."""
    runner = CliRunner()
    runner.invoke(app, ["keygen", "--out", str(tmp_path)])
    before = (tmp_path / "aftershock.key").read_bytes()

    result = runner.invoke(app, ["keygen", "--out", str(tmp_path)])

    assert result.exit_code == 2
    assert "already exists" in result.stderr
    assert (tmp_path / "aftershock.key").read_bytes() == before


def test_a_public_key_given_as_signing_key_is_refused(tmp_path: Path) -> None:
    """Test that --signing-key with the wrong file says how to get a key."""
    CliRunner().invoke(app, ["keygen", "--out", str(tmp_path)])

    result = CliRunner().invoke(
        app, ["--signing-key", str(tmp_path / "aftershock.pub"), "status"]
    )

    assert result.exit_code == 2
    assert "aftershock keygen" in result.stderr


def test_client_certificate_needs_a_tls_broker(tmp_path: Path) -> None:
    """Test that mutual-TLS options on a plain mqtt:// URL are refused."""
    result = CliRunner().invoke(
        app,
        [
            "--broker",
            "mqtt://127.0.0.1:1",
            "--cert",
            str(tmp_path / "c.crt"),
            "--key",
            str(tmp_path / "c.key"),
            "status",
        ],
    )

    assert result.exit_code == 2
    assert "mqtts://" in result.stderr
