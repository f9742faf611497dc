"""The wire protocol between the coordinator and the agents.

This is the only module of the agent package that the coordinator imports. It
holds the MQTT topic layout, every message model, the fault specifications and
the canonical encoding that signatures are computed over.

Every model is strict: unknown fields, wrong types, bad names and oversized
payloads are rejected with a `WireError` that says what was wrong, so a
malformed message can be answered and never half-understood.

Topics (MQTT 3.1.1, JSON payloads, `{site}` and `{node}` are `Name`s)::

    aftershock/v1/{site}/{node}/status      agent ->  retained, last will
    aftershock/v1/{site}/{node}/telemetry   agent ->
    aftershock/v1/{site}/{node}/ack         agent ->
    aftershock/v1/{site}/{node}/cmd         -> one agent
    aftershock/v1/{site}/_all/cmd           -> every agent of a site
    aftershock/v1/_all/_all/cmd             -> every agent
    aftershock/v1/lease/{experiment}        coordinator -> lease renewal
    aftershock/v1/halt                      coordinator -> retained, global
    aftershock/v1/{site}/halt               coordinator -> retained, one site
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Annotated, Any, Final, Literal, TypeVar

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

SCHEMA_VERSION: Final = 1
TOPIC_ROOT: Final = "aftershock/v1"
ALL: Final = "_all"

# A command is a few hundred bytes; 64 KiB leaves room for long target lists
# while keeping a hostile publisher from making an agent parse megabytes.
MAX_PAYLOAD_BYTES: Final = 64 * 1024

# Agents reject commands whose validity window is longer than this: a signed
# command that stays valid for days is a replay waiting to happen.
MAX_COMMAND_VALIDITY_S: Final = 300.0

# A fault longer than a day is not an experiment; agents cap it further.
MAX_DURATION_S: Final = 86_400.0

_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_LABEL_KEY_RE: Final = re.compile(r"^[A-Za-z0-9_./-]{1,128}$")


class WireError(ValueError):
    """A message that cannot be accepted: the text says which part and why."""


def _check_name(value: str) -> str:
    if not _NAME_RE.fullmatch(value):
        msg = f"{value!r} is not a valid name: use 1-64 of A-Z a-z 0-9 _ . -"
        raise ValueError(msg)
    if value == ALL:
        msg = f"{ALL!r} is reserved for broadcast topics and cannot name a node or site"
        raise ValueError(msg)
    return value


def _check_label_key(value: str) -> str:
    if not _LABEL_KEY_RE.fullmatch(value):
        msg = f"{value!r} is not a valid label key: use 1-128 of A-Z a-z 0-9 _ . / -"
        raise ValueError(msg)
    return value


def _check_aware(value: datetime) -> datetime:
    if value.tzinfo is None:
        msg = "timestamps must carry a time zone (use UTC, e.g. 2026-01-01T00:00:00Z)"
        raise ValueError(msg)
    return value


Name = Annotated[str, AfterValidator(_check_name)]
LabelKey = Annotated[str, AfterValidator(_check_label_key)]
LabelValue = Annotated[str, Field(max_length=256)]
Timestamp = Annotated[datetime, AfterValidator(_check_aware)]
Network = IPv4Network | IPv6Network
Port = Annotated[int, Field(ge=1, le=65535)]


def utcnow() -> datetime:
    return datetime.now(UTC)


class WireModel(BaseModel):
    """Base of every message: strict, immutable, no unknown fields."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


# --------------------------------------------------------------------- topics


def status_topic(site: str, node: str) -> str:
    return f"{TOPIC_ROOT}/{site}/{node}/status"


def telemetry_topic(site: str, node: str) -> str:
    return f"{TOPIC_ROOT}/{site}/{node}/telemetry"


def ack_topic(site: str, node: str) -> str:
    return f"{TOPIC_ROOT}/{site}/{node}/ack"


def command_topic(site: str = ALL, node: str = ALL) -> str:
    """Topic of a command to one node, every node of a site, or every node."""
    if site == ALL and node != ALL:
        msg = "a command to one node must name its site"
        raise WireError(msg)
    return f"{TOPIC_ROOT}/{site}/{node}/cmd"


