"""The environment `make` builds: transformers models import and run beside the peers."""

import importlib.util


def test_transformers_model_classes_import():
    from transformers import GPT2LMHeadModel

    assert GPT2LMHeadModel.__name__ == "GPT2LMHeadModel"


def test_no_torchvision_beside_the_local_torch():
    assert importlib.util.find_spec("torchvision") is None


def test_a_tiny_causal_lm_runs_beside_the_peers():
    import kronfluence
    import torch
    import trak
    from transformers import GPT2Config, GPT2LMHeadModel

    assert kronfluence.__name__ == "kronfluence"
    assert trak.__name__ == "trak"
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 50, (2, 8))
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()  # and trains
    assert model.transformer.wte.weight.grad is not None
