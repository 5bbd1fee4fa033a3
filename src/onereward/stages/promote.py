"""promote: registry aliases of the generator — `challenger`, then `champion` once the gates passed — and the
rollback to the previous champion.

The decision is a pure function of (candidate version, current champion version, gate verdict), unit-tested
without MLflow; `apply_decision` carries it out on the registry: `challenger` always moves to the candidate,
`champion` only when the decision promotes, and the new champion's version keeps the version it replaced in the
tag `previous_champion`, which `rollback` (`onereward promote --rollback`) restores. The graph stage that reads
evaluate's verdict lands with evaluate (issue 11).
"""

from __future__ import annotations

from dataclasses import dataclass, field

CHAMPION, CHALLENGER = "champion", "challenger"
PREVIOUS_TAG, ROLLED_BACK_TAG = "previous_champion", "rolled_back_from"


@dataclass(frozen=True)
class Verdict:
    """The evaluate stage's gates: passed, and every reason it did not (or the checks that held)."""

    passed: bool
    reasons: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Decision:
    candidate: str  # becomes `challenger`
    promoted: bool  # `champion` moves to the candidate
    previous_champion: str | None  # what `champion` pointed at before (kept for rollback)
    reasons: list[str]


def decide(candidate: str, champion: str | None, verdict: Verdict) -> Decision:
    if candidate == champion:
        return Decision(candidate, False, champion, [f"version {candidate} is already the champion"])
    if not verdict.passed:
        return Decision(candidate, False, champion,
                        [f"gates failed: {r}" for r in verdict.reasons] or ["gates failed (no reason given)"])
    return Decision(candidate, True, champion, [f"gates passed: {r}" for r in verdict.reasons] or ["gates passed"])


class RollbackError(RuntimeError):
    pass


def alias_version(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def current_champion(client, name: str) -> str | None:
    return alias_version(client, name, CHAMPION)


def apply_decision(client, name: str, decision: Decision) -> None:
    """Move the aliases as decided; the decision's reasons are kept on the candidate's version."""
    client.set_registered_model_alias(name, CHALLENGER, decision.candidate)
    client.set_model_version_tag(name, decision.candidate, "promotion", "; ".join(decision.reasons)[:5000])
    if decision.promoted:
        client.set_model_version_tag(name, decision.candidate, PREVIOUS_TAG, decision.previous_champion or "")
        client.set_registered_model_alias(name, CHAMPION, decision.candidate)


def rollback(client, name: str) -> tuple[str, str]:
    """Point `champion` back at the version the current champion replaced; returns (from, to)."""
    now = current_champion(client, name)
    if now is None:
        raise RollbackError(f"{name}: no version has the alias {CHAMPION!r}; nothing to roll back")
    previous = client.get_model_version(name, now).tags.get(PREVIOUS_TAG, "")
    if not previous:
        raise RollbackError(f"{name}: champion version {now} replaced no earlier champion; nothing to roll back to")
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_model_version_tag(name, previous, ROLLED_BACK_TAG, now)
    return now, previous


class ChampionMoved(RuntimeError):
    """`champion` moved between evaluate and promote: the verdict was about another incumbent."""


def promote(ctx) -> dict[str, float]:
    """The graph stage: evaluate's verdict -> decide -> aliases. Runs only after the gates passed (a refused
    challenger fails evaluate), and refuses to act if `champion` moved since evaluate compared against it."""
    import mlflow

    evaluation = ctx.inputs["evaluation"].read_json("evaluation.json")
    name, candidate = evaluation["candidate"]["name"], evaluation["candidate"]["version"]
    client = mlflow.MlflowClient()
    champion = current_champion(client, name)
    if champion != evaluation["champion"] and champion != candidate:
        raise ChampionMoved(f"promote: {name}@{CHAMPION} is version {champion}, but evaluate compared against "
                            f"{evaluation['champion']}; rerun evaluate (onereward run --force evaluate)")
    decision = decide(candidate, champion, Verdict(evaluation["passed"], evaluation["reasons"]))
    apply_decision(client, name, decision)
    report = f"{ctx.inputs['evaluation'].root}/report.html"  # the committed attempt's file
    ctx.outputs["promotion"].write_json("promotion.json", {
        "name": name, "candidate": candidate, "promoted": decision.promoted,
        "previous_champion": decision.previous_champion, "reasons": decision.reasons, "report": report})
    now = current_champion(client, name)
    print(f"promote: {name}@{CHAMPION} -> version {now}" + (" (promoted)" if decision.promoted else " (unchanged)")
          + f"; report {report}", flush=True)
    return {"promoted": float(decision.promoted), "champion_version": float(now or 0)}