def lease_topic(experiment: str) -> str:
    return f"{TOPIC_ROOT}/lease/{experiment}"


def halt_topic(site: str | None = None) -> str:
    """The retained halt topic: global when `site` is None."""
    return f"{TOPIC_ROOT}/halt" if site is None else f"{TOPIC_ROOT}/{site}/halt"


def agent_subscriptions(site: str, node: str) -> list[str]:
    """Every topic an agent listens on, in the order it should subscribe."""
    return [
        halt_topic(),
        halt_topic(site),
        command_topic(site, node),
        command_topic(site, ALL),
        command_topic(ALL, ALL),
        f"{TOPIC_ROOT}/lease/+",
    ]


STATUS_WILDCARD: Final = f"{TOPIC_ROOT}/+/+/status"
TELEMETRY_WILDCARD: Final = f"{TOPIC_ROOT}/+/+/telemetry"
ACK_WILDCARD: Final = f"{TOPIC_ROOT}/+/+/ack"


def split_node_topic(topic: str) -> tuple[str, str, str]:
    """Return (site, node, kind) of a per-node topic such as a status topic."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:2]) != TOPIC_ROOT:
        msg = f"{topic!r} is not an aftershock per-node topic"
        raise WireError(msg)
    return parts[2], parts[3], parts[4]


# --------------------------------------------------------------------- faults


class NetworkTarget(WireModel):
    """Where a network fault applies: a namespace and an interface in it.

    Exactly one way of naming the namespace may be given; none means the
    agent's own. The interface is named, found by the route to `route_to`, or
    (neither given) the interface of the default route.
    """

    netns: Name | None = None
    netns_path: Annotated[str, Field(max_length=256)] | None = None
    netns_pid: Annotated[int, Field(gt=1)] | None = None
    interface: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:@-]{1,15}$")] | None = None
    route_to: Annotated[str, Field(max_length=64)] | None = None

    @model_validator(mode="after")
    def _one_namespace(self) -> NetworkTarget:
        given = [x for x in (self.netns, self.netns_path, self.netns_pid) if x]
        if len(given) > 1:
            msg = "name the namespace one way only: netns, netns_path or netns_pid"
            raise ValueError(msg)
        if self.interface and self.route_to:
            msg = "give either interface or route_to, not both"
            raise ValueError(msg)
        return self


class _NetworkFault(WireModel):
    where: NetworkTarget = NetworkTarget()
    # Extra destinations never touched by the fault, on top of the broker.
    exempt: Annotated[list[Network], Field(max_length=32)] = []
    # False lets an experiment cut the agent off from its own broker.
    exempt_broker: bool = True


class CpuFault(WireModel):
    type: Literal["cpu"] = "cpu"
    load_percent: Annotated[int, Field(ge=1, le=100)]
    # None: one worker per CPU of the node.
    workers: Annotated[int, Field(ge=1, le=1024)] | None = None


class MemoryFault(WireModel):
    type: Literal["memory"] = "memory"
    bytes: Annotated[int, Field(gt=0)] | None = None
    percent: Annotated[float, Field(gt=0, le=100)] | None = None
    ramp_s: Annotated[float, Field(ge=0, le=3600)] = 0.0

    @model_validator(mode="after")
    def _one_size(self) -> MemoryFault:
        if (self.bytes is None) == (self.percent is None):
            msg = "give exactly one of bytes or percent"
            raise ValueError(msg)
        return self


class LatencyFault(_NetworkFault):
    type: Literal["latency"] = "latency"
    delay_ms: Annotated[float, Field(ge=0, le=60_000)]
    jitter_ms: Annotated[float, Field(ge=0, le=60_000)] = 0.0
    correlation_pct: Annotated[float, Field(ge=0, le=100)] = 0.0
    loss_pct: Annotated[float, Field(ge=0, le=100)] = 0.0
    duplicate_pct: Annotated[float, Field(ge=0, le=100)] = 0.0
    corrupt_pct: Annotated[float, Field(ge=0, le=100)] = 0.0
    reorder_pct: Annotated[float, Field(ge=0, le=100)] = 0.0
    rate_kbit: Annotated[int, Field(gt=0)] | None = None
    # netem shapes packets in the kernel; proxy delays TCP streams in user
    # space where the kernel has no netem; auto picks netem when it exists.
    engine: Literal["auto", "netem", "proxy"] = "auto"
    # Proxy engine only: which TCP ports and which direction to delay.
    ports: Annotated[list[Port], Field(max_length=64)] = []
    direction: Literal["both", "ingress", "egress"] = "both"


class BandwidthFault(_NetworkFault):
    type: Literal["bandwidth"] = "bandwidth"
    rate_kbit: Annotated[int, Field(gt=0, le=100_000_000)]
    burst_bytes: Annotated[int, Field(gt=0)] = 32 * 1024
    latency_ms: Annotated[float, Field(gt=0, le=60_000)] = 50.0


class PartitionFault(_NetworkFault):
    type: Literal["partition"] = "partition"
    peers: Annotated[list[Network], Field(min_length=1, max_length=256)]
    direction: Literal["both", "ingress", "egress"] = "both"


class CorruptStateFault(WireModel):
    type: Literal["corrupt-state"] = "corrupt-state"
    adapter: Literal["sqlite", "json", "bytes"] = "sqlite"
    path: Annotated[str, Field(min_length=1, max_length=1024)]
    # sqlite adapter; the defaults fit token_bucket's schema.
    table: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")] = "buckets"
    key_column: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")] = "key"
    value_column: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")] = (
        "consumed"
    )
    key_filter: Annotated[str, Field(max_length=256)] = "*"
    # json adapter: a dotted path, `*` matching every key at one level.
    json_path: Annotated[str, Field(max_length=256)] | None = None
    # bytes adapter: [offset_start, offset_end) of the file.
    offset_start: Annotated[int, Field(ge=0)] = 0
    offset_end: Annotated[int, Field(gt=0)] | None = None
    mode: Literal["bitflip", "set", "scale"] = "bitflip"
    bits: Annotated[int, Field(ge=1, le=4096)] = 1
    value: float | None = None
    factor: float | None = None
    max_rows: Annotated[int, Field(ge=1, le=100_000)] = 1000
    restore: bool = False
    seed: int | None = None

    @model_validator(mode="after")
    def _mode_needs(self) -> CorruptStateFault:
        if self.mode == "set" and self.value is None:
            msg = "mode 'set' needs a value"
            raise ValueError(msg)
        if self.mode == "scale" and self.factor is None:
            msg = "mode 'scale' needs a factor"
            raise ValueError(msg)
        return self


class ProcessFault(WireModel):
    type: Literal["process"] = "process"
    action: Literal["kill", "pause"] = "kill"
    signal: Annotated[str, Field(pattern=r"^(SIG)?[A-Z0-9]{2,10}$")] = "SIGKILL"
    name: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    pid: Annotated[int, Field(gt=1)] | None = None
    pidfile: Annotated[str, Field(max_length=1024)] | None = None
    cgroup: Annotated[str, Field(max_length=1024)] | None = None

    @model_validator(mode="after")
    def _one_selector(self) -> ProcessFault:
        given = [x for x in (self.name, self.pid, self.pidfile, self.cgroup) if x]
        if len(given) != 1:
            msg = "select the process exactly one way: name, pid, pidfile or cgroup"
            raise ValueError(msg)
        return self


Fault = Annotated[
    CpuFault
    | MemoryFault
    | LatencyFault
    | BandwidthFault
    | PartitionFault
    | CorruptStateFault
    | ProcessFault,
    Field(discriminator="type"),
]

FAULT_TYPES: Final = (
    "cpu",
    "memory",
    "latency",
    "bandwidth",
    "partition",
    "corrupt-state",
    "process",
)


# ------------------------------------------------------------------- commands


class Target(WireModel):
    """Which agents a command is for. Empty lists and maps constrain nothing."""

    sites: Annotated[list[Name], Field(max_length=256)] = []
    nodes: Annotated[list[Name], Field(max_length=4096)] = []
    labels: Annotated[dict[LabelKey, LabelValue], Field(max_length=32)] = {}

    def matches(self, site: str, node: str, labels: dict[str, str]) -> bool:
        if self.sites and site not in self.sites:
            return False
        if self.nodes and node not in self.nodes:
            return False
        return all(labels.get(k) == v for k, v in self.labels.items())


class Signature(WireModel):
    """An Ed25519 signature over `canonical_bytes` of the signed message."""

    key_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    value: Annotated[str, Field(min_length=1, max_length=256)]


class _Signed(WireModel):
    v: Literal[1] = SCHEMA_VERSION
    id: uuid.UUID = Field(default_factory=uuid.uuid4)
    issued_at: Timestamp = Field(default_factory=utcnow)
    signature: Signature | None = None


class Command(_Signed):
    """A signed instruction to one or more agents.

    `id` is also the replay nonce and, for `inject`, the id of the fault it
    creates on every agent it reaches.
    """

    expires_at: Timestamp
    experiment: Name
    action: Literal["inject", "revert", "revert_all", "ping"]
    target: Target = Target()
    fault: Fault | None = None
    # `revert`: the fault to revert (the id of the inject command).
    fault_id: uuid.UUID | None = None
    duration_s: Annotated[float, Field(gt=0, le=MAX_DURATION_S)] | None = None
    lease_s: Annotated[float, Field(gt=0, le=3600)] | None = None

    @model_validator(mode="after")
    def _action_needs(self) -> Command:
        if self.action == "inject":
            if self.fault is None or self.duration_s is None or self.lease_s is None:
                msg = "an inject command needs fault, duration_s and lease_s"
                raise ValueError(msg)
        elif self.fault is not None:
            msg = f"a {self.action} command carries no fault"
            raise ValueError(msg)
        if self.action == "revert" and self.fault_id is None:
            msg = "a revert command needs the fault_id to revert"
            raise ValueError(msg)
        if self.expires_at <= self.issued_at:
            msg = "expires_at must be after issued_at"
            raise ValueError(msg)
        return self


class LeaseRenewal(_Signed):
    """Keeps an experiment's faults alive for another `lease_s` seconds."""

    experiment: Name
    lease_s: Annotated[float, Field(gt=0, le=3600)]


