"""Fine-tuning jobs: validation, LoRA training in background threads, and the adapter saved.

A job moves ``validating_files → queued → running → succeeded | failed | cancelled``. One
validator thread checks the training file (each line a training example that fits the context;
see `daunce_core.access.api.server.text`), then ``--workers`` trainer threads train a LoRA
adapter on a fresh copy of the base model: dropout 0, ``A`` initialised from the job's seed,
AdamW at ``base_lr × learning_rate_multiplier`` with a cosine schedule, the examples shuffled
each epoch by a generator seeded with the job's seed, the loss the mean over the batch of each
example's mean NLL over its completion tokens and EOS. Same seed and data, same adapter.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass

import torch

from daunce_core.access.api.server.faults import Faults
from daunce_core.access.api.server.models import Registry, save_adapter
from daunce_core.access.api.server.state import Store
from daunce_core.access.api.server.text import Example, parse_training_file
from daunce_core.access.hf_lora.models import LoraSpec, add_lora, targets
from daunce_core.errors import DaunceError

log = logging.getLogger("daunce.api.server")
ACTIVE = ("validating_files", "queued", "running")
DONE = ("succeeded", "failed", "cancelled")


class Cancelled(Exception):
    """The job was cancelled while it ran."""


@dataclass(frozen=True)
class TrainDefaults:
    """Server-wide fine-tuning settings (from the command line).

    Attributes:
        rank, alpha: the LoRA adapter's rank and alpha.
        base_lr: the learning rate at ``learning_rate_multiplier`` 1.
        n_epochs, batch_size: what ``"auto"`` means for those hyperparameters.
    """

    rank: int = 8
    alpha: float = 16.0
    base_lr: float = 1e-3
    n_epochs: int = 3
    batch_size: int = 8


class Trainer:
    """The validator and trainer threads of one server."""

    def __init__(
        self, store: Store, registry: Registry, faults: Faults, defaults: TrainDefaults, workers=1
    ) -> None:
        self.store, self.registry, self.faults, self.defaults = store, registry, faults, defaults
        self._validate: queue.Queue = queue.Queue()
        self._train: queue.Queue = queue.Queue()
        self._threads = [threading.Thread(target=self._validator, daemon=True, name="validator")]
        self._threads += [
            threading.Thread(target=self._trainer, daemon=True, name=f"trainer-{i}")
            for i in range(workers)
        ]
        self._examples: dict[str, list[Example]] = {}

    def start(self) -> None:
        """Start the threads, and run again every job the last server left unfinished."""
        for job in self.store.jobs():
            if job["status"] in ACTIVE:
                self.store.clear_events(job["id"])
                self.store.update_job(job["id"], status="validating_files", trained_tokens=None)
                self.store.add_event(job["id"], "The server restarted; the job runs again.")
                log.info("job %s: restarted, validating_files", job["id"])
                self._validate.put(job["id"])
        for thread in self._threads:
            thread.start()

    def submit(self, job_id: str) -> None:
        """Queue a new job (status ``validating_files``)."""
        self._validate.put(job_id)

    # stages ------------------------------------------------------------------------------------
    def _set(self, job_id: str, status: str, **changes) -> dict | None:
        """Move a job on unless it was cancelled meanwhile; logs the change."""
        if self.store.job(job_id) is None:
            return None
        job = self.store.update_job(job_id, unless=("cancelled",), status=status, **changes)
        if job is not None:
            log.info("job %s: %s", job_id, status)
        return job

    def _fail(self, job_id: str, code: str, message: str, param: str | None = None) -> None:
        error = {"code": code, "message": message, "param": param}
        if self._set(job_id, "failed", error=error, finished_at=int(time.time())):
            self.store.add_event(job_id, f"Fine-tuning job failed: {message}", level="error")

    def _validator(self) -> None:
        while True:
            job_id = self._validate.get()
            job = self.store.job(job_id)
            if job is None or job["status"] != "validating_files":
                continue
            try:
                content = self.store.file_content(job["training_file"])
                served = self.registry.base
                examples = parse_training_file(content, served.tokenizer, served.context)
            except FileNotFoundError:
                self._fail(
                    job_id,
                    "invalid_training_file",
                    "the training file was deleted.",
                    "training_file",
                )
                continue
            except DaunceError as error:
                self._fail(job_id, "invalid_training_file", str(error), "training_file")
                continue
            self._examples[job_id] = examples
            if self._set(job_id, "queued"):
                self.store.add_event(job_id, "Files validated, moving job to queued state")
                self._train.put(job_id)

    def _trainer(self) -> None:
        while True:
            job_id = self._train.get()
            examples = self._examples.pop(job_id, None)
            job = self._set(job_id, "running")
            if job is None or examples is None:
                continue
            self.store.add_event(job_id, "Fine-tuning job started")
            try:
                if job.get("_fail"):
                    raise RuntimeError("injected fault (fail_jobs or fail_first_jobs)")
                self._run(job, examples)
            except Cancelled:
                self.store.add_event(job_id, "Training stopped: the job was cancelled")
            except Exception as error:
                log.exception("job %s failed", job_id)
                self._fail(job_id, "server_error", f"The job failed while training: {error}")

    def _run(self, job: dict, examples: list[Example]) -> None:
        """Train, save the adapter, and mark the job succeeded."""
        hp = job["hyperparameters"]
        spec = LoraSpec(rank=self.defaults.rank, alpha=self.defaults.alpha)
        model = self.registry.training_copy()
        names = targets(model, spec)
        model = add_lora(model, spec, seed=job["seed"])
        losses = train(
            model,
            examples,
            epochs=int(hp["n_epochs"]),
            batch_size=int(hp["batch_size"]),
            lr=self.defaults.base_lr * float(hp["learning_rate_multiplier"]),
            seed=job["seed"],
            pad=self.registry.base.tokenizer.pad_token_id,
            on_step=lambda step, total, loss: self._step(job["id"], step, total, loss),
        )
        current = self.store.job(job["id"])
        if current is None or current["status"] == "cancelled":
            raise Cancelled
        save_adapter(model, spec, names, self.store.adapter(job["id"]))
        results = "step,train_loss\n" + "".join(f"{i + 1},{v:.6f}\n" for i, v in enumerate(losses))
        result = self.store.add_file("step_metrics.csv", "fine-tune-results", results.encode())
        tokens = sum(len(e.ids) for e in examples) * int(hp["n_epochs"])
        model_id = self.registry.fine_tuned_id(job)
        if self._set(
            job["id"],
            "succeeded",
            fine_tuned_model=model_id,
            finished_at=int(time.time()),
            trained_tokens=tokens,
            result_files=[result["id"]],
        ):
            self.store.add_event(job["id"], f"New fine-tuned model created: {model_id}")
            self.store.add_event(job["id"], "The job has successfully completed")
        else:
            self.store.delete_adapter(job["id"])

    def _step(self, job_id: str, step: int, total: int, loss: float) -> None:
        job = self.store.job(job_id)
        if job is None or job["status"] == "cancelled":
            raise Cancelled
        data = {"step": step, "total_steps": total, "train_loss": loss}
        self.store.add_event(job_id, f"Step {step}/{total}: training loss={loss:.4f}", data=data)
        delay = self.faults.settings.step_delay
        if delay > 0:
            time.sleep(delay)


def batch_tensors(examples: list[Example], pad: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ``input_ids``, ``attention_mask`` and the trained-token mask, ``[B, T]``."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    trained = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, e in enumerate(examples):
        ids[row, : len(e.ids)] = torch.tensor(e.ids)
        mask[row, : len(e.ids)] = 1
        trained[row, : len(e.ids)] = torch.tensor(e.trained)
    return ids, mask, trained


def example_losses(model, ids: torch.Tensor, mask: torch.Tensor, trained: torch.Tensor):
    """Each example's mean NLL over its trained tokens (completion + EOS), ``[B]``.

    The first token is never predicted, so it is never trained.
    """
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    nll = -logits.log_softmax(dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    weights = trained[:, 1:].to(nll.dtype)
    return (nll * weights).sum(dim=-1) / weights.sum(dim=-1).clamp(min=1.0)


def train(model, examples, *, epochs, batch_size, lr, seed, pad, on_step=None) -> list[float]:
    """Train ``model``'s trainable (LoRA) weights: AdamW, cosine schedule, seeded order.

    Returns:
        The training loss of each step.
    """
    generator = torch.Generator().manual_seed(seed)
    per_epoch = math.ceil(len(examples) / batch_size)
    total = per_epoch * epochs
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    losses = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            rows = [examples[i] for i in order[start : start + batch_size]]
            loss = example_losses(model, *batch_tensors(rows, pad)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            losses.append(float(loss))
            if on_step:
                on_step(len(losses), total, losses[-1])
    model.eval()
    return losses
