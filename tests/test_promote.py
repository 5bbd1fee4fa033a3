"""promote: the decision as a pure function, and the alias moves and rollback on a real MLflow registry (the
sqlite store under ONEREWARD_HOME)."""

import json

import pytest

from onereward.cli import main
from onereward.stages.promote import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS_TAG,
    Decision,
    RollbackError,
    Verdict,
    alias_version,
    apply_decision,
    decide,
    rollback,
)

NAME = "onereward-generator"


def test_decision_is_a_pure_function_of_candidate_champion_and_verdict():
    passed, failed = Verdict(True, ["audit win rate low 0.58 > 0.5"]), Verdict(False, ["fill bg_psnr -1.4 dB"])
    assert decide("3", "2", passed) == Decision("3", True, "2", ["gates passed: audit win rate low 0.58 > 0.5"])
    assert decide("1", None, Verdict(True)) == Decision("1", True, None, ["gates passed"])
    refused = decide("3", "2", failed)
    assert not refused.promoted and refused.previous_champion == "2"
    assert refused.reasons == ["gates failed: fill bg_psnr -1.4 dB"]
    assert decide("3", "2", Verdict(False)).reasons == ["gates failed (no reason given)"]
    same = decide("2", "2", passed)
    assert not same.promoted and "already the champion" in same.reasons[0]


@pytest.fixture
def registry(home):
    import mlflow

    from onereward import tracking

    tracking.setup("onereward")
    client = mlflow.MlflowClient()
    client.create_registered_model(NAME)
    for _ in range(3):
        client.create_model_version(NAME, source=str(home / "model"))
    return client


def test_aliases_move_only_when_the_gates_pass_and_rollback_restores(registry, capsys):
    apply_decision(registry, NAME, decide("1", None, Verdict(True)))
    assert alias_version(registry, NAME, CHAMPION) == "1" == alias_version(registry, NAME, CHALLENGER)

    apply_decision(registry, NAME, decide("2", "1", Verdict(True)))
    assert alias_version(registry, NAME, CHAMPION) == "2"
    assert registry.get_model_version(NAME, "2").tags[PREVIOUS_TAG] == "1"

    # a refused challenger becomes `challenger` with the reasons on its version; `champion` does not move
    apply_decision(registry, NAME, decide("3", "2", Verdict(False, ["removal mse_mask +12 %"])))
    assert alias_version(registry, NAME, CHAMPION) == "2" and alias_version(registry, NAME, CHALLENGER) == "3"
    assert registry.get_model_version(NAME, "3").tags["promotion"] == "gates failed: removal mse_mask +12 %"
    assert PREVIOUS_TAG not in registry.get_model_version(NAME, "3").tags

    assert main(["promote"]) == 0
    assert json.loads(capsys.readouterr().out) == {CHAMPION: "2", CHALLENGER: "3"}
    assert main(["promote", "--rollback"]) == 0
    assert "champion 2 -> 1" in capsys.readouterr().out
    assert alias_version(registry, NAME, CHAMPION) == "1"
    # version 1 replaced no champion: a second rollback has nowhere to go and says so
    assert main(["promote", "--rollback"]) == 1
    assert "replaced no earlier champion" in capsys.readouterr().err
    assert alias_version(registry, NAME, CHAMPION) == "1"


def test_rollback_without_a_champion_is_a_clear_error(registry):
    with pytest.raises(RollbackError, match="no version has the alias 'champion'"):
        rollback(registry, NAME)
