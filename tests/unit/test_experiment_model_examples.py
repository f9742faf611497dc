"""The shipped examples stay valid as the model evolves."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from coordinator.experiment import load_experiment

EXAMPLES = Path(__file__).parents[2] / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_experiment_is_valid(path: Path) -> None:
    """Test that every example experiment loads without error."""
    experiment = load_experiment(path)

    assert experiment.method


def test_ci_example_runs_aftershock_and_keeps_junit() -> None:
    """Test that the CI workflow is YAML that runs an existing example and
    publishes the JUnit file."""
    workflow = yaml.safe_load((EXAMPLES / "ci" / "github-actions.yaml").read_text())
    steps = workflow["jobs"]["cpu-pressure"]["steps"]
    commands = " ".join(step.get("run", "") for step in steps)

    assert "aftershock run examples/cpu-pressure.yaml" in commands
    assert (EXAMPLES / "cpu-pressure.yaml").exists()
    assert any("junit.xml" in str(step.get("with", "")) for step in steps)
