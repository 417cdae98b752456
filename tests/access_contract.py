"""The contract every model-access kind keeps (after zarr's store contract tests).

A kind's test module subclasses `AccessContract` and names, in ``builder``, a module-level
function ``build(objective=None) -> ModelAccess`` over a small problem (data, base model,
settings). The contract: capabilities declared and enforced before anything runs; a
deterministic kind gives the same copy for the same ``(seed, k)`` whatever group it trains in;
saved copies evaluate as the trained ones; and a run of `RunCopies` killed with SIGKILL resumes
without training any finished copy again, ending with the losses of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from daunce_core.access import KINDS, Capabilities, ModelAccess
from daunce_core.access.base import lacks
from daunce_core.errors import DaunceError
from daunce_core.method.objectives import Objective
from daunce_core.storage.copies import RunCopies
from daunce_core.storage.layout import RunLayout
from daunce_core.storage.records import CopyRecords
from daunce_core.storage.zarr_store import RunStore

OBJECTIVES = [
    Objective(),
    Objective(labels="sampled"),
    Objective(variant="efim"),
    Objective(variant="trak"),
    Objective(access="black_box"),
    Objective(access="black_box", variant="efim"),
]

RUNNER = """
import importlib, json, sys
from daunce_core.storage.copies import RunCopies
from daunce_core.storage.layout import RunLayout
from daunce_core.storage.zarr_store import RunStore
module, function = sys.argv[1].split(":")
access = getattr(importlib.import_module(module), function)()
run = RunLayout(sys.argv[2])
RunStore(run.store).ensure(int(sys.argv[3]), access.num_train, access.num_queries)
copies = RunCopies(access, run, json.loads(sys.argv[4]))
for k in range(int(sys.argv[3])):
    report = copies.complete([k])
    print("trained", report.trained, flush=True)
"""


def query_digests(access: ModelAccess) -> list[str]:
    """Stand-in per-query digests (the pipeline's come from the canonical data)."""
    return [f"q{j}" for j in range(access.num_queries)]


def start_run(run: RunLayout, access: ModelAccess, num_models: int) -> RunCopies:
    """A fresh run folder's store, and the copies of ``access`` in it."""
    RunStore(run.store).ensure(num_models, access.num_train, access.num_queries)
    return RunCopies(access, run, query_digests(access))


class AccessContract:
    """Tests every `ModelAccess` kind passes; subclasses set ``builder``."""

    builder: str = ""
    """``"module:function"`` building the kind's access on a small problem."""

    num_models: int = 6

    def build(self, objective: Objective | None = None) -> ModelAccess:
        module, function = self.builder.split(":")
        return getattr(importlib.import_module(module), function)(objective)

    def test_declares_its_kind_and_capabilities(self):
        access = self.build()
        assert isinstance(access.capabilities, Capabilities)
        assert KINDS.get(access.kind) is type(access) or access.kind not in KINDS

    @pytest.mark.parametrize("objective", OBJECTIVES, ids=repr)
    def test_refuses_exactly_the_objectives_it_lacks_capabilities_for(self, objective):
        missing = list(lacks(self.build().capabilities, objective))
        if missing:
            with pytest.raises(DaunceError, match=missing[0].split("|")[0]):
                self.build(objective)
        else:
            self.build(objective).check(objective)

    def test_a_copy_does_not_depend_on_its_group(self):
        access = self.build()
        if not access.capabilities.deterministic:
            pytest.skip("not deterministic")
        together = access.evaluate([0, 1, 2], access.train([0, 1, 2]))
        alone = access.evaluate([1], access.train([1]))
        np.testing.assert_array_equal(together.train[1], alone.train[0])
        np.testing.assert_array_equal(together.query[1], alone.query[0])

    def test_saved_copies_evaluate_as_trained(self, tmp_path):
        access = self.build()
        trained = access.train([3, 4])
        paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
        for g, path in enumerate(paths):
            access.save_copy(trained, g, path)
        before = access.evaluate([3, 4], trained)
        after = access.evaluate([3, 4], access.load_copies(paths))
        np.testing.assert_array_equal(before.train, after.train)
        np.testing.assert_array_equal(before.query, after.query)
        tail = access.measure_queries(access.load_copies(paths), 2)
        np.testing.assert_array_equal(tail, before.query[:, 2:])

    def test_resume_after_sigkill_trains_no_finished_copy_again(self, tmp_path):
        access = self.build()
        killed = RunLayout(tmp_path / "ws" / "runs" / "killed")
        proc = self._start(killed, access)
        records = CopyRecords(killed.copies)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not self._finished(records, 2):
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        before = {r.k: r for r in records.read_many(range(self.num_models)) if r.finished}
        assert 2 <= len(before) < self.num_models
        report = start_run(killed, access, self.num_models).complete(range(self.num_models))
        assert not set(report.trained) & set(before)
        for record in records.read_many(before):
            assert record.attempts == 1
        clean = RunLayout(tmp_path / "ws" / "runs" / "clean")
        start_run(clean, access, self.num_models).complete(range(self.num_models))
        for name in ("losses_train", "losses_query"):
            resumed = RunStore(killed.store).open(name)[:]
            np.testing.assert_array_equal(resumed, RunStore(clean.store).open(name)[:])

    def _start(self, run: RunLayout, access: ModelAccess) -> subprocess.Popen:
        root = Path(__file__).resolve().parent
        env = os.environ | {"PYTHONPATH": f"{root}:{root.parent}"}
        args = [self.builder, str(run.root), str(self.num_models)]
        args.append(json.dumps(query_digests(access)))
        return subprocess.Popen(
            [sys.executable, "-c", RUNNER, *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    @staticmethod
    def _finished(records: CopyRecords, count: int) -> bool:
        finished = 0
        for path in records.folder.glob("copy-*.json"):
            with contextlib.suppress(OSError, ValueError):
                finished += json.loads(path.read_text())["status"] in ("done", "diverged")
        return finished >= count
