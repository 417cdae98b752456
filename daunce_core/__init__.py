"""daunce_core: the DAUNCE training-data-attribution method as a pure library.

Start with `attribute` (in memory, a few lines) or `TorchModuleAccess` (copies by index, for
pipelines). A model is reached through one `ModelAccess` kind (`daunce_core.access`); torch
models through a `Task` (`ClassificationTask` and `RegressionTask` are ready-made). Scores are
oriented ``[n_train, m_query]``.

Packages: `method` (draws, objectives, signals, scores, top-k, in-memory `attribute`),
`access` (how a model is reached: the protocol and one module per kind), `storage` (layout,
Zarr stores, copy records, sources, exports, lineage), `evaluation` (LDS, subset removal),
`baselines` (other attribution methods, peers' packages).

The names below are imported on first use, so that tools which need only part of the package
(the command line's ``sql``, ``top`` and ``status``) do not import torch.
"""

import importlib

_HOMES = {
    "Attribution": "daunce_core.method.attribute",
    "attribute": "daunce_core.method.attribute",
    "Capabilities": "daunce_core.access.base",
    "CopyLosses": "daunce_core.access.base",
    "ModelAccess": "daunce_core.access.base",
    "ClassificationTask": "daunce_core.access.task",
    "RegressionTask": "daunce_core.access.task",
    "Task": "daunce_core.access.task",
    "TorchModuleAccess": "daunce_core.access.torch_module.access",
    "fit": "daunce_core.access.torch_module.training",
    "DaunceError": "daunce_core.errors",
    "DaunceWarning": "daunce_core.errors",
    "TaskError": "daunce_core.errors",
    "ComputeConfig": "daunce_core.method.config",
    "DaunceConfig": "daunce_core.method.config",
    "TrainConfig": "daunce_core.method.config",
    "Objective": "daunce_core.method.objectives",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    """Import ``name`` from its module the first time it is asked for."""
    if name not in _HOMES:
        raise AttributeError(f"module 'daunce_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