class Halt(_Signed):
    """Retained on a halt topic: `halted` reverts everything and refuses new
    faults until a message with `halted: false` replaces it."""

    halted: bool
    reason: Annotated[str, Field(max_length=512)] = ""


# ------------------------------------------------------------------ agent side

AckState = Literal["received", "rejected", "applied", "reverted", "failed"]
RevertCause = Literal["duration", "lease", "halt", "command", "shutdown", "startup"]


class Timings(WireModel):
    """When the agent saw the command and how long this state took to reach."""

    received_at: Timestamp
    at: Timestamp
    # Milliseconds since `received_at` on the agent's monotonic clock.
    elapsed_ms: Annotated[float, Field(ge=0)]


class Ack(WireModel):
    v: Literal[1] = SCHEMA_VERSION
    command_id: uuid.UUID | None
    node: Name
    site: Name
    experiment: str | None = None
    state: AckState
    fault_id: uuid.UUID | None = None
    fault_type: str | None = None
    reason: Annotated[str, Field(max_length=2048)] | None = None
    revert_cause: RevertCause | None = None
    # What the agent verified after applying (kernel values read back, pids,
    # bytes resident) or what it changed (corrupted keys, old and new values).
    detail: dict[str, Any] = {}
    timings: Timings


class Capabilities(WireModel):
    faults: list[str] = []
    cgroup: Literal["v1", "v2", "none"] = "none"
    netem: bool = False
    tbf: bool = False
    nftables: bool = False
    latency_engines: list[Literal["netem", "proxy"]] = []
    # Why each unavailable fault type cannot run here, and how to get it.
    missing: dict[str, str] = {}


