"""The ``curate`` flow: a scheduled data-curation run.

Attributes the configuration's (newest) data — only what changed is recomputed — then flags the
training examples with the highest self-influence (the variance of their loss across the
perturbed copies: mislabelled, duplicated-with-conflict and atypical examples stand out) and
writes a report: ``<run>/reports/curation.md`` and ``curation.parquet``, plus a lineage record.
Each flagged example comes with its label and, for classification, the base model's predicted
class and its probability, so that a curator can judge it.
"""

from __future__ import annotations

import polars as pl
from prefect import flow

from daunce_core.storage.exports import write_parquet
from daunce_core.storage.layout import RunLayout, Workspace
from daunce_core.storage.lineage import Lineage
from flows.attribute import run_attribute
from flows.config import load_config


def _report(flagged: pl.DataFrame, run_id: str, total: int, label: str | None) -> str:
    """The Markdown report: the flagged examples with their label, and the base model's answer.

    ``label`` names the task's label column; the base model's ``predicted`` class and its
    ``probability`` are shown where the run measured them (classification).
    """
    judged = "predicted" in flagged.columns
    lines = [
        f"# Curation report — {run_id}",
        "",
        f"{flagged.height} of {total} training examples with the highest self-influence "
        "(review these first: likely mislabelled, conflicting or atypical).",
    ]
    if judged:
        lines += [
            "",
            f"`{label}` is the example's label; `predicted` the base model's class for it, with "
            "its probability. A confident prediction that disagrees with the label (marked ≠) "
            "points at a wrong label; agreement points at an atypical example.",
        ]
    header = ["rank", "example_id"]
    if "label" in flagged.columns:
        header.append(label or "label")
    if judged:
        header += ["predicted (probability)", ""]
    header += ["self_influence", "total_positive", "total_negative"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rank, row in enumerate(flagged.iter_rows(named=True), start=1):
        cells = [str(rank), str(row["train_id"])]
        if "label" in flagged.columns:
            cells.append(_value(row["label"]))
        if judged:
            known = row["predicted"] is not None
            answer = f"{row['predicted']} ({row['probability']:.3f})" if known else ""
            differs = known and row.get("label") is not None and row["predicted"] != row["label"]
            cells += [answer, "≠" if differs else ""]
        cells += [
            f"{row['self_influence']:.4g}",
            f"{row['total_positive']:.4g}",
            f"{row['total_negative']:.4g}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _value(value) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _judged(flagged: pl.DataFrame, predictions: str | None) -> pl.DataFrame:
    """``flagged`` with the label, the base model's predicted class and its probability."""
    if not predictions:
        return flagged
    wanted = ["example_id", "label", "predicted", "probability"]
    table = pl.read_parquet(predictions).filter(pl.col("split") == "train")
    table = table.select([c for c in wanted if c in table.columns])
    if table.width == 1:
        return flagged
    return flagged.join(table.rename({"example_id": "train_id"}), on="train_id", how="left")


@flow(name="curate", log_prints=True)
def curate_flow(config_path: str, flag_top: int = 20, workspace: str | None = None) -> dict:
    """Attribute the data of ``config_path``; flag the ``flag_top`` most self-influential.

    ``workspace`` (relative: to the current folder) replaces the configuration's: a scheduled
    run keeps its own (prefect.yaml: ``daunce-nightly``), apart from interactive runs and the
    demo, which would otherwise share its run folder and lock.
    """
    config = load_config(config_path, workspace=workspace)
    summary = run_attribute(config)
    run = RunLayout(summary["run_dir"])
    aggregates = pl.read_parquet(run.export("example_influence"))
    flagged = aggregates.sort("self_influence", descending=True).head(flag_top)
    flagged = _judged(flagged, summary.get("base_model", {}).get("predictions"))
    reports = run.reports
    reports.mkdir(exist_ok=True)
    write_parquet(flagged, reports / "curation.parquet")
    label = config.task.get("label") or config.task.get("target") or "y"
    report = _report(flagged, summary["run_id"], aggregates.height, label)
    (reports / "curation.md").write_text(report)
    Lineage(Workspace(config.workspace).lineage).record_evaluation(
        summary["run_id"],
        "curation.flagged",
        float(flagged.height),
        {"report": str(reports / "curation.md"), "ids": flagged["train_id"].to_list()},
    )
    print(f"flagged {flagged.height} examples; report: {reports / 'curation.md'}")
    return {
        "run_id": summary["run_id"],
        "flagged": flagged["train_id"].to_list(),
        "report": str(reports / "curation.md"),
    }
