"""How DAUNCE reaches a model: the `ModelAccess` protocol (`base`) and one module per kind.

`KINDS` maps a kind's name (a run configuration's ``model.access``) to its class, so a
configuration's objective is checked against the kind's `Capabilities` before anything runs.
A new kind adds one module here and one entry in `KINDS`.

`KINDS` is built on first use: the kinds' modules import `daunce_core.method.config`, which
imports `daunce_core.access.task`, so loading them with this package would make
``from daunce_core import DaunceConfig`` circular.
"""

from typing import Any

from daunce_core.access.base import Capabilities, ModelAccess, check_objective

REMOTE_KINDS = ("api", "prompt")
"""Kinds that reach θ0 on a server (the log-probability client): the server's model is θ0, so
nothing is trained or loaded locally, and LDS / removal (which retrain) cannot run on them."""


def _kinds() -> dict[str, type[ModelAccess]]:
    from daunce_core.access.api.access import APIAccess
    from daunce_core.access.hf_lora.access import HFLoraAccess
    from daunce_core.access.prompt.access import PromptAccess
    from daunce_core.access.torch_module.access import TorchModuleAccess

    kinds = (TorchModuleAccess, HFLoraAccess, APIAccess, PromptAccess)
    found = {kind.kind: kind for kind in kinds}
    assert set(REMOTE_KINDS) <= set(found)
    return found


def __getattr__(name: str) -> Any:
    if name == "KINDS":
        globals()["KINDS"] = _kinds()
        return globals()["KINDS"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["KINDS", "REMOTE_KINDS", "Capabilities", "ModelAccess", "check_objective"]
