"""The OpenAI-compatible API server, over real HTTP with the official ``openai`` client.

One server (a tiny GPT-2, one torch thread) serves most tests; a second one, with a work folder
of its own, is killed mid-job and restarted. Checked: files, fine-tuning jobs to a model whose
completion loss went down, determinism given the seed, echo log-probabilities equal to an
in-process forward and unchanged by batching, seeded chat sampling, the error statuses, the
injected faults and the request statistics.
"""

from __future__ import annotations

import io
import json
import math
import time

import httpx
import numpy as np
import openai
import pytest
import torch
from api_server import make_tiny_model, start_server

from daunce_core.access.hf_lora.models import load_model

EOS = "<|endoftext|>"
MODEL = "tiny-model"
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "tree", "water"]


def examples() -> list[tuple[str, str]]:
    """16 (prompt, completion) pairs: a word and its fixed answer."""
    return [(f"Q: {w} {i}? A:", f" {WORDS[(i * 3) % 8]}") for i, w in enumerate(WORDS * 2)]


def jsonl(pairs) -> bytes:
    """Half chat-format lines (system + user + assistant), half legacy prompt/completion."""
    lines = []
    for i, (prompt, completion) in enumerate(pairs):
        if i % 2:
            lines.append({"prompt": prompt, "completion": completion})
        else:
            head, tail = prompt[:3], prompt[3:]
            messages = [
                {"role": "system", "content": head},
                {"role": "user", "content": tail},
                {"role": "assistant", "content": completion},
            ]
            lines.append({"messages": messages})
    return "\n".join(json.dumps(line) for line in lines).encode()


def upload(client, content: bytes, name="train.jsonl") -> str:
    return client.files.create(file=(name, io.BytesIO(content)), purpose="fine-tune").id


def wait(client, job_id: str, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s: {job.status}")


def fine_tune(client, file_id: str, suffix: str, seed: int = 7, epochs: int = 2) -> str:
    job = client.fine_tuning.jobs.create(
        model=MODEL,
        training_file=file_id,
        suffix=suffix,
        seed=seed,
        method={
            "type": "supervised",
            "supervised": {
                "hyperparameters": {
                    "n_epochs": epochs,
                    "batch_size": 4,
                    "learning_rate_multiplier": 20,
                }
            },
        },
    )
    assert job.status == "validating_files"
    return job.id


def echo(client, model: str, texts: list[str]):
    response = client.completions.create(
        model=model, prompt=texts, max_tokens=0, echo=True, logprobs=0
    )
    return sorted(response.choices, key=lambda c: c.index)


def completion_nll(client, model: str, pairs) -> float:
    """Mean over examples of the mean NLL of completion tokens + EOS (the rendering rule)."""
    choices = echo(client, model, [p + c + EOS for p, c in pairs])
    means = []
    for (prompt, _), choice in zip(pairs, choices, strict=True):
        lp = choice.logprobs
        picked = [
            -v for v, o in zip(lp.token_logprobs, lp.text_offset, strict=True) if o >= len(prompt)
        ]
        assert lp.tokens[-1] == EOS
        means.append(sum(picked) / len(picked))
    return sum(means) / len(means)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / MODEL)


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    with start_server(tiny, tmp_path_factory.mktemp("work"), extra_args=["--lora-rank", "4"]) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def trained(client):
    """Two jobs on the same file with the same seed (suffixes copy-0, copy-1), succeeded."""
    file_id = upload(client, jsonl(examples()))
    ids = [fine_tune(client, file_id, f"copy-{k}") for k in range(2)]
    jobs = [wait(client, job_id) for job_id in ids]
    for job in jobs:
        assert job.status == "succeeded", job.error
    return file_id, jobs


def test_health_needs_no_key_and_v1_needs_one(server):
    assert httpx.get(server.root_url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.base_url + "/models").status_code == 401
    wrong = start_key_client(server, "wrong-key")
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.models.list()
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    assert next(m.id for m in server.client().models.list()) == MODEL


