"""Tests of the Kubernetes manifests and the image recipe in deploy/."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from chaos_agent.settings import AgentSettings

ROOT = Path(__file__).resolve().parents[2]
DAEMONSET = ROOT / "deploy" / "daemonset.yaml"


def _documents() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(DAEMONSET.read_text()) if doc]


def _daemonset() -> dict[str, Any]:
    return next(doc for doc in _documents() if doc["kind"] == "DaemonSet")


@pytest.mark.parametrize("document", _documents(), ids=lambda d: d["kind"])
def test_manifests_validate_against_the_kubernetes_schema(
    document: dict[str, Any],
) -> None:
    """Test that every manifest passes strict schema validation (no unknown
    fields, right types) for the newest Kubernetes the validator knows."""
    version = kubernetes_validate.latest_version()

    kubernetes_validate.validate(document, version, strict=True)


def test_schema_validation_can_fail() -> None:
    """Test that the validator rejects a misspelt field, so the test above
    would catch one in our manifests."""
    broken = _daemonset()
    broken["spec"]["template"]["spec"]["hostNetwrk"] = True

    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(
            broken, kubernetes_validate.latest_version(), strict=True
        )


def test_agent_pod_has_what_faults_need() -> None:
    """Test privileged, host network and PID, node name from the downward API,
    the journal on a hostPath, and a readiness probe on /healthz."""
    pod = _daemonset()["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}

    assert pod["hostNetwork"] is True
    assert pod["hostPID"] is True
    assert container["securityContext"]["privileged"] is True
    node = env["CHAOS_AGENT_NODE"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert node == "spec.nodeName"
    state_dir = env["CHAOS_AGENT_STATE_DIR"]["value"]
    assert "hostPath" in volumes[mounts[state_dir]]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    metrics_port = int(env["CHAOS_AGENT_METRICS_LISTEN"]["value"].rsplit(":", 1)[1])
    assert {p["containerPort"] for p in container["ports"]} == {metrics_port}


def test_dockerfile_copies_only_what_exists() -> None:
    """Test that every COPY source in the Dockerfile is in the tree."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    sources = [
        part
        for line in re.findall(r"^COPY (.+)$", dockerfile, flags=re.MULTILINE)
        for part in line.split()[:-1]
    ]

    assert sources
    missing = [s for s in sources if not (ROOT / s).exists()]
    assert missing == []


def test_agent_environment_names_are_real_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test that every CHAOS_AGENT_* variable in the DaemonSet names a real
    agent setting, and that its values with the ConfigMap's agent.yaml make
    valid settings (TLS broker, trusted key), so a typo cannot be ignored."""
    container = _daemonset()["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    fields = {f"CHAOS_AGENT_{name.upper()}" for name in AgentSettings.model_fields}
    config_map = next(d for d in _documents() if d["kind"] == "ConfigMap")
    config = tmp_path / "agent.yaml"
    config.write_text(config_map["data"]["agent.yaml"])

    unknown = sorted(name for name in env if name not in fields)
    for name, entry in env.items():
        # Values from the downward API or a Secret get a stand-in.
        monkeypatch.setenv(name, entry.get("value", "stand-in"))
    settings = AgentSettings(config=config)

    assert unknown == []
    assert settings.broker_address.tls
    assert settings.trust == [Path(env["CHAOS_AGENT_TRUST"]["value"])]
    assert settings.policy.max_duration_s == 1800
