"""The attribute flow's DAUNCE defaults (FLOW_DAUNCE) fill what a configuration leaves out."""

import pytest
import yaml
from pipeline_helpers import write_data

from daunce_core import DaunceConfig
from daunce_core.conversion import from_dict
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
    assert full == DaunceConfig()  # one default: the library's is the pipeline's
    assert (full.objective.labels, full.objective.rho) == ("sampled", 0.1)
    assert (full.subset_ratio, full.score, full.train.lr) == (1.0, "subspace", "auto")
    assert full.num_models == FLOW_DAUNCE["num_models"] == 256
    partial = _load(
        tmp_path, {"num_models": 16, "objective": {"variant": "efim"}, "train": {"lr": 0.2}}
    )
    assert partial.num_models == 16
    assert (partial.objective.variant, partial.objective.labels) == ("efim", "sampled")
    assert (partial.train.lr, partial.train.epochs) == (0.2, FLOW_DAUNCE["train"]["epochs"])
    assert partial.train.batch_size == DaunceConfig().train.batch_size


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
    assert black == DaunceConfig.paper(objective=black.objective)
    assert (black.objective.access, black.subset_ratio) == ("black_box", 0.3)
    merged = flow_daunce({"objective": {"access": "black_box"}, "num_models": 8})
    assert from_dict(DaunceConfig, merged, "daunce") == DaunceConfig.paper(
        num_models=8, objective=black.objective
    )
    with pytest.raises(DaunceError, match="daunce must be a mapping"):
        _load(tmp_path, "fast")


def test_torch_copies_take_their_step_from_curvature_not_from_the_base_recipe(tmp_path):
    data = write_data(tmp_path / "data", n=20, m=5)
    raw = {
        "data": {"train": {"path": str(data["train"])}, "queries": {"path": str(data["queries"])}},
        "model": {
            "recipe": {"kind": "linear", "inputs": 64, "outputs": 10},
            "train": {"optimizer": "adamw", "lr": 0.5, "momentum": 0.8, "epochs": 50},
        },
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    copies = load_config(path).daunce.train
    assert (copies.optimizer, copies.lr, copies.momentum, copies.epochs) == ("sgd", "auto", 0.9, 1)
    raw["daunce"] = {"train": {"lr": 0.05}}
    path.write_text(yaml.safe_dump(raw))
    own = load_config(path).daunce.train
    assert (own.lr, own.optimizer, own.epochs) == (0.05, "sgd", 1)


def test_a_language_models_copies_inherit_the_base_recipes_adamw_step():
    merged = flow_daunce(None, {"optimizer": "adamw", "lr": 3e-4}, "hf_lora")
    config = from_dict(DaunceConfig, merged, "daunce")
    assert (config.train.optimizer, config.train.lr, config.score) == ("adamw", 3e-4, "correlation")
    assert flow_daunce(None, None, "hf_lora")["train"]["lr"] == 0.1  # ModelConfig's default


def test_the_paper_constructor_is_algorithm_one_and_takes_changes():
    paper = DaunceConfig.paper(num_models=32)
    assert (paper.num_models, paper.subset_ratio, paper.score) == (32, 0.3, "correlation")
    assert (paper.objective.labels, paper.objective.rho, paper.train.lr) == ("observed", 1.0, 0.01)
