"""How well the base model fits: its loss and accuracy on the training set and the queries.

DAUNCE explains the predictions of the model it is given. A model that has not fit its training
data (a learning rate too large or too small, too few epochs, a model too small, broken labels)
is attributed just as readily, and its scores say little about the data; so the pipeline
measures the base model first and says when it fits poorly (`fit_warning`).

The rule, for classification: the training accuracy must close at least half of the gap between
the majority-class rate ``p0`` (the accuracy of always answering the most frequent training
label, the best a model can do without looking at the inputs) and a perfect fit:
``(accuracy − p0) / (1 − p0) >= 0.5`` (`MIN_GAIN`). Measured against ``p0`` rather than a fixed
accuracy, it holds for two balanced classes (flagged below 75%) and for ten (below 55%) or one
dominant class alike (with p0 = 0.9, below 95%); a model with no more than chance skill gets
0. A model the perturbed copies fine-tune is meant to sit near a minimum of its training loss
(the influence function's premise); one that has not closed half the gap is far from it.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from daunce_core.access.task import Task
from daunce_core.data import ExampleSet, batch_slices, num_examples, take
from daunce_core.errors import TaskError

MIN_GAIN = 0.5
"""The smallest share of the gap between the majority-class rate and 100% the training accuracy
must close (`fit_warning`)."""


def measure_split(
    model: nn.Module, task: Task, data: ExampleSet, *, batch_size: int = 1024
) -> dict[str, np.ndarray]:
    """Per example of ``data``: ``loss``, ``correct``, ``predicted`` and its ``probability``.

    ``correct`` (bool) where the task defines `Task.correct_from_outputs`; then, if the outputs
    are class logits ``[B, C]``, the ``predicted`` (arg-max) class and its softmax
    ``probability``. The
    model is evaluated in ``eval()`` mode without gradients, in batches.
    """
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for rows in batch_slices(num_examples(data), batch_size):
            batch = take(data, rows)
            outputs = task.outputs(model, batch)
            found = {"loss": task.loss_from_outputs(outputs, batch)}
            with contextlib.suppress(TaskError):  # the task defines no correctness
                found["correct"] = task.correct_from_outputs(outputs, batch)
            if "correct" in found and outputs.dim() == 2 and outputs.shape[1] > 1:
                probability, predicted = torch.softmax(outputs.double(), dim=1).max(dim=1)
                found |= {"predicted": predicted, "probability": probability}
            for key, value in found.items():
                parts.setdefault(key, []).append(value.reshape(-1).detach().cpu())
    return {key: torch.cat(values).numpy() for key, values in parts.items()}


def majority_rate(labels: np.ndarray | torch.Tensor) -> float:
    """The share of the most frequent label: the accuracy of always answering it."""
    labels = np.asarray(labels).reshape(-1)
    _, counts = np.unique(labels, return_counts=True)
    return float(counts.max() / len(labels))


def summarize(
    train: dict[str, np.ndarray],
    queries: dict[str, np.ndarray],
    train_labels: np.ndarray | torch.Tensor | None = None,
) -> dict[str, float]:
    """The figures of `measure_split`'s results on both splits.

    ``base/train_loss``, ``base/query_loss`` (means) and, where measured,
    ``base/train_accuracy``, ``base/query_accuracy`` and ``base/majority_rate`` (of
    ``train_labels``).
    """
    metrics = {}
    for name, split in (("train", train), ("query", queries)):
        metrics[f"base/{name}_loss"] = float(np.mean(split["loss"]))
        if "correct" in split:
            metrics[f"base/{name}_accuracy"] = float(np.mean(split["correct"]))
    if train_labels is not None and "base/train_accuracy" in metrics:
        metrics["base/majority_rate"] = majority_rate(train_labels)
    return metrics


def fit_warning(metrics: dict[str, float]) -> str | None:
    """What to tell a user whose base model fits its training data poorly (see the module).

    None if it fits, or if there is no accuracy to judge (regression).
    """
    accuracy, p0 = metrics.get("base/train_accuracy"), metrics.get("base/majority_rate")
    if accuracy is None or p0 is None:
        return None
    gain = (accuracy - p0) / (1 - p0) if p0 < 1 else 1.0
    if gain >= MIN_GAIN:
        return None
    return (
        f"the base model fits its training data poorly: training accuracy {accuracy:.1%} "
        f"against {p0:.1%} for always answering the most frequent label (it closes "
        f"{max(gain, 0):.0%} of the gap to 100%; under {MIN_GAIN:.0%} is flagged). DAUNCE "
        "attributes this model's predictions, and an underfit model's scores say little about "
        "the data: check model.train (a learning rate too large or too small, too few epochs), "
        "model.recipe (a model too small) and the labels, or the checkpoint you gave."
    )
