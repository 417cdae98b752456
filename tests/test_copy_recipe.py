"""The copies' step from curvature (``lr: auto``) and the convergence criterion (``tolerance``)."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from daunce_core import (
    ClassificationTask,
    ComputeConfig,
    DaunceConfig,
    DaunceError,
    DaunceWarning,
    RegressionTask,
    TorchModuleAccess,
    TrainConfig,
)
from daunce_core.evaluation.problems import linear_regression, logistic_regression


def copies(problem, config, **compute):
    return TorchModuleAccess(
        problem.model,
        problem.task,
        problem.train,
        problem.queries,
        config,
        base_l2=problem.l2,
        compute=ComputeConfig(**compute),
    )


def test_auto_step_is_one_minus_momentum_over_the_largest_curvature():
    """Least squares: the objective's Hessian is X̃ᵀX̃/n + λ (X̃ = [x, 1]) whatever ξ is."""
    problem = linear_regression(n=200, d=5, l2=0.05)
    config = DaunceConfig(
        num_models=2,
        dtype="float64",
        prox=0.05,
        train=TrainConfig(lr="auto", momentum=0.8, epochs=1),
    )
    trained = copies(problem, config).train([0, 1])
    x = torch.cat([problem.train["x"], torch.ones(200, 1, dtype=torch.float64)], dim=1)
    largest = float(torch.linalg.eigvalsh(x.T @ x / 200)[-1]) + 0.05
    assert trained.lr == pytest.approx(0.2 / largest, rel=2e-3)  # Lanczos to ~1e-3


def test_auto_step_is_the_same_for_every_group_and_keeps_copies_independent_of_grouping():
    problem = logistic_regression(n=90, d=4)
    config = DaunceConfig(num_models=5, train=TrainConfig(lr="auto", epochs=2, tolerance=0.3))
    access = copies(problem, config)
    together = access.train(range(5))
    apart = [access.train([k]) for k in (4, 2, 0, 1, 3)]
    assert {round(t.lr, 12) for t in apart} == {round(together.lr, 12)}
    order = dict(zip((4, 2, 0, 1, 3), apart, strict=True))
    for k in range(5):
        for name, p in together.params.items():
            torch.testing.assert_close(p[k], order[k].params[name][0], rtol=1e-5, atol=1e-6)
        assert together.copy_steps[k] == order[k].copy_steps[0]
        assert together.residual[k] == pytest.approx(order[k].residual[0], rel=1e-4)


def test_a_converged_copy_stops_and_is_held_where_it_stopped():
    problem = linear_regression(n=64, d=3, l2=0.1)
    train = TrainConfig(lr="auto", epochs=300, batch_size=64, tolerance=0.05, schedule="constant")
    config = DaunceConfig(num_models=3, dtype="float64", subset_ratio=1.0, train=train)
    trained = copies(problem, config).train(range(3))
    assert (trained.residual <= 0.05).all()
    assert (trained.copy_steps < 300).all()  # full-batch GD with momentum converges early
    assert trained.steps == trained.copy_steps.max()
    summary = trained.summary(0, 0.05)
    assert summary["converged"] is True
    assert summary["steps"] == int(trained.copy_steps[0])
    # Training longer does not move a copy that stopped.
    longer = copies(problem, DaunceConfig(**{**config.__dict__, "train": train})).train(range(3))
    for name, p in trained.params.items():
        torch.testing.assert_close(p, longer.params[name])


def test_an_unconverged_copy_is_recorded_as_such():
    problem = logistic_regression(n=90, d=4)
    train = TrainConfig(lr="auto", steps=3, batch_size=16, tolerance=1e-6)
    trained = copies(problem, DaunceConfig(num_models=2, train=train)).train([0, 1])
    assert trained.steps == 3
    assert (trained.copy_steps == 3).all()
    assert (trained.residual > 1e-6).all()
    assert trained.summary(1, 1e-6)["converged"] is False


def test_convergence_is_judged_on_whole_epochs_only():
    problem = linear_regression(n=64, d=3, l2=0.1)

    def trained(steps, tolerance=0.99):
        train = TrainConfig(
            lr="auto", steps=steps, batch_size=16, tolerance=tolerance, schedule="constant"
        )
        config = DaunceConfig(num_models=2, dtype="float64", train=train)
        return copies(problem, config).train([0, 1])

    partial = trained(2)  # half an epoch: a residual from half the subset judges nothing
    assert (partial.copy_steps == 2).all()
    assert not partial.judged
    assert partial.summary(0, 0.99)["converged"] is False
    whole = trained(4, 1e-6)
    past = trained(6, 1e-6)  # two steps past the epoch's end: the whole epoch's residual stays
    assert (past.copy_steps == 6).all()
    np.testing.assert_array_equal(past.residual, whole.residual)


