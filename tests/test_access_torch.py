"""The torch model access keeps the access contract; the copy runner's resume and repair rules."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from access_contract import AccessContract, query_digests, start_run

from daunce_core import Capabilities, ClassificationTask, DaunceConfig, TorchModuleAccess
from daunce_core.errors import DaunceError
from daunce_core.method.config import ComputeConfig, TrainConfig
from daunce_core.method.objectives import Objective
from daunce_core.storage.copies import RunCopies
from daunce_core.storage.layout import RunLayout
from daunce_core.storage.records import CopyRecords
from daunce_core.storage.zarr_store import RunStore


def problem():
    """A small three-class problem and an MLP (seeded)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(160, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    return model, {"x": x[:120], "y": y[:120]}, {"x": x[120:], "y": y[120:]}


def build(objective: Objective | None = None, cls=TorchModuleAccess) -> TorchModuleAccess:
    """The contract's builder: copies of an MLP, a few hundred steps each."""
    model, train, queries = problem()
    config = DaunceConfig(
        num_models=6,
        subset_ratio=0.5 if objective and objective.access == "black_box" else 1.0,
        objective=objective or Objective(labels="sampled", rho=0.1),
        train=TrainConfig(lr=0.05, epochs=20, batch_size=16),
    )
    compute = ComputeConfig(device="cpu")
    return cls(model, ClassificationTask(), train, queries, config, 1e-3, compute=compute)


class TestTorchModuleAccess(AccessContract):
    builder = "test_access_torch:build"


class NotReproducible(TorchModuleAccess):
    """A torch access that declares its copies cannot be reproduced (as a paid API's)."""

    kind = "not-reproducible"
    capabilities = dataclasses.replace(TorchModuleAccess.capabilities, deterministic=False)


@pytest.fixture
def finished(tmp_path):
    """A run of four finished copies, and its losses."""
    access = build()
    run = RunLayout(tmp_path / "runs" / "r")
    start_run(run, access, 4).complete(range(4))
    store = RunStore(run.store)
    return access, run, store.open("losses_train")[:], store.open("losses_query")[:]


def test_capabilities_are_checked_against_the_objective():
    limited = Capabilities(
        gradients=False, fine_tuning=True, custom_objective=False, deterministic=False
    )
    from daunce_core.access.base import check_objective

    with pytest.raises(DaunceError, match="lacks gradients"):
        check_objective("api", limited, Objective())
    with pytest.raises(DaunceError, match="custom_objective"):
        check_objective("api", limited, Objective(access="black_box", variant="efim"))
    check_objective("api", limited, Objective(access="black_box"))
    queries_only = Capabilities(
        gradients=False, fine_tuning=False, custom_objective=False, deterministic=True
    )
    with pytest.raises(DaunceError, match="fine_tuning or custom_objective"):
        check_objective("nothing", queries_only, Objective(access="black_box"))


def test_a_damaged_or_deleted_loss_chunk_is_measured_again_without_training(finished):
    access, run, train, query = finished
    chunks = sorted((run.store / "losses_train" / "c").rglob("*"))
    files = [c for c in chunks if c.is_file()]
    files[1].write_bytes(b"\x00garbage" * 7)  # row 1: undecodable
    next(f for f in sorted((run.store / "losses_query" / "c").rglob("*")) if f.is_file()).unlink()
    report = RunCopies(access, run, query_digests(access)).complete(range(4))
    assert report.trained == []
    assert sorted(report.remeasured) == [0, 1]
    store = RunStore(run.store)
    np.testing.assert_array_equal(store.open("losses_train")[:], train)
    np.testing.assert_array_equal(store.open("losses_query")[:], query)


def test_only_unfinished_copies_train_not_their_group(tmp_path):
    access = build()
    run = RunLayout(tmp_path / "runs" / "r")
    copies = start_run(run, access, 4)
    copies.complete([0, 2])
    report = copies.complete(range(4))
    assert report.trained == [1, 3]
    assert [r.attempts for r in CopyRecords(run.copies).read_many(range(4))] == [1, 1, 1, 1]


def test_new_or_changed_queries_are_measured_from_the_saved_copies(finished):
    access, run, _, query = finished
    changed = [f"other{j}" for j in range(access.num_queries)]
    report = RunCopies(access, run, changed).complete(range(4))
    assert (report.trained, sorted(report.queries_added_to)) == ([], [0, 1, 2, 3])
    back = RunCopies(access, run, query_digests(access)).complete(range(4))
    assert back.trained == []
    np.testing.assert_array_equal(RunStore(run.store).open("losses_query")[:], query)


def test_lost_parameters_retrain_a_deterministic_copy_and_say_so(finished):
    access, run, _, _query = finished
    run.copy(2).unlink()
    report = RunCopies(access, run, ["new", *query_digests(access)[1:]]).complete(range(4))
    assert report.retrained_lost == [2]
    assert report.trained == [2]


def test_lost_parameters_of_a_copy_that_cannot_be_reproduced_are_named(tmp_path):
    access = build(cls=NotReproducible)
    run = RunLayout(tmp_path / "runs" / "r")
    start_run(run, access, 3).complete(range(3))
    run.copy(1).write_bytes(b"truncated")
    changed = ["new", *query_digests(access)[1:]]
    with pytest.raises(DaunceError, match=r"copy-000001\.safetensors.*cannot be reproduced"):
        RunCopies(access, run, changed).complete(range(3))
    assert CopyRecords(run.copies).read(1).attempts == 1  # nothing was trained again


def test_a_damaged_record_is_named(finished):
    _, run, _, _ = finished
    CopyRecords(run.copies).path(3).write_text("{not json")
    with pytest.raises(DaunceError, match=r"copy-000003\.json.*damaged"):
        CopyRecords(run.copies).read(3)
    assert CopyRecords(run.copies).counts(4) == {"done": 3, "damaged": 1}


class SubmitsJobs(TorchModuleAccess):
    """A torch access that, like a fine-tuning API, submits one external job per copy.

    The first training is interrupted after its jobs were submitted (as a kill would).
    """

    kind = "submits-jobs"
    submitted: list[str]
    interrupted = False

    def train(self, ks, journal=None):
        for k in ks:
            if journal.job_id(k) is None:
                job = f"job-{k}-{len(self.submitted)}"
                self.submitted.append(job)
                journal.record_job(k, job)
        if not self.interrupted:
            type(self).interrupted = True
            raise KeyboardInterrupt("killed while waiting for the jobs")
        return super().train(ks, journal)


def test_a_recorded_job_is_resumed_never_submitted_again(tmp_path):
    access = build(cls=SubmitsJobs)
    access.submitted = []
    run = RunLayout(tmp_path / "runs" / "r")
    copies = start_run(run, access, 3)
    with pytest.raises(KeyboardInterrupt):
        copies.complete(range(3))
    records = CopyRecords(run.copies)
    assert [r.job_id for r in records.read_many(range(3))] == ["job-0-0", "job-1-1", "job-2-2"]
    assert [r.status for r in records.read_many(range(3))] == ["training"] * 3
    copies.complete(range(3))
    assert access.submitted == ["job-0-0", "job-1-1", "job-2-2"]
    assert [r.status for r in records.read_many(range(3))] == ["done"] * 3
    assert [r.attempts for r in records.read_many(range(3))] == [2, 2, 2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_copies_on_cuda_match_the_cpu():
    model, train, queries = problem()
    config = DaunceConfig(num_models=4, subset_ratio=1.0, objective=Objective(labels="sampled"))
    rows = {
        device: TorchModuleAccess(
            model,
            ClassificationTask(),
            train,
            queries,
            config,
            1e-3,
            compute=ComputeConfig(device=device),
        ).run(range(4))
        for device in ("cpu", "cuda")
    }
    np.testing.assert_allclose(rows["cuda"].train, rows["cpu"].train, rtol=1e-3, atol=1e-4)


def test_saved_tensors_get_the_mode_of_every_other_workspace_file(tmp_path):
    """safetensors writes 0600; a shared workspace's copies and models must be readable alike."""
    import os

    from daunce_core.storage.files import save_tensors, share

    umask = os.umask(0o022)
    os.umask(umask)
    expected = 0o666 & ~umask
    save_tensors({"w": torch.zeros(3)}, tmp_path / "copy.safetensors")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "model.bin").write_bytes(b"x")
    os.chmod(tmp_path / "folder" / "model.bin", 0o600)
    share(tmp_path / "folder")
    for path in (tmp_path / "copy.safetensors", tmp_path / "folder" / "model.bin"):
        assert os.stat(path).st_mode & 0o777 == expected
