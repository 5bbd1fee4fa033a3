"""Data validation at stage boundaries with great-expectations (ephemeral context, pandas batches).

A failing suite raises DataValidationError naming each failing expectation, its column and the first
offending row ids; the full result is logged to MLflow by the caller's stage run.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from onereward import tracking


class DataValidationError(ValueError):
    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


@dataclass
class Expect:
    """One expectation: a great_expectations.expectations class name and its keyword arguments."""

    kind: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@functools.cache
def _pandas_source() -> Any:
    """One ephemeral context and pandas source a process: building them writes the context's config
    (YAML) several times, 50 ms a suite that was paid four times a run of the data stages."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = {"globally": False}
    return ctx.data_sources.add_pandas("onereward")


def _batch(name: str, df: pd.DataFrame) -> Any:
    source = _pandas_source()
    if name in source.get_asset_names():
        definition = source.get_asset(name).get_batch_definition("all")
    else:
        definition = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
    return definition.get_batch(batch_parameters={"dataframe": df})


def run_suite(name: str, df: pd.DataFrame, expectations: list[Expect], id_column: str) -> dict[str, Any]:
    import great_expectations as gx

    batch = _batch(name, df)
    # built whole: add_expectation compares each new expectation with every one before it
    suite = gx.ExpectationSuite(name=name, expectations=[getattr(gx.expectations, e.kind)(**e.kwargs)
                                                         for e in expectations])
    ids = [id_column] if id_column in df.columns else []
    # pass / fail first: the complete result (each failure's rows and observed values) costs GX 2-5x as much,
    # and a passing suite reports none of it
    result = batch.validate(suite, result_format={"result_format": "BOOLEAN_ONLY"})
    if not result.success:
        result = batch.validate(
            suite,
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ids},
        )
    failures = []
    for r in result.results:
        if r.success:
            continue
        cfg = r.expectation_config
        kwargs = {k: v for k, v in cfg.kwargs.items() if k != "batch_id"}
        rows = [row.get(id_column) for row in (r.result.get("unexpected_index_list") or [])[:10]]
        missing = (r.result.get("details") or {}).get("mismatched", {}).get("missing")
        failures.append({"expectation": cfg.type, "kwargs": kwargs, "rows": rows,
                         "observed": {"missing": missing} if missing else r.result.get("observed_value"),
                         "unexpected_count": r.result.get("unexpected_count")})
    report = {"suite": name, "success": bool(result.success), "rows": len(df), "failures": failures}
    tracking.log_dict(report, f"validation/{name}.json")
    tracking.log_metrics({f"validation.{name}.success": float(result.success)})
    return report


def validate(name: str, df: pd.DataFrame, expectations: list[Expect], id_column: str) -> dict[str, Any]:
    report = run_suite(name, df, expectations, id_column)
    if not report["success"]:
        lines = [f"data validation {name!r} failed on {len(report['failures'])} expectation(s):"]
        for f in report["failures"]:
            where = f"column {f['kwargs'].get('column')!r}" if "column" in f["kwargs"] else str(f["kwargs"])
            rows = f", rows {f['rows']}" if f["rows"] else ""
            obs = f", observed {f['observed']}" if f["observed"] is not None else ""
            lines.append(f"  {f['expectation']} on {where}{rows}{obs}")
        raise DataValidationError("\n".join(lines), report)
    return report


def _present(cols: list[str]) -> list[Expect]:
    """Every column exists (one expectation naming the missing ones) and holds no null."""
    return [Expect("ExpectTableColumnsToMatchSet", {"column_set": cols, "exact_match": False}),
            *(Expect("ExpectColumnValuesToNotBeNull", {"column": c}) for c in cols)]


def curated_suite(min_side: int) -> list[Expect]:
    required = ["image_id", "source", "origin", "width", "height", "image", "phash"]
    return [
        *_present(required),
        Expect("ExpectColumnValuesToBeUnique", {"column": "image_id"}),
        Expect("ExpectColumnValuesToBeBetween", {"column": "width", "min_value": min_side}),
        Expect("ExpectColumnValuesToBeBetween", {"column": "height", "min_value": min_side}),
        Expect("ExpectColumnValuesToBeInSet", {"column": "decodable", "value_set": [True]}),
        Expect("ExpectTableRowCountToBeBetween", {"min_value": 1}),
    ]


def conditions_suite(tasks: list[str]) -> list[Expect]:
    required = ["condition_id", "image_id", "task", "image", "mask", "prompt", "mask_coverage", "split"]
    return [
        *_present(required),
        Expect("ExpectColumnValuesToBeUnique", {"column": "condition_id"}),
        Expect("ExpectColumnValuesToBeInSet", {"column": "task", "value_set": tasks}),
        Expect("ExpectColumnValuesToBeInSet", {"column": "split", "value_set": ["train", "heldout"]}),
        Expect("ExpectColumnValuesToBeInSet", {"column": "decodable", "value_set": [True]}),
        Expect("ExpectColumnValueLengthsToBeBetween", {"column": "prompt", "min_value": 1}),
        Expect("ExpectTableRowCountToBeBetween", {"min_value": 1}),
        # the coverage measured on the decoded mask, within its task's range (the row's coverage_low and
        # coverage_high), and the declared coverage agreeing with it
        Expect("ExpectColumnPairValuesAToBeGreaterThanB", {"column_A": "measured_coverage",
                                                            "column_B": "coverage_low", "or_equal": True}),
        Expect("ExpectColumnPairValuesAToBeGreaterThanB", {"column_A": "coverage_high",
                                                            "column_B": "measured_coverage", "or_equal": True}),
        Expect("ExpectColumnValuesToBeInSet", {"column": "coverage_as_declared", "value_set": [True]}),
    ]


def task_mix_frame(tasks: pd.Series, mix: dict[str, float], tolerance: float) -> pd.DataFrame:
    """Observed share and count per task with their allowed bands: the configured tolerance, widened to
    three binomial standard deviations when there are too few rows for the tolerance to be meaningful;
    and a task expected at least 5 times must appear at all, however wide the band."""
    total = sum(mix.values())
    counts = tasks.value_counts()
    n = max(len(tasks), 1)
    rows = []
    for t, w in mix.items():
        p = w / total
        band = max(tolerance, 3 * (p * (1 - p) / n) ** 0.5)
        rows.append({"task": t, "share": float(counts.get(t, 0)) / n, "low": max(0.0, p - band),
                     "high": min(1.0, p + band), "count": int(counts.get(t, 0)),
                     "min_count": 1 if n * p >= 5 else 0})
    return pd.DataFrame(rows)


TASK_MIX_SUITE = [
    Expect("ExpectColumnPairValuesAToBeGreaterThanB", {"column_A": "share", "column_B": "low", "or_equal": True}),
    Expect("ExpectColumnPairValuesAToBeGreaterThanB", {"column_A": "high", "column_B": "share", "or_equal": True}),
    Expect("ExpectColumnPairValuesAToBeGreaterThanB", {"column_A": "count", "column_B": "min_count",
                                                        "or_equal": True}),
]