class ActiveFault(WireModel):
    fault_id: uuid.UUID
    type: str
    experiment: Name
    applied_at: Timestamp
    expires_at: Timestamp
    lease_expires_at: Timestamp
    detail: dict[str, Any] = {}


class Status(WireModel):
    v: Literal[1] = SCHEMA_VERSION
    node: Name
    site: Name
    online: bool
    version: str = ""
    labels: dict[LabelKey, LabelValue] = {}
    capabilities: Capabilities = Capabilities()
    faults: list[ActiveFault] = []
    halted: bool = False
    halt_reason: str = ""
    started_at: Timestamp | None = None
    at: Timestamp = Field(default_factory=utcnow)


class Telemetry(WireModel):
    v: Literal[1] = SCHEMA_VERSION
    node: Name
    site: Name
    at: Timestamp = Field(default_factory=utcnow)
    cpu_count: int
    cpu_percent: float
    load1: float
    memory_total_bytes: int
    memory_used_bytes: int
    memory_percent: float
    net_bytes_sent: int = 0
    net_bytes_recv: int = 0
    faults_active: int = 0


# ------------------------------------------------------------------- encoding

M = TypeVar("M", bound=WireModel)


def encode(message: WireModel) -> bytes:
    return message.model_dump_json(exclude_none=False).encode()


