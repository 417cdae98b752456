"""daunce_core: the DAUNCE training-data-attribution method as a pure library.

Start with `attribute` (in memory, a few lines) or `TorchModuleAccess` (copies by index, for
pipelines). A model is reached through one `ModelAccess` kind (`daunce_core.access`); torch
models through a `Task` (`ClassificationTask` and `RegressionTask` are ready-made). Scores are
oriented ``[n_train, m_query]``.

Packages: `method` (draws, objectives, signals, scores, top-k, in-memory `attribute`),
`access` (how a model is reached: the protocol and one module per kind), `storage` (layout,
Zarr stores, copy records, sources, exports, lineage), `evaluation` (LDS, subset removal),
`baselines` (other attribution methods, peers' packages).
"""

from daunce_core.access.base import Capabilities, CopyLosses, ModelAccess
from daunce_core.access.task import ClassificationTask, RegressionTask, Task
from daunce_core.access.torch_module.access import TorchModuleAccess
from daunce_core.access.torch_module.training import fit
from daunce_core.errors import DaunceError, DaunceWarning, TaskError
from daunce_core.method.attribute import Attribution, attribute
from daunce_core.method.config import ComputeConfig, DaunceConfig, TrainConfig
from daunce_core.method.objectives import Objective

__all__ = [
    "Attribution",
    "Capabilities",
    "ClassificationTask",
    "ComputeConfig",
    "CopyLosses",
    "DaunceConfig",
    "DaunceError",
    "DaunceWarning",
    "ModelAccess",
    "Objective",
    "RegressionTask",
    "Task",
    "TaskError",
    "TorchModuleAccess",
    "TrainConfig",
    "attribute",
    "fit",
]
