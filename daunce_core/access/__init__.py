"""How DAUNCE reaches a model: the `ModelAccess` protocol (`base`) and one module per kind.

`KINDS` maps a kind's name (a run configuration's ``model.access``) to its class, so a
configuration's objective is checked against the kind's `Capabilities` before anything runs.
A new kind adds one module here and one entry in `KINDS`.
"""

from daunce_core.access.api.access import APIAccess
from daunce_core.access.base import Capabilities, ModelAccess, check_objective
from daunce_core.access.hf_lora.access import HFLoraAccess
from daunce_core.access.prompt.access import PromptAccess
from daunce_core.access.torch_module.access import TorchModuleAccess

KINDS: dict[str, type[ModelAccess]] = {
    TorchModuleAccess.kind: TorchModuleAccess,
    HFLoraAccess.kind: HFLoraAccess,
    APIAccess.kind: APIAccess,
    PromptAccess.kind: PromptAccess,
}

REMOTE_KINDS = (APIAccess.kind, PromptAccess.kind)
"""Kinds that reach θ0 on a server (the log-probability client): the server's model is θ0, so
nothing is trained or loaded locally, and LDS / removal (which retrain) cannot run on them."""

__all__ = ["KINDS", "REMOTE_KINDS", "Capabilities", "ModelAccess", "check_objective"]