def test_no_tolerance_records_the_step_only():
    problem = logistic_regression(n=60, d=3)
    trained = copies(problem, DaunceConfig.paper(num_models=2)).train([0, 1])
    assert trained.residual is None
    assert trained.summary(0, None) == {"lr": 0.01, "steps": 1}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"lr": "auto", "optimizer": "adamw"}, "AdamW rescales every step"),
        ({"lr": "fast"}, "lr must be a number > 0 or 'auto'"),
        ({"tolerance": 0.0}, "tolerance must be in \\(0, 1\\)"),
        ({"tolerance": 1.5}, "tolerance must be in \\(0, 1\\)"),
        ({"lr": float("inf")}, "need a finite lr > 0"),
    ],
)
def test_bad_recipes_are_refused_with_the_fix(fields, message):
    with pytest.raises(DaunceError, match=message):
        TrainConfig(**fields)


def test_yaml_numbers_in_exponent_form_are_numbers():
    import yaml

    from daunce_core.conversion import from_dict

    # PyYAML reads 1e-3 as a string (YAML 1.1 wants 1.0e-3): a float field takes it.
    train = from_dict(TrainConfig, yaml.safe_load("{lr: 1e-3, optimizer: adamw}"), "train")
    assert train.lr == 0.001
    with pytest.raises(DaunceError, match="must be a number or one of"):
        from_dict(TrainConfig, {"lr": "1e-3x"}, "train")


def test_auto_step_refuses_a_model_without_curvature():
    x = torch.randn(20, 3)
    model = torch.nn.Linear(3, 2, bias=False)
    torch.nn.init.zeros_(model.weight)
    data = {"x": x * 0, "y": torch.zeros(20, 2)}
    config = DaunceConfig.paper(num_models=2, prox=0.0, train=TrainConfig(lr="auto"))
    access = TorchModuleAccess(model, RegressionTask(), data, data, config)
    with pytest.raises(DaunceError, match=r"give train\.lr as a number"):
        access.train([0, 1])


def test_classification_step_follows_the_gauss_newton_curvature():
    """Softmax regression at θ0: the Hessian of the mean loss, estimated by Lanczos."""
    problem = logistic_regression(n=150, d=4, classes=3, l2=1e-2)
    config = DaunceConfig(num_models=2, dtype="float64", train=TrainConfig(lr="auto"))
    trained = copies(problem, config).train([0, 1])
    params = list(problem.model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def objective(vector):
        weight, bias = vector[:12].reshape(3, 4), vector[12:]
        logits = problem.train["x"] @ weight.T + bias
        loss = torch.nn.functional.cross_entropy(logits, problem.train["y"])
        return loss + 0.5 * 1e-2 * vector.pow(2).sum()

    hessian = torch.autograd.functional.hessian(objective, flat)
    largest = float(torch.linalg.eigvalsh(hessian)[-1])
    assert isinstance(problem.task, ClassificationTask)
    assert trained.lr == pytest.approx(0.1 / largest, rel=5e-3)


def test_the_pipeline_records_each_copys_step_and_convergence(harness, tmp_path, capsys):
    from pipeline_helpers import write_config, write_data

    from daunce_core.storage.lineage import Lineage
    from daunce_core.storage.records import CopyRecords
    from flows.attribute import run_attribute
    from flows.cli import main
    from flows.config import load_config

    data = write_data(tmp_path / "data", n=120, m=10)
    recipe = {"lr": "auto", "epochs": 3, "tolerance": 0.9}
    path = write_config(tmp_path / "run.yaml", tmp_path / "ws", data, num_models=4, train=recipe)
    result = run_attribute(load_config(path))
    records = CopyRecords(Path(result["run_dir"]) / "copies")
    fits = [records.read(k).training for k in range(4)]
    assert len({f["lr"] for f in fits}) == 1
    assert all(f["residual"] > 0 and isinstance(f["converged"], bool) for f in fits)
    assert all(f["steps"] <= 3 * 4 for f in fits)  # 120 examples, batch 32: 4 steps an epoch
    with Lineage(tmp_path / "ws" / "lineage.duckdb").connect(read_only=True) as con:
        rows = con.execute("SELECT k, lr, steps, residual, converged FROM copies ORDER BY k")
        table = rows.fetchall()
    assert [(r[1], r[2], r[4]) for r in table] == [
        (f["lr"], f["steps"], f["converged"]) for f in fits
    ]
    capsys.readouterr()
    assert main(["status", "--workspace", str(tmp_path / "ws")]) == 0
    printed = capsys.readouterr().out
    done = sum(f["converged"] for f in fits)
    assert f"copies' learning rate: {fits[0]['lr']:.4g}; converged: {done} of 4" in printed


def test_copies_far_above_the_base_loss_are_warned_about():
    problem = logistic_regression(n=120, d=4)
    wild = DaunceConfig(num_models=4, train=TrainConfig(lr=300.0, momentum=0.0, epochs=3))
    with pytest.warns(DaunceWarning, match=r"train\.lr: auto"):
        copies(problem, wild).run(range(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DaunceWarning)
        copies(problem, DaunceConfig(num_models=4)).run(range(4))