def start_key_client(server, key: str):
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0)


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=0, echo=True)
    assert caught.value.code == "model_not_found"
    file_id = upload(client, jsonl(examples()[:2]))
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.create(model="no-such-model", training_file=file_id)
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(model=MODEL, training_file="file-missing")
    assert caught.value.param == "training_file"


def test_too_long_prompt_is_400_naming_it(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(
            model=MODEL, prompt=["short", "word " * 200], max_tokens=0, echo=True
        )
    message = caught.value.body["message"]
    assert "prompt 1" in message
    assert "context window of 64" in message


def test_echo_logprobs_equal_an_in_process_forward_and_ignore_batching(client, tiny):
    texts = ["The sky is blue.", "Two plus three", "Cats and dogs are animals" + EOS]
    batched = echo(client, MODEL, texts)
    model, tokenizer = load_model(tiny, "causal_lm")
    for text, choice in zip(texts, batched, strict=True):
        ids = tokenizer(text)["input_ids"]
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
        expected = logp.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)
        got = choice.logprobs.token_logprobs
        assert got[0] is None
        assert len(got) == len(ids)
        assert torch.allclose(torch.tensor(got[1:]), expected, atol=1e-4)
        assert "".join(choice.logprobs.tokens) == text
        alone = echo(client, MODEL, [text])[0].logprobs.token_logprobs
        assert max(abs(a - b) for a, b in zip(alone[1:], got[1:], strict=True)) < 1e-5


def test_echo_top_logprobs_are_sorted_and_bound_the_token(client):
    response = client.completions.create(
        model=MODEL, prompt="Water boils at", max_tokens=0, echo=True, logprobs=3
    )
    lp = response.choices[0].logprobs
    assert lp.top_logprobs[0] is None
    for value, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True):
        values = list(top.values())
        assert len(values) <= 3
        assert values == sorted(values, reverse=True)
        assert value <= values[0] + 1e-6
    assert response.usage.prompt_tokens == len(lp.tokens)


def test_chat_sampling_is_reproducible_with_a_seed(client):
    def ask(seed):
        return client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "The capital of France"}],
            max_completion_tokens=6,
            temperature=1.0,
            seed=seed,
            n=3,
            logprobs=True,
            top_logprobs=4,
        )

    first, again, other = ask(11), ask(11), ask(12)
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]
    assert texts != [c.message.content for c in other.choices]
    assert len(set(texts)) > 1  # each choice has a seed of its own
    for choice in first.choices:
        for entry in choice.logprobs.content:
            tops = [t.logprob for t in entry.top_logprobs]
            assert tops == sorted(tops, reverse=True)
            assert entry.logprob <= tops[0] + 1e-6
            same = [t.logprob for t in entry.top_logprobs if t.bytes == entry.bytes]
            assert len(same) <= 1  # bytes tell tokens apart (texts may not: byte pieces)
            if same:
                assert math.isclose(same[0], entry.logprob, abs_tol=1e-6)
            else:
                assert entry.logprob <= tops[-1] + 1e-6
    tokens = sum(len(c.logprobs.content) for c in first.choices)
    assert first.usage.completion_tokens == tokens


def test_greedy_completion_continues_the_prompt(client):
    response = client.completions.create(
        model=MODEL, prompt="The sky", max_tokens=5, temperature=0, logprobs=1
    )
    choice = response.choices[0]
    assert choice.finish_reason in ("length", "stop")
    for value, top in zip(
        choice.logprobs.token_logprobs, choice.logprobs.top_logprobs, strict=True
    ):
        assert math.isclose(value, max(top.values()), abs_tol=1e-6)  # greedy: the top token


