"""daunce_core: the DAUNCE training-data-attribution method as a pure library.

Start with `attribute` (in memory, a few lines) or `PerturbedCopies` (copies by index, for
pipelines). Models are reached through a `Task`; `ClassificationTask` and `RegressionTask` are
ready-made. Scores are oriented ``[n_train, m_query]``.
"""

from daunce_core.access.task import ClassificationTask, RegressionTask, Task
from daunce_core.access.torch_module.access import CopyLosses, PerturbedCopies
from daunce_core.access.torch_module.training import fit
from daunce_core.errors import DaunceError, DaunceWarning, TaskError
from daunce_core.method.attribute import Attribution, attribute
from daunce_core.method.config import DaunceConfig, TrainConfig
from daunce_core.method.objectives import Objective

__all__ = [
    "Attribution",
    "ClassificationTask",
    "CopyLosses",
    "DaunceConfig",
    "DaunceError",
    "DaunceWarning",
    "Objective",
    "PerturbedCopies",
    "RegressionTask",
    "Task",
    "TaskError",
    "TrainConfig",
    "attribute",
    "fit",
]
