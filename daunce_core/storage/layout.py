"""Every path and file name of a workspace, in one place.

A workspace is one folder (default ``./daunce-runs``)::

    <workspace>/
      lineage.duckdb                  runs, parameters, artefacts, edges, task runs, evaluations
      .lock                           one run at a time (`Workspace.lock`)
      .prefect/                       Prefect's home, results and cache keys
      data/<key>/                     canonical splits, content-addressed (shared by runs)
      models/<key>/base.safetensors   base models, content-addressed
      signals/<key>/signals.safetensors   base signals, content-addressed
      truth/<key>/                    LDS ground truth (Zarr outcomes), shared by runs
      runs/<run_id>/                  one run (`RunLayout`)

    runs/<run_id>/
      run.json                        the run's identity (a folder holds one configuration)
      summary.json                    the last summary printed
      store/                          Zarr: losses_train K×n, losses_query K×m, scores n×m, ...
      copies/copy-000007.json         copy 7's record (status, attempts, job id, digests)
      copies/copy-000007.safetensors  copy 7's trained parameters (or adapter)
      exports/<name>.parquet          top-k tables, per-example aggregates, the example index
      baselines/<method>/             a baseline's store/ and exports/, as for DAUNCE
      evaluations/<name>.parquet      LDS and subset-removal results
      removal/                        subset-removal retraining outcomes (Zarr)
      reports/                        curation reports

Artefacts shared by runs are content-addressed: ``<kind>/<first 16 hex digits of the digest of
their inputs>``, so a run that changes only DAUNCE's settings reuses another's base model.
Each artefact produced by a step has a *manifest* beside it (``<artefact>.done.json``,
`daunce_core.storage.manifest`): its done signal. `VIEW_GLOBS` names the Parquet files the
lineage database's views read, relative to ``runs/``.
"""

from __future__ import annotations

from pathlib import Path

SHARED_KINDS = ("data", "models", "signals", "truth")
"""Folders of content-addressed artefacts that several runs share."""

TEMPORARY = ("*.partial", "*.partial.*", ".tmp*")
"""Names of temporary files: zarr chunks and our Parquet/NPZ/JSON writes (``*.partial``),
safetensors saves (``.tmp*``). Each is renamed into place when complete."""

VIEW_GLOBS = {
    "top_proponents": (
        "*/exports/top_proponents.parquet",
        "*/baselines/*/exports/top_proponents.parquet",
    ),
    "top_opponents": (
        "*/exports/top_opponents.parquet",
        "*/baselines/*/exports/top_opponents.parquet",
    ),
    "example_influence": ("*/exports/example_influence.parquet",),
    "examples": ("*/exports/examples.parquet",),
    "lds_results": ("*/evaluations/lds-*.parquet",),
    "lds_per_query": ("*/evaluations/lds_per_query-*.parquet",),
    "removal_results": ("*/evaluations/removal.parquet",),
}
"""The lineage database's views over Parquet files, as globs relative to ``runs/``: the exports
of DAUNCE (and of the baselines, told apart by ``method``), and the evaluation results."""


class Workspace:
    """Paths of a workspace folder (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def lineage(self) -> Path:
        """The DuckDB lineage database."""
        return self.root / "lineage.duckdb"

    @property
    def lock(self) -> Path:
        """The lock file a run holds while it writes in the workspace."""
        return self.root / ".lock"

    @property
    def prefect(self) -> Path:
        """Prefect's folder: ``home/``, ``results/`` and ``cache-keys/``."""
        return self.root.resolve() / ".prefect"

    @property
    def runs(self) -> Path:
        """The folder holding every run's folder."""
        return self.root / "runs"

    def run(self, run_id: str) -> RunLayout:
        """The layout of run ``run_id``."""
        return RunLayout(self.runs / run_id)

    def shared(self, kind: str, key: str) -> Path:
        """Folder of a shared artefact of ``kind`` whose inputs digest to ``key``."""
        if kind not in SHARED_KINDS:
            raise ValueError(f"shared artefact kinds are {SHARED_KINDS}; got {kind!r}")
        return self.root / kind / key[:16]

    def data(self, key: str) -> Path:
        """A canonical split's folder (``index.parquet`` and its columns)."""
        return self.shared("data", key)

    def base_model(self, key: str) -> Path:
        """A base model's parameters."""
        return self.shared("models", key) / "base.safetensors"

    def signals(self, key: str) -> Path:
        """A base model's signals on the training set."""
        return self.shared("signals", key) / "signals.safetensors"

    def truth(self, key: str) -> Path:
        """An LDS ground truth's Zarr store."""
        return self.shared("truth", key)

    def scratch_folders(self) -> list[Path]:
        """The shared folders where a killed writer may leave temporary files."""
        return [self.root / kind for kind in SHARED_KINDS]


