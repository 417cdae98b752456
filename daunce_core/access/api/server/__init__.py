"""A local OpenAI-compatible server: fine-tunes a Hugging Face causal LM with LoRA, scores texts.

Modules: `cli` (command line, `add_arguments` and `run`), `app` (HTTP endpoints, keys, faults,
counts), `endpoints` (request checks and answers), `models` (the served models, scoring,
generation), `text` (rendering and tokenization rule), `worker` (fine-tuning jobs), `state`
(persistence under the work folder), `faults` (fault injection), `errors` (OpenAI-style errors).
"""

from daunce_core.access.api.server.cli import add_arguments, main, run

__all__ = ["add_arguments", "main", "run"]