def test_a_row_of_a_list_samples_the_same_whatever_the_other_rows(client):
    prompts = ["The sky is", "Two plus three", "Cats and dogs are animals that", "Water"]
    fillers = ["Question: what colour", "A", "The capital of France is Paris and", "Two"]

    def sample(batch):
        return client.completions.create(
            model=MODEL, prompt=batch, max_tokens=6, temperature=1.0, seed=5, logprobs=2
        ).choices

    together = sample(prompts)
    assert [c.index for c in together] == list(range(len(prompts)))
    assert len({c.text for c in together}) > 1
    for i, prompt in enumerate(prompts):
        # Row i keeps its seed (seed·1000003 + i) and must not see the other rows (padding).
        mixed = sample([prompt if j == i else fillers[j] for j in range(len(prompts))])[i]
        assert mixed.text == together[i].text
        assert mixed.finish_reason == together[i].finish_reason
        np.testing.assert_allclose(
            mixed.logprobs.token_logprobs, together[i].logprobs.token_logprobs, atol=1e-4
        )


def test_fine_tuning_lowers_the_completion_loss(client, trained):
    _, jobs = trained
    job = jobs[0]
    assert job.fine_tuned_model == f"ft:{MODEL}:copy-0:{job.id.removeprefix('ftjob-')}"
    assert job.seed == 7
    assert job.trained_tokens > 0
    assert job.hyperparameters.n_epochs == 2
    assert job.fine_tuned_model in [m.id for m in client.models.list()]
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    steps = [e for e in events if e.data and "train_loss" in e.data]
    assert len(steps) == 2 * 4  # 16 examples, batch 4, 2 epochs
    pairs = examples()
    base, tuned = (
        completion_nll(client, MODEL, pairs),
        completion_nll(client, job.fine_tuned_model, pairs),
    )
    assert tuned < base - 0.1, (base, tuned)
    listed = client.fine_tuning.jobs.list(limit=50).data
    assert {j.id for j in jobs} <= {j.id for j in listed}


def test_same_seed_same_data_same_model(client, trained):
    _, jobs = trained
    texts = [p + c + EOS for p, c in examples()[:4]]
    a = [c.logprobs.token_logprobs[1:] for c in echo(client, jobs[0].fine_tuned_model, texts)]
    b = [c.logprobs.token_logprobs[1:] for c in echo(client, jobs[1].fine_tuned_model, texts)]
    base = [c.logprobs.token_logprobs[1:] for c in echo(client, MODEL, texts)]
    diff = max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))
    moved = max(
        abs(x - y) for ra, rb in zip(a, base, strict=True) for x, y in zip(ra, rb, strict=True)
    )
    assert diff < 1e-5
    assert moved > 1e-2


def test_bad_training_file_fails_the_job_naming_the_line(client):
    good = json.dumps({"prompt": "a", "completion": "b"})
    no_assistant = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    for content, line, words in [
        (f"{good}\n{good}\n{{not json\n", 3, "not valid JSON"),
        (f"{good}\n{no_assistant}\n", 2, "no assistant message"),
        (b"", None, "no example"),
    ]:
        data = content.encode() if isinstance(content, str) else content
        job = wait(
            client,
            client.fine_tuning.jobs.create(model=MODEL, training_file=upload(client, data)).id,
        )
        assert job.status == "failed"
        assert job.error.code == "invalid_training_file"
        if line:
            assert f"line {line}" in job.error.message
        assert words in job.error.message


def test_rate_limit_errors_and_drops(server):
    try:
        server.set_faults(rate_limit=2)
        answers = [server.http("GET", "/v1/models") for _ in range(6)]
        limited = [r for r in answers if r.status_code == 429]
        assert limited, [r.status_code for r in answers]
        assert int(limited[0].headers["Retry-After"]) >= 1
        assert limited[0].json()["error"]["code"] == "rate_limit_exceeded"
        server.set_faults(rate_limit=0, error_rate=0.5, fault_seed=3)
        codes = [server.http("GET", "/v1/models").status_code for _ in range(40)]
        errors = [c for c in codes if c != 200]
        assert set(errors) == {500, 503}
        assert 10 <= len(errors) <= 30, codes
        assert server.http("GET", "/health").status_code == 200  # faults are for /v1 only
        server.set_faults(error_rate=0, drop_rate=1.0)
        with pytest.raises(httpx.TransportError):
            server.http("GET", "/v1/models")
    finally:
        server.set_faults(rate_limit=0, error_rate=0, drop_rate=0)
    assert server.http("GET", "/v1/models").status_code == 200


