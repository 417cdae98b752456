"""Text rendering and tokenization shared by training, scoring and generation.

The rendering rule (clients rely on it): the text of a chat conversation is the plain
concatenation of its messages' contents, without separators, roles or a chat template. For a
training line the *prompt* is the concatenation of every message before the last assistant
message and the *completion* is that assistant message's content; a legacy line gives
``prompt`` and ``completion`` directly. The training text is ``prompt + completion`` tokenized as
ONE string (with character offsets), followed by the tokenizer's EOS token id. Completion tokens
are those whose character start offset is ``>= len(prompt)`` (a token straddling the boundary
counts as prompt); the loss is the mean NLL of the completion tokens and the EOS token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from daunce_core.errors import DaunceError


def content_text(content) -> str:
    """A message's content as text: a string, or the ``text`` of a list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise DaunceError(
                    f"a content part must be {{'type': 'text', 'text': ...}}; got {part!r}."
                )
        return "".join(parts)
    raise DaunceError(f"a message's content must be text or a list of text parts; got {content!r}.")


def render_messages(messages) -> str:
    """The text of a conversation: the concatenation of its messages' contents."""
    if not isinstance(messages, list) or not messages:
        raise DaunceError("messages must be a non-empty list of {'role', 'content'} objects.")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise DaunceError(f"each message needs a role and a content; got {m!r}.")
    return "".join(content_text(m.get("content")) for m in messages)


def split_line(record) -> tuple[str, str]:
    """A training line's ``(prompt, completion)`` (chat ``messages`` or legacy fields).

    Raises:
        DaunceError: the line is neither form, or has no assistant message.
    """
    if not isinstance(record, dict):
        raise DaunceError("the line is not a JSON object")
    if "messages" in record:
        messages = record["messages"]
        render_messages(messages)
        last = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        if not last:
            raise DaunceError("the conversation has no assistant message to train on")
        prompt = "".join(content_text(m.get("content")) for m in messages[: last[-1]])
        return prompt, content_text(messages[last[-1]].get("content"))
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return record["prompt"], record["completion"]
    raise DaunceError(
        "the line has neither 'messages' (chat format) nor string 'prompt' and 'completion'"
    )


@dataclass(frozen=True)
class Example:
    """One tokenized training line: token ids and which of them are trained (completion + EOS)."""

    ids: list[int]
    trained: list[bool]


def encode_example(tokenizer, prompt: str, completion: str) -> Example:
    """Tokenize ``prompt + completion`` as one string, then EOS; mark the completion tokens."""
    encoded = tokenizer(prompt + completion, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    boundary = len(prompt)
    trained = [start >= boundary and end > start for start, end in encoded["offset_mapping"]]
    return Example(ids=[*ids, int(tokenizer.eos_token_id)], trained=[*trained, True])


def parse_training_file(content: bytes, tokenizer, context: int) -> list[Example]:
    """The examples of a JSONL training file, checked line by line.

    Raises:
        DaunceError: naming the (1-based) line that is not valid JSON, not a training example,
            or longer than the model's context window; or the file holds no example.
    """
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DaunceError(f"the training file is not UTF-8 text ({error}).") from error
    examples = []
    # JSONL lines end at "\n" only: str.splitlines would also cut at U+2028, U+0085 and other
    # separators that JSON strings may hold unescaped.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            prompt, completion = split_line(json.loads(line))
        except json.JSONDecodeError as error:
            raise DaunceError(
                f"line {number} of the training file is not valid JSON ({error})."
            ) from error
        except DaunceError as error:
            raise DaunceError(
                f"line {number} of the training file is not a training example: {error}."
            ) from error
        example = encode_example(tokenizer, prompt, completion)
        if len(example.ids) > context:
            raise DaunceError(
                f"line {number} of the training file is {len(example.ids)} tokens long (EOS "
                f"included), longer than the model's context window of {context}; shorten it."
            )
        examples.append(example)
    if not examples:
        raise DaunceError("the training file holds no example; give one JSON object a line.")
    return examples