class RunLayout:
    """Paths inside one run's folder (``<workspace>/runs/<run_id>``), or a baseline's."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def run_id(self) -> str:
        """The run's id: its folder's name."""
        return self.root.name

    @property
    def workspace(self) -> Workspace:
        """The workspace holding this run."""
        return Workspace(self.root.parent.parent)

    @property
    def identity(self) -> Path:
        """``run.json``: the configuration identity this folder holds."""
        return self.root / "run.json"

    @property
    def summary(self) -> Path:
        """``summary.json``: the summary of the last run."""
        return self.root / "summary.json"

    @property
    def store(self) -> Path:
        """The run's Zarr arrays (`daunce_core.storage.zarr_store.RunStore`)."""
        return self.root / "store"

    @property
    def scores(self) -> Path:
        """The score matrix ``[n_train, m_query]`` (a Zarr array inside the store)."""
        return self.store / "scores"

    @property
    def copies(self) -> Path:
        """The folder of the copies' records and parameters."""
        return self.root / "copies"

    def copy(self, k: int, suffix: str = ".safetensors") -> Path:
        """The trained parameters (or adapter, or an API copy's model id) of copy ``k``."""
        return copy_file(self.copies, k, suffix)

    def copy_record(self, k: int) -> Path:
        """The record of perturbed copy ``k`` (`daunce_core.storage.records`)."""
        return copy_file(self.copies, k, ".json")

    @property
    def exports(self) -> Path:
        """The folder of the Parquet exports."""
        return self.root / "exports"

    def export(self, name: str) -> Path:
        """Parquet export ``name``."""
        return self.exports / f"{name}.parquet"

    def baseline(self, name: str) -> RunLayout:
        """The store and exports of baseline ``name``, laid out like the run's own."""
        return RunLayout(self.root / "baselines" / name)

    @property
    def evaluations(self) -> Path:
        """The folder of evaluation results (LDS, subset removal)."""
        return self.root / "evaluations"

    def evaluation(self, name: str) -> Path:
        """Evaluation result ``name`` (Parquet)."""
        return self.evaluations / f"{name}.parquet"

    @property
    def removal(self) -> Path:
        """The subset-removal retraining outcomes (Zarr)."""
        return self.root / "removal"

    @property
    def reports(self) -> Path:
        """The folder of curation reports."""
        return self.root / "reports"


def copy_file(folder: str | Path, k: int, suffix: str) -> Path:
    """Copy ``k``'s file with ``suffix`` in a run's copies folder: ``copy-000007<suffix>``."""
    return Path(folder) / f"copy-{k:06d}{suffix}"


def manifest_of(artefact: str | Path) -> Path:
    """The manifest beside an artefact file or folder: ``<name without suffix>.done.json``."""
    artefact = Path(artefact)
    return artefact.with_name(f"{artefact.name.split('.')[0]}.done.json")


def remove_partials(folder: str | Path) -> list[str]:
    """Delete orphan temporary files (`TEMPORARY`) below ``folder``; return their paths."""
    folder = Path(folder)
    if not folder.exists():
        return []
    orphans = sorted(
        {str(p) for pattern in TEMPORARY for p in folder.rglob(pattern) if p.is_file()}
    )
    for path in orphans:
        Path(path).unlink(missing_ok=True)
    return orphans
