"""Bad input gets a clear error that names the problem and the fix."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from daunce_core import (
    ClassificationTask,
    DaunceConfig,
    DaunceError,
    DaunceWarning,
    Objective,
    RegressionTask,
    Task,
    TaskError,
    TorchModuleAccess,
    TrainConfig,
    attribute,
)


def data(n=20, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, d, generator=g), "y": torch.randint(0, 3, (n,), generator=g)}


def small_config(**kwargs):
    return DaunceConfig(num_models=kwargs.pop("num_models", 3), **kwargs)


class ReducedLossTask(ClassificationTask):
    def loss_from_outputs(self, outputs, batch):
        return F.cross_entropy(outputs, batch["y"])  # mean over the batch: wrong


def test_loss_reduced_over_the_batch_is_refused_with_the_fix():
    with pytest.raises(TaskError, match=r"one value per example.*reduction='none'"):
        TorchModuleAccess(torch.nn.Linear(4, 3), ReducedLossTask(), data(), data(5), small_config())


def test_nan_in_the_data_names_the_rows():
    bad = data()
    bad["x"][[3, 11], 0] = float("nan")
    with pytest.raises(DaunceError, match=r"train\['x'\] holds NaN.*first rows \[3, 11\]"):
        TorchModuleAccess(torch.nn.Linear(4, 3), ClassificationTask(), bad, data(5), small_config())


def test_columns_of_different_lengths_are_refused():
    bad = data()
    bad["y"] = bad["y"][:-1]
    with pytest.raises(DaunceError, match="same first dimension"):
        attribute(torch.nn.Linear(4, 3), ClassificationTask(), data(5), bad, small_config())


def test_empty_data_is_refused():
    empty = {"x": torch.zeros(0, 4), "y": torch.zeros(0, dtype=torch.long)}
    with pytest.raises(DaunceError, match="queries has no examples"):
        TorchModuleAccess(
            torch.nn.Linear(4, 3), ClassificationTask(), data(), empty, small_config()
        )


def test_model_that_does_not_fit_the_data_is_refused_with_the_fix():
    with pytest.raises(TaskError, match=r"could not compute losses.*model's input matches"):
        attribute(torch.nn.Linear(5, 3), ClassificationTask(), data(), data(5), small_config())


def test_queries_shaped_unlike_train_are_refused():
    queries = data(5, d=6)
    with pytest.raises(DaunceError, match=r"queries\['x'\] rows have shape \(6,\)"):
        attribute(torch.nn.Linear(4, 3), ClassificationTask(), data(), queries, small_config())
    with pytest.raises(DaunceError, match="queries lack the column 'y'"):
        attribute(
            torch.nn.Linear(4, 3),
            ClassificationTask(),
            data(),
            {"x": data(5)["x"]},
            small_config(),
        )


@pytest.mark.parametrize("k", [0, 1])
def test_fewer_than_two_models_is_refused(k):
    with pytest.raises(DaunceError, match=r"at least 2 \(the scores compare copies\)"):
        DaunceConfig(num_models=k)


def test_empty_subset_is_refused():
    config = small_config(subset_ratio=0.01)
    with pytest.raises(DaunceError, match="empty subset"):
        attribute(torch.nn.Linear(4, 3), ClassificationTask(), data(), data(5), config)


def test_black_box_without_subsampling_is_refused():
    with pytest.raises(DaunceError, match="subset_ratio < 1"):
        DaunceConfig(objective=Objective(access="black_box"), subset_ratio=1.0)


def test_trak_needs_a_margin():
    g = torch.Generator().manual_seed(0)
    regression = {"x": torch.randn(20, 4, generator=g), "y": torch.randn(20, generator=g)}
    config = small_config(objective=Objective(variant="trak"))
    with pytest.raises(TaskError, match="defines no margin_from_outputs"):
        attribute(torch.nn.Linear(4, 1), RegressionTask(), regression, regression, config)


def test_sampled_labels_need_logit_noise():
    class NoNoise(ClassificationTask):
        logit_noise = Task.logit_noise

    config = small_config(objective=Objective(labels="sampled"))
    with pytest.raises(TaskError, match="defines no logit_noise"):
        attribute(torch.nn.Linear(4, 3), NoNoise(), data(), data(5), config)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"subset_ratio": 1.5}, "subset_ratio must be in"),
        ({"measurement": "accuracy"}, "measurement must be one of"),
        ({"score": "cosine"}, "score must be one of"),
        ({"dtype": "float16"}, "dtype must be one of"),
        ({"prox": -1.0}, "prox"),
        ({"antithetic": True, "num_models": 5}, "must be even"),
    ],
)
def test_bad_configuration_is_refused(kwargs, match):
    with pytest.raises(DaunceError, match=match):
        DaunceConfig(**kwargs)


def test_query_index_out_of_range():
    torch.manual_seed(0)
    result = attribute(
        torch.nn.Linear(4, 3),
        ClassificationTask(),
        data(),
        data(5),
        small_config(train=TrainConfig(epochs=1, batch_size=4)),
    )
    with pytest.raises(DaunceError, match="query index 5 is out of range; there are 5"):
        result.top_proponents(5)
    assert np.isfinite(result.scores).all()


def test_a_float64_model_attributed_in_float32_is_warned_about():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    config = small_config(train=TrainConfig(epochs=1, batch_size=4))
    with pytest.warns(DaunceWarning, match=r"float64.*DaunceConfig\(dtype='float64'\)"):
        attribute(model, ClassificationTask(), data(), data(5), config)
    assert model.weight.dtype == torch.float64  # the caller's model is left as it was
    with warnings.catch_warnings():
        warnings.simplefilter("error", DaunceWarning)  # same precision: no warning
        attribute(model, ClassificationTask(), data(), data(5), small_config(dtype="float64"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_refused_when_the_configuration_loads(tmp_path):
    from pipeline_helpers import write_config, write_data

    from flows.config import load_config

    path = write_config(tmp_path / "a.yaml", tmp_path / "ws", write_data(tmp_path / "data"))
    text = path.read_text().replace("group_size: 4", "group_size: 4\n  device: cuda")
    path.write_text(text)
    with pytest.raises(DaunceError, match=r"device 'cuda'.*no GPU"):
        load_config(path)


def test_a_truncated_checkpoint_is_named_when_the_configuration_loads(tmp_path):
    import yaml
    from pipeline_helpers import write_config, write_data

    from daunce_core.access.torch_module.models import build_model, save_parameters
    from flows.config import load_config

    path = write_config(tmp_path / "a.yaml", tmp_path / "ws", write_data(tmp_path / "data"))
    config = yaml.safe_load(path.read_text())
    checkpoint = tmp_path / "base.safetensors"
    save_parameters(build_model(config["model"]["recipe"]), checkpoint)
    checkpoint.write_bytes(checkpoint.read_bytes()[:200])
    config["model"]["checkpoint"] = str(checkpoint)
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(
        DaunceError, match=r"model\.checkpoint: .*base\.safetensors.*cannot be read"
    ):
        load_config(path)
