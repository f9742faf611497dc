"""Tests of the wire protocol: topics, strict models, size limits, encoding."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from chaos_agent import wire
from chaos_agent.wire import (
    Command,
    CpuFault,
    MemoryFault,
    Target,
    WireError,
    canonical_bytes,
    decode,
    encode,
)


def _inject(**overrides: object) -> Command:
    now = datetime.now(UTC)
    fields: dict[str, object] = {
        "issued_at": now,
        "expires_at": now + timedelta(seconds=30),
        "experiment": "exp-1",
        "action": "inject",
        "target": Target(nodes=["n1"]),
        "fault": CpuFault(load_percent=50),
        "duration_s": 10.0,
        "lease_s": 5.0,
    }
    fields.update(overrides)
    return Command.model_validate(fields)


def test_command_round_trips_through_json() -> None:
    """Test that a command decodes to an equal command after encoding."""
    command = _inject()

    decoded = decode(Command, encode(command))

    assert decoded == command
    assert isinstance(decoded.fault, CpuFault)


def test_fault_union_is_discriminated_by_type() -> None:
    """Test that the `type` field selects the fault model."""
    payload = json.loads(encode(_inject()))
    payload["fault"] = {"type": "memory", "percent": 10}

    decoded = decode(Command, json.dumps(payload))

    assert isinstance(decoded.fault, MemoryFault)
    assert decoded.fault.percent == 10


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda p: p.update(surprise=1), "surprise"),
        (lambda p: p["fault"].update(load_percent=101), "load_percent"),
        (lambda p: p["fault"].update(type="teleport"), "fault"),
        (lambda p: p.update(experiment="bad name!"), "experiment"),
        (lambda p: p.update(experiment="_all"), "reserved"),
        (lambda p: p.update(duration_s=None), "duration_s"),
        (lambda p: p.update(issued_at="2026-01-01T00:00:00"), "time zone"),
        (lambda p: p["target"].update(nodes=["ok", "not ok"]), "nodes"),
    ],
)
def test_invalid_commands_are_rejected_with_the_field_named(
    mutate: object, expected: str
) -> None:
    """Test that each kind of malformed command raises a WireError naming it."""
    payload = json.loads(encode(_inject()))
    mutate(payload)  # type: ignore[operator]

    with pytest.raises(WireError) as caught:
        decode(Command, json.dumps(payload))

    assert expected in str(caught.value)


def test_oversized_payload_is_rejected_before_parsing() -> None:
    """Test that a payload over the limit is refused by size, not parsed."""
    payload = b"{" + b" " * wire.MAX_PAYLOAD_BYTES + b"}"

    with pytest.raises(WireError, match="exceeds"):
        decode(Command, payload)


def test_non_json_payload_is_a_wire_error() -> None:
    """Test that garbage bytes give a WireError, not another exception."""
    with pytest.raises(WireError, match="invalid Command"):
        decode(Command, b"\xff\x00not json")


def test_expiry_before_issue_is_rejected() -> None:
    """Test that a command cannot expire before it was issued."""
    now = datetime.now(UTC)

    with pytest.raises(ValueError, match="expires_at"):
        _inject(issued_at=now, expires_at=now - timedelta(seconds=1))


def test_memory_fault_needs_exactly_one_size() -> None:
    """Test that a memory fault takes bytes or percent, not both or neither."""
    with pytest.raises(ValueError, match="exactly one"):
        MemoryFault(bytes=1024, percent=10)
    with pytest.raises(ValueError, match="exactly one"):
        MemoryFault()


def test_revert_needs_a_fault_id_and_carries_no_fault() -> None:
    """Test the per-action requirements of the envelope."""
    with pytest.raises(ValueError, match="fault_id"):
        _inject(action="revert", fault=None)
    with pytest.raises(ValueError, match="carries no fault"):
        _inject(action="revert", fault_id=uuid.uuid4())


def test_canonical_bytes_ignore_the_signature_and_key_order() -> None:
    """Test that signing input is stable and excludes the signature itself."""
    command = _inject()
    signed = command.model_copy(
        update={"signature": wire.Signature(key_id="k1", value="c2ln")}
    )

    assert canonical_bytes(command) == canonical_bytes(signed)
    assert b" " not in canonical_bytes(command)
    assert json.loads(canonical_bytes(command))["experiment"] == "exp-1"


def test_target_matching() -> None:
    """Test that empty constraints match everything and each given one filters."""
    anyone = Target()
    picky = Target(sites=["s1"], labels={"role": "edge"})

    assert anyone.matches("s9", "n9", {})
    assert picky.matches("s1", "n1", {"role": "edge", "zone": "a"})
    assert not picky.matches("s2", "n1", {"role": "edge"})
    assert not picky.matches("s1", "n1", {"role": "core"})


def test_topics() -> None:
    """Test the topic layout and its parser."""
    assert wire.command_topic("s1", "n1") == "aftershock/v1/s1/n1/cmd"
    assert wire.command_topic() == "aftershock/v1/_all/_all/cmd"
    assert wire.halt_topic() == "aftershock/v1/halt"
    assert wire.halt_topic("s1") == "aftershock/v1/s1/halt"
    assert wire.split_node_topic(wire.status_topic("s1", "n1")) == (
        "s1",
        "n1",
        "status",
    )
    with pytest.raises(WireError):
        wire.split_node_topic("other/v1/s1/n1/status")
    with pytest.raises(WireError):
        wire.command_topic(node="n1")


def test_network_target_names_one_namespace() -> None:
    """Test that a network target refuses two ways of naming a namespace."""
    with pytest.raises(ValueError, match="one way"):
        wire.NetworkTarget(netns="a", netns_pid=42)


class TestSigning:
    """Ed25519 signatures over canonical bytes."""

    def test_signed_command_verifies_with_the_trusted_key(self, tmp_path: Path) -> None:
        """Test that a command signed with a key verifies against its .pub."""
        private_path, public_path = wire.generate_key_pair(tmp_path)
        trusted = wire.load_trusted_keys([public_path])

        signed = wire.sign(_inject(), wire.load_private_key(private_path))

        assert wire.verify(signed, trusted) == signed.signature.key_id  # type: ignore[union-attr]
        assert decode(Command, encode(signed)) == signed

    def test_tampered_command_is_refused(self, tmp_path: Path) -> None:
        """Test that changing any signed field breaks the signature."""
        private_path, public_path = wire.generate_key_pair(tmp_path)
        signed = wire.sign(_inject(), wire.load_private_key(private_path))
        tampered = signed.model_copy(update={"duration_s": 3600.0})

        with pytest.raises(wire.SignatureError, match="does not match"):
            wire.verify(tampered, wire.load_trusted_keys([public_path]))

    def test_unsigned_and_untrusted_are_refused(self, tmp_path: Path) -> None:
        """Test the two other refusals: no signature, and an unknown key."""
        ours, _ = wire.generate_key_pair(tmp_path / "ours")
        _, theirs_pub = wire.generate_key_pair(tmp_path / "theirs")
        trusted = wire.load_trusted_keys([theirs_pub])

        with pytest.raises(wire.SignatureError, match="unsigned"):
            wire.verify(_inject(), trusted)
        with pytest.raises(wire.SignatureError, match="does not trust"):
            wire.verify(wire.sign(_inject(), wire.load_private_key(ours)), trusted)

    def test_any_trusted_key_is_accepted_during_rotation(self, tmp_path: Path) -> None:
        """Test that an agent trusting old and new keys accepts both."""
        old, old_pub = wire.generate_key_pair(tmp_path, "old")
        new, new_pub = wire.generate_key_pair(tmp_path, "new")
        trusted = wire.load_trusted_keys([old_pub, new_pub])

        for key in (old, new):
            wire.verify(wire.sign(_inject(), wire.load_private_key(key)), trusted)

    def test_keygen_protects_the_private_key(self, tmp_path: Path) -> None:
        """Test that the private key is 0600 and never overwritten."""
        private_path, _ = wire.generate_key_pair(tmp_path)

        assert private_path.stat().st_mode & 0o777 == 0o600
        with pytest.raises(FileExistsError, match="already exists"):
            wire.generate_key_pair(tmp_path)

    def test_a_public_key_is_not_a_private_key(self, tmp_path: Path) -> None:
        """Test that loading the wrong file gives a clear WireError."""
        _, public_path = wire.generate_key_pair(tmp_path)

        with pytest.raises(WireError, match="no '-----BEGIN PRIVATE KEY-----' block"):
            wire.load_private_key(public_path)

    def test_key_files_are_the_rfc_8410_pem_other_tools_use(
        self, tmp_path: Path
    ) -> None:
        """Test both directions against the `cryptography` package (OpenSSL):
        its Ed25519 key signs commands our agents verify, and the .pub we
        write verifies what our private key signs."""
        theirs = ed25519.Ed25519PrivateKey.generate()
        (tmp_path / "theirs.key").write_bytes(
            theirs.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        ours, ours_pub = wire.generate_key_pair(tmp_path)

        signed = wire.sign(_inject(), wire.load_private_key(tmp_path / "theirs.key"))
        raw = base64.b64decode(signed.signature.value)  # type: ignore[union-attr]
        theirs.public_key().verify(raw, canonical_bytes(signed))
        loaded = serialization.load_pem_public_key(ours_pub.read_bytes())
        assert isinstance(loaded, ed25519.Ed25519PublicKey)
        data = b"any bytes"
        loaded.verify(bytes(wire.load_private_key(ours).sign(data).signature), data)

    def test_a_key_of_another_algorithm_is_refused(self, tmp_path: Path) -> None:
        """Test that an EC key in the same PEM armour gets a WireError naming
        the problem, not a key built from the wrong bytes."""
        other = ec.generate_private_key(ec.SECP256R1())
        path = tmp_path / "ec.key"
        path.write_bytes(
            other.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

        with pytest.raises(WireError, match="not Ed25519"):
            wire.load_private_key(path)

    def test_an_encrypted_key_is_refused_with_the_way_out(self, tmp_path: Path) -> None:
        """Test that a password-protected key gets a WireError that says how
        to decrypt it."""
        key = ed25519.Ed25519PrivateKey.generate()
        path = tmp_path / "locked.key"
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            )
        )

        with pytest.raises(WireError, match=r"is encrypted.*openssl pkey"):
            wire.load_private_key(path)
