"""The environment `make` builds: transformers' model classes import beside the peers."""

import importlib.util


def test_transformers_model_classes_import():
    from transformers import GPT2LMHeadModel

    assert GPT2LMHeadModel.__name__ == "GPT2LMHeadModel"


def test_no_torchvision_beside_the_local_torch():
    assert importlib.util.find_spec("torchvision") is None
