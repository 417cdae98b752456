"""Text to tensors: prompt + completion pairs for causal LMs, texts + labels for classifiers.

A causal LM's per-example loss is the mean NLL over the *completion* tokens only (DESIGN §1,
"Language models"): the prompt and the padding are masked. Encoding therefore keeps, besides
``input_ids`` and ``attention_mask`` (``[n, T]``, right-padded), the completion's targets in a
compact form, ``[n, C]`` with C the longest completion: ``target_pos`` (the position whose logits
predict each completion token), ``target_ids`` and ``target_mask``. Logits are only ever formed at
those positions (``[B, C, V]``), never at all ``T`` positions, and never for all ``n`` examples.

Every check runs here, before any training: a tokenizer without a pad token, an empty
completion, or an example longer than the model's context window is refused with the rows and
the fix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from daunce_core.errors import DaunceError


def _rows(rows: list[int]) -> str:
    shown = ", ".join(str(r) for r in rows[:5])
    return f"{shown} (and {len(rows) - 5} more)" if len(rows) > 5 else shown


def check_pad_token(tokenizer, where: str) -> int:
    """The tokenizer's pad token id; a `DaunceError` naming the fix if it has none."""
    if tokenizer.pad_token_id is None:
        raise DaunceError(
            f"the tokenizer of {where} has no pad token, so batches of different lengths cannot "
            "be padded; give it one and save it again, e.g. tokenizer.pad_token = "
            "tokenizer.eos_token; tokenizer.save_pretrained(folder)."
        )
    return int(tokenizer.pad_token_id)


def _strings(values: Sequence, column: str, where: str) -> list[str]:
    bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
    if bad:
        raise DaunceError(
            f"column {column!r} of {where} must hold text; rows {_rows(bad)} do not "
            f"(e.g. {values[bad[0]]!r})."
        )
    return list(values)


def _prompt_ids(tokenizer, prompts: list[str], chat: bool) -> list[list[int]]:
    if not chat:
        return [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    if not getattr(tokenizer, "chat_template", None):
        raise DaunceError(
            "task.chat is true but the tokenizer has no chat template; set task.chat: false "
            "(plain prompt + completion) or use a chat model's tokenizer."
        )
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in prompts
    ]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def encode_completions(
    tokenizer,
    prompts: Sequence,
    completions: Sequence,
    *,
    max_length: int,
    where: str,
    chat: bool = False,
    separator: str = " ",
) -> dict[str, torch.Tensor]:
    """Tokenise prompt + completion pairs; the loss covers the completion and its end token.

    The sequence is ``prompt ids + ids(separator + completion) + eos`` (with ``chat``, the
    prompt is one user turn through the tokenizer's chat template and the completion follows the
    generation prompt, no separator).

    Args:
        tokenizer: a Hugging Face tokenizer with a pad token and an end-of-sequence token.
        prompts: ``n`` prompt texts.
        completions: ``n`` completion texts (non-empty).
        max_length: the model's context window (tokens).
        where: names the data in errors (``data.train``).
        chat: format each prompt with the tokenizer's chat template.
        separator: text between prompt and completion (plain format).

    Returns:
        ``input_ids``/``attention_mask`` ``[n, T]``; ``target_pos``, ``target_ids`` ``[n, C]``
        (int64) and ``target_mask`` ``[n, C]`` (float32, 1 on completion tokens).

    Raises:
        DaunceError: no pad token, an empty completion, or an example over ``max_length``.
    """
    pad = check_pad_token(tokenizer, where)
    prompts = _strings(prompts, "prompt", where)
    completions = _strings(completions, "completion", where)
    if len(prompts) != len(completions):
        raise DaunceError(
            f"{where}: {len(prompts)} prompts but {len(completions)} completions; give one "
            "completion per prompt."
        )
    empty = [i for i, c in enumerate(completions) if not c.strip()]
    if empty:
        raise DaunceError(
            f"{where}: rows {_rows(empty)} have an empty completion; the loss is the NLL of the "
            "completion tokens, so every example needs some. Drop those rows or fill them in."
        )
    eos = tokenizer.eos_token_id
    end = [] if eos is None else [int(eos)]
    heads = _prompt_ids(tokenizer, prompts, chat)
    bare = [i for i, h in enumerate(heads) if not h]
    if bare:
        raise DaunceError(
            f"{where}: the prompts of rows {_rows(bare)} encode to no tokens; the first "
            "completion token needs a "
            "token before it to be predicted from. Give every example a prompt."
        )
    joiner = "" if chat else separator
    tails = [
        tokenizer(joiner + c, add_special_tokens=False)["input_ids"] + end for c in completions
    ]
    lengths = [len(h) + len(t) for h, t in zip(heads, tails, strict=True)]
    long = [i for i, length in enumerate(lengths) if length > max_length]
    if long:
        raise DaunceError(
            f"{where}: rows {_rows(long)} are longer than the model's context window of "
            f"{max_length} tokens (longest: {max(lengths)} tokens with the completion); shorten "
            "their prompts or completions, or use a model with a longer context."
        )
    n, width, span = len(prompts), max(lengths), max(len(t) for t in tails)
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    target_pos = torch.zeros((n, span), dtype=torch.long)
    target_ids = torch.full((n, span), pad, dtype=torch.long)
    target_mask = torch.zeros((n, span), dtype=torch.float32)
    for i, (head, tail) in enumerate(zip(heads, tails, strict=True)):
        row = head + tail
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        count = len(tail)
        target_pos[i, :count] = torch.arange(len(head) - 1, len(row) - 1)
        target_ids[i, :count] = torch.tensor(tail)
        target_mask[i, :count] = 1.0
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "target_pos": target_pos,
        "target_ids": target_ids,
        "target_mask": target_mask,
    }


def encode_texts(
    tokenizer, texts: Sequence, labels: Sequence, *, max_length: int, where: str
) -> dict[str, torch.Tensor]:
    """Tokenise texts for a sequence classifier: ``input_ids``, ``attention_mask``, ``y``.

    Raises:
        DaunceError: no pad token, or a text over ``max_length`` tokens.
    """
    check_pad_token(tokenizer, where)
    texts = _strings(texts, "text", where)
    encoded = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    long = [i for i, e in enumerate(encoded) if len(e) > max_length]
    if long:
        raise DaunceError(
            f"{where}: rows {_rows(long)} are longer than the model's context window of "
            f"{max_length} tokens; shorten those texts or use a model with a longer context."
        )
    batch = tokenizer.pad({"input_ids": encoded}, return_tensors="pt")
    return {
        "input_ids": batch["input_ids"].long(),
        "attention_mask": batch["attention_mask"].long(),
        "y": torch.as_tensor(list(labels), dtype=torch.long),
    }
