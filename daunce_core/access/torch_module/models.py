"""Models from recipes, and their parameters on disk (safetensors).

A recipe is a small dict, so a configuration file can name the model:
``{"kind": "mlp", "inputs": 64, "hidden": [64], "outputs": 10}``, ``{"kind": "linear",
"inputs": 64, "outputs": 10}``, or ``{"kind": "factory", "factory": "package.module:function",
"kwargs": {...}}`` for any model the user's code builds.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from daunce_core.errors import DaunceError
from daunce_core.storage.files import save_tensors

KINDS = ("mlp", "linear", "factory")

# torch's default generator is one per process: two threads seeding it at once (mapped Prefect
# tasks building their models) would interleave their draws and initialise from neither seed.
_GLOBAL_RNG = threading.Lock()


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw from torch's default generator as seeded by ``seed``, then restore its state.

    Thread-safe against other `seeded` blocks: initialisations are reproducible whatever else
    runs beside them.
    """
    with _GLOBAL_RNG:
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            yield
        finally:
            torch.random.set_rng_state(state)


def build_model(recipe: dict, seed: int = 0) -> nn.Module:
    """Build the model a recipe describes, its initial weights drawn from ``seed``."""
    kind = recipe.get("kind")
    if kind not in KINDS:
        raise DaunceError(f"model kind must be one of {KINDS}; got {kind!r}.")
    try:
        with seeded(seed):
            return _BUILDERS[kind](recipe)
    except (KeyError, TypeError) as error:
        raise DaunceError(f"model recipe {recipe} is incomplete or wrong: {error}.") from error


def _mlp(recipe: dict) -> nn.Module:
    sizes = [recipe["inputs"], *recipe.get("hidden", [64]), recipe["outputs"]]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _linear(recipe: dict) -> nn.Module:
    return nn.Linear(recipe["inputs"], recipe["outputs"])


def _factory(recipe: dict) -> nn.Module:
    module_name, _, function = recipe["factory"].partition(":")
    try:
        builder = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as error:
        raise DaunceError(
            f"cannot import the model factory {recipe['factory']!r} ({error}); give it as "
            "'package.module:function' importable from the current environment."
        ) from error
    return builder(**recipe.get("kwargs", {}))


_BUILDERS = {"mlp": _mlp, "linear": _linear, "factory": _factory}


def save_parameters(model: nn.Module, path: str | Path) -> None:
    """Write the model's state (parameters and buffers) to a safetensors file."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_tensors(state, path)


def load_parameters(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a safetensors (or ``torch.save`` state dict) file into ``model``; strict."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise DaunceError(
            f"the checkpoint {str(path)!r} cannot be read ({type(error).__name__}: {error}); it "
            "is damaged or truncated: write it again (a base model the flow trained is trained "
            "again if you delete it)."
        ) from error
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise DaunceError(
            f"the checkpoint {str(path)!r} does not fit the model recipe: {error}"
        ) from error
    return model