def decode(model: type[M], payload: bytes | bytearray | str) -> M:
    """Parse and validate `payload` as `model`, or raise a readable WireError."""
    raw = payload.encode() if isinstance(payload, str) else bytes(payload)
    if len(raw) > MAX_PAYLOAD_BYTES:
        msg = f"payload of {len(raw)} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit"
        raise WireError(msg)
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise WireError(_describe(model, exc)) from None


def _describe(model: type[WireModel], exc: ValidationError) -> str:
    problems = []
    for err in exc.errors(include_url=False)[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "payload"
        problems.append(f"{where}: {err['msg']}")
    more = exc.error_count() - len(problems)
    tail = f" (and {more} more)" if more > 0 else ""
    return f"invalid {model.__name__}: " + "; ".join(problems) + tail


def canonical_bytes(message: _Signed) -> bytes:
    """The bytes a signature covers: the message without its signature, as
    JSON with sorted keys and no whitespace, so every party computes the same
    bytes from the same message."""
    body = message.model_dump(mode="json", exclude={"signature"})
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def parse_network(value: str) -> Network:
    """Parse an address or CIDR (`198.18.0.1`, `198.18.0.0/15`) strictly."""
    try:
        return ip_network(value, strict=False)
    except ValueError:
        msg = f"{value!r} is not an IP address or CIDR network"
        raise WireError(msg) from None


# -------------------------------------------------------------------- signing
#
# Ed25519 over `canonical_bytes`. The coordinator holds the private key; agents
# trust one or more public keys (several during a rotation). A key is named by
# its id, the first 16 hex digits of the SHA-256 of its raw public bytes, so a
# signature says which trusted key to check it against.
#
# PyNaCl (libsodium) does the signing: the agent, which only verifies, loads
# ~1 MB with it against ~9 MB for the `cryptography` package, and an agent
# runs on every node.

PrivateKey = SigningKey
PublicKey = VerifyKey


class SignatureError(WireError):
    """A message whose signature is missing, forged, or from an untrusted key."""


def generate_private_key() -> PrivateKey:
    return SigningKey.generate()


def key_id(public_key: PublicKey) -> str:
    return hashlib.sha256(bytes(public_key)).hexdigest()[:16]


S = TypeVar("S", bound=_Signed)


def sign(message: S, private_key: PrivateKey) -> S:
    """Return `message` with an Ed25519 signature over its canonical bytes."""
    value = private_key.sign(canonical_bytes(message)).signature
    signature = Signature(
        key_id=key_id(private_key.verify_key),
        value=base64.b64encode(value).decode(),
    )
    return message.model_copy(update={"signature": signature})


def verify(message: _Signed, trusted: Mapping[str, PublicKey]) -> str:
    """Check `message`'s signature against the trusted keys; return the key id.

    Raises SignatureError saying what is wrong: unsigned, unknown key, or a
    signature that does not match the message.
    """
    if message.signature is None:
        msg = "message is unsigned; sign it with the coordinator's key (--signing-key)"
        raise SignatureError(msg)
    public_key = trusted.get(message.signature.key_id)
    if public_key is None:
        msg = (
            f"signed by key {message.signature.key_id}, which this agent does not "
            "trust; add its .pub file with --trust"
        )
        raise SignatureError(msg)
    try:
        raw = base64.b64decode(message.signature.value, validate=True)
        public_key.verify(canonical_bytes(message), raw)
    except (BadSignatureError, ValueError, TypeError):
        msg = f"signature does not match the message (key {message.signature.key_id})"
        raise SignatureError(msg) from None
    return message.signature.key_id


# Key files are PEM in the form RFC 8410 gives Ed25519 keys, the form
# `openssl genpkey -algorithm ed25519` writes: a PKCS#8 private key and a
# SubjectPublicKeyInfo public key. Both DER encodings are a fixed prefix (the
# algorithm id 1.3.101.112) followed by the 32 raw key bytes.
_PRIVATE_PEM: Final = "PRIVATE KEY"
_PRIVATE_DER_PREFIX: Final = bytes.fromhex("302e020100300506032b657004220420")
_PUBLIC_PEM: Final = "PUBLIC KEY"
_PUBLIC_DER_PREFIX: Final = bytes.fromhex("302a300506032b6570032100")
_RAW_KEY_BYTES: Final = 32


def _pem(label: str, der: bytes) -> bytes:
    body = base64.encodebytes(der).decode().replace("\n", "")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "\n".join(
        [f"-----BEGIN {label}-----", *lines, f"-----END {label}-----", ""]
    ).encode()


def _raw_key(path: Path, label: str, prefix: bytes, kind: str) -> bytes:
    """The 32 key bytes of the Ed25519 PEM file at `path`, or a WireError that
    says what the file holds instead."""
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        msg = f"cannot read an Ed25519 {kind} key from {path}: {exc}"
        raise WireError(msg) from None
    begin, end = f"-----BEGIN {label}-----", f"-----END {label}-----"
    if f"-----BEGIN ENCRYPTED {label}-----" in text:
        msg = (
            f"{path} is encrypted, and aftershock reads only unencrypted keys "
            "(keep the file at mode 0600 instead); decrypt it with `openssl pkey "
            f"-in {path} -out NEW_FILE`"
        )
        raise WireError(msg)
    if begin not in text or end not in text:
        msg = (
            f"{path} holds no '{begin}' block; an Ed25519 {kind} key file comes "
            "from `aftershock keygen` (or `openssl genpkey -algorithm ed25519`)"
        )
        raise WireError(msg)
    body = text.split(begin, 1)[1].split(end, 1)[0]
    try:
        der = base64.b64decode("".join(body.split()), validate=True)
    except ValueError:
        msg = f"{path}: the PEM block is not valid base64"
        raise WireError(msg) from None
    if len(der) != len(prefix) + _RAW_KEY_BYTES or not der.startswith(prefix):
        msg = (
            f"{path} holds a {kind} key that is not Ed25519 (or not in RFC 8410 "
            "form); sign with a key from `aftershock keygen`"
        )
        raise WireError(msg)
    return der[len(prefix) :]


def generate_key_pair(directory: Path, name: str = "aftershock") -> tuple[Path, Path]:
    """Write `<name>.key` (PEM, mode 0600) and `<name>.pub` into `directory`.

    Refuses to overwrite an existing key: losing a private key that agents
    trust is a rotation, not an accident.
    """
    directory.mkdir(parents=True, exist_ok=True)
    private_path = directory / f"{name}.key"
    public_path = directory / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists():
            msg = f"{path} already exists; remove it or choose another --name"
            raise FileExistsError(msg)

    private_key = generate_private_key()
    private_pem = _pem(_PRIVATE_PEM, _PRIVATE_DER_PREFIX + bytes(private_key))
    public_pem = _pem(_PUBLIC_PEM, _PUBLIC_DER_PREFIX + bytes(private_key.verify_key))

    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path


def load_private_key(path: Path) -> PrivateKey:
    return SigningKey(_raw_key(path, _PRIVATE_PEM, _PRIVATE_DER_PREFIX, "private"))


def load_public_key(path: Path) -> PublicKey:
    return VerifyKey(_raw_key(path, _PUBLIC_PEM, _PUBLIC_DER_PREFIX, "public"))


def load_trusted_keys(paths: Iterable[Path]) -> dict[str, PublicKey]:
    """Map key id -> public key for every `.pub` file given."""
    keys = (load_public_key(path) for path in paths)
    return {key_id(key): key for key in keys}
