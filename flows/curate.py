"""The ``curate`` flow: a scheduled data-curation run.

Attributes the configuration's (newest) data — only what changed is recomputed — then flags the
training examples with the highest self-influence (the variance of their loss across the
perturbed copies: mislabelled, duplicated-with-conflict and atypical examples stand out) and
writes a report: ``<run>/reports/curation.md`` and ``curation.parquet``, plus a lineage record.
"""

from __future__ import annotations

import polars as pl
from prefect import flow

from daunce_core.storage.exports import write_parquet
from daunce_core.storage.layout import RunLayout, Workspace
from daunce_core.storage.lineage import Lineage
from flows.attribute import run_attribute
from flows.config import load_config


def _report(flagged: pl.DataFrame, run_id: str, total: int) -> str:
    lines = [
        f"# Curation report — {run_id}",
        "",
        f"{flagged.height} of {total} training examples with the highest self-influence "
        "(review these first: likely mislabelled, conflicting or atypical).",
        "",
        "| rank | example_id | self_influence | total_positive | total_negative |",
        "|---|---|---|---|---|",
    ]
    for rank, row in enumerate(flagged.iter_rows(named=True), start=1):
        lines.append(
            f"| {rank} | {row['train_id']} | {row['self_influence']:.4g} | "
            f"{row['total_positive']:.4g} | {row['total_negative']:.4g} |"
        )
    return "\n".join(lines) + "\n"


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
    reports = run.reports
    reports.mkdir(exist_ok=True)
    write_parquet(flagged, reports / "curation.parquet")
    (reports / "curation.md").write_text(_report(flagged, summary["run_id"], aggregates.height))
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
