"""The attribute flow's DAUNCE defaults (FLOW_DAUNCE) fill what a configuration leaves out."""

import pytest
import yaml
from pipeline_helpers import write_data

from daunce_core.errors import DaunceError
from flows.config import FLOW_DAUNCE, flow_daunce, load_config


def _load(tmp_path, daunce):
    data = write_data(tmp_path / "data", n=20, m=5)
    raw = {
        "data": {"train": {"path": str(data["train"])}, "queries": {"path": str(data["queries"])}},
        "model": {"recipe": {"kind": "linear", "inputs": 64, "outputs": 10}},
    }
    if daunce is not None:
        raw["daunce"] = daunce
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path).daunce


def test_defaults_fill_a_missing_section_and_yield_field_by_field(tmp_path):
    full = _load(tmp_path, None)
    assert full.objective.labels == "sampled"
    assert full.objective.rho == FLOW_DAUNCE["objective"]["rho"]
    assert (full.subset_ratio, full.score) == (1.0, "covariance")
    assert full.num_models == FLOW_DAUNCE["num_models"]
    partial = _load(
        tmp_path, {"num_models": 16, "objective": {"variant": "efim"}, "train": {"lr": 0.2}}
    )
    assert partial.num_models == 16
    assert (partial.objective.variant, partial.objective.labels) == ("efim", "sampled")
    assert (partial.train.lr, partial.train.epochs) == (0.2, FLOW_DAUNCE["train"]["epochs"])


def test_the_paper_form_is_one_section_away_and_black_box_falls_back_to_it(tmp_path):
    paper = _load(
        tmp_path,
        {
            "subset_ratio": 0.3,
            "score": "correlation",
            "objective": {"labels": "observed", "rho": 1},
        },
    )
    assert (paper.subset_ratio, paper.score, paper.objective.labels) == (
        0.3,
        "correlation",
        "observed",
    )
    black = _load(tmp_path, {"objective": {"access": "black_box"}})
    assert (black.objective.access, black.subset_ratio) == ("black_box", 0.3)
    assert flow_daunce({"objective": {"access": "black_box"}}) == {
        "objective": {"access": "black_box"}
    }
    with pytest.raises(DaunceError, match="daunce must be a mapping"):
        _load(tmp_path, "fast")


def test_copies_take_the_base_recipes_optimiser_unless_the_section_sets_it(tmp_path):
    data = write_data(tmp_path / "data", n=20, m=5)
    raw = {
        "data": {"train": {"path": str(data["train"])}, "queries": {"path": str(data["queries"])}},
        "model": {
            "recipe": {"kind": "linear", "inputs": 64, "outputs": 10},
            "train": {"lr": 0.5, "momentum": 0.8, "epochs": 50},
        },
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    inherited = load_config(path).daunce.train
    assert (inherited.lr, inherited.momentum) == (0.5, 0.8)
    assert inherited.epochs == FLOW_DAUNCE["train"]["epochs"]  # not the base model's 50
    raw["daunce"] = {"train": {"lr": 0.05}}
    path.write_text(yaml.safe_dump(raw))
    own = load_config(path).daunce.train
    assert (own.lr, own.momentum) == (0.05, 0.8)
    assert flow_daunce(None)["train"]["lr"] == 0.1  # ModelConfig's default recipe