def test_fail_first_jobs_and_stats_by_suffix(server, client, trained):
    file_id, _ = trained
    server.set_faults(fail_first_jobs=1)
    failed = wait(client, fine_tune(client, file_id, "doomed", epochs=1))
    assert failed.status == "failed"
    assert failed.error.code == "server_error"
    assert failed.fine_tuned_model is None
    assert server.http("GET", "/admin/faults").json()["jobs_left_to_fail"] == 0
    stats = server.stats()
    assert stats["jobs_by_suffix"]["copy-0"] == 1
    assert stats["jobs_by_suffix"]["copy-1"] == 1
    assert stats["jobs_by_suffix"]["doomed"] == 1
    assert stats["requests"]["POST /v1/fine_tuning/jobs"]["200"] >= 3
    assert stats["requests"]["GET /v1/models"].get("401", 0) >= 1
    assert httpx.get(server.root_url + "/admin/stats").status_code == 401


def test_restart_resumes_a_killed_job_and_keeps_files_and_jobs(tiny, tmp_path):
    server = start_server(tiny, tmp_path / "work", faults={"step_delay": 0.25})
    try:
        client = server.client()
        bad = client.fine_tuning.jobs.create(model=MODEL, training_file=upload(client, b"{oops"))
        file_id = upload(client, jsonl(examples()))
        job_id = fine_tune(client, file_id, "resumed", epochs=3)
        deadline = time.monotonic() + 60
        while not any(e.data for e in client.fine_tuning.jobs.list_events(job_id).data):
            assert time.monotonic() < deadline, "the job never started training"
            time.sleep(0.1)
        assert client.fine_tuning.jobs.retrieve(job_id).status == "running"
        server.kill()
        server.restart()
        server.set_faults(step_delay=0)
        client = server.client()
        job = wait(client, job_id)
        assert job.status == "succeeded", job.error
        assert job.seed == 7
        assert {file_id} <= {f.id for f in client.files.list()}
        assert {bad.id, job_id} <= {j.id for j in client.fine_tuning.jobs.list().data}
        assert client.fine_tuning.jobs.retrieve(bad.id).status == "failed"
        assert job.fine_tuned_model in [m.id for m in client.models.list()]
        steps = [e for e in client.fine_tuning.jobs.list_events(job_id, limit=100).data if e.data]
        assert len(steps) == 3 * 4  # ran again from the start, each step once
    finally:
        server.kill()


def test_cancel_stops_a_running_job(server, client, trained):
    file_id, _ = trained
    server.set_faults(step_delay=0.2)
    try:
        job_id = fine_tune(client, file_id, "cancelled", epochs=3)
        deadline = time.monotonic() + 60
        while client.fine_tuning.jobs.retrieve(job_id).status != "running":
            assert time.monotonic() < deadline, "the job never ran"
            time.sleep(0.1)
        assert client.fine_tuning.jobs.cancel(job_id).status == "cancelled"
    finally:
        server.set_faults(step_delay=0)
    time.sleep(0.5)
    job = client.fine_tuning.jobs.retrieve(job_id)
    assert job.status == "cancelled"
    assert job.fine_tuned_model is None
    assert not any(m.id.endswith(job_id.removeprefix("ftjob-")) for m in client.models.list())
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job_id)


def test_a_training_line_holding_unicode_line_separators_is_one_line(tiny):
    from transformers import AutoTokenizer

    from daunce_core.access.api.server.text import parse_training_file

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    odd = "blue\u2028sky\x85end\u2029"  # a sampled completion may hold any character
    lines = [
        {
            "messages": [
                {"role": "user", "content": "The sky is"},
                {"role": "assistant", "content": odd},
            ]
        },
        {"prompt": "Two plus three is", "completion": " five"},
    ]
    for ascii_only in (True, False):  # escaped (our client) or raw UTF-8 (other clients)
        content = "".join(json.dumps(x, ensure_ascii=ascii_only) + "\n" for x in lines)
        examples = parse_training_file(content.encode(), tokenizer, 64)
        assert len(examples) == 2
