"""The served-teacher client (teacher/server.py) and source (ServedTeacher) against an in-process stand-in: rows
against the stand-in's own model, retries, every refusal and fault message, the fingerprint's tolerance."""

from __future__ import annotations

import math

import pytest
import torch

from llmneo.errors import ConfigError, TeacherServerError, VocabularyError
from llmneo.losses.contract import IGNORE_INDEX
from llmneo.runtime.identity import differences, same_probe
from llmneo.teacher.server import ServerSettings, TeacherServer
from llmneo.teacher.sources import ServedTeacher
from llmneo.demo.tiny import build_tokenizer, corpus_texts
from standin_server import StandInServer
from vllm_server import free_port


@pytest.fixture()
def standin(tokenizer):
    server = StandInServer(tokenizer)
    yield server
    server.close()


def client(url: str, **settings) -> TeacherServer:
    return TeacherServer(ServerSettings(url, backoff=0.0, **settings))


def connected(standin, tokenizer, **settings) -> TeacherServer:
    server = client(standin.url, **settings).connect(tokenizer)
    server.fingerprint(tokenizer)
    return server


def feature(tokenizer, row: int = 0) -> dict:
    ids = tokenizer("the sea is blue and the sky is grey", add_special_tokens=False)["input_ids"]
    labels = [IGNORE_INDEX] * 3 + ids[3:]
    return {"input_ids": ids, "labels": labels, "row_id": row}


def test_rows_are_the_servers_top_k_at_answer_positions(standin, tokenizer):
    server = connected(standin, tokenizer)
    row = feature(tokenizer)
    top = server.row_topk(row, 5, len(tokenizer))
    positions = [t for t in range(len(row["labels"]) - 1) if row["labels"][t + 1] != IGNORE_INDEX]
    ids, values = standin.expected([row["input_ids"][t] for t in positions], 5)
    assert torch.equal(top.token_ids, ids)
    torch.testing.assert_close(top.log_probs, values, atol=1e-6, rtol=0)
    tail = torch.tensor([math.log(1 - sum(math.exp(v) for v in row_values)) for row_values in values.tolist()])
    torch.testing.assert_close(top.log_tail, tail, atol=1e-5, rtol=0)
    # only the prompt up to the last answer position's next token is sent
    assert standin.requests[-1][1]["prompt"] == row["input_ids"][:max(positions) + 2]


def test_failed_requests_are_retried_then_reported_with_the_servers_message(standin, tokenizer):
    server = connected(standin, tokenizer, retries=2)
    standin.failures = 2
    assert len(server.row_topk(feature(tokenizer), 3, len(tokenizer))) > 0
    standin.failures = 3
    with pytest.raises(TeacherServerError, match=r"HTTP 500: engine is restarting \(after 3 tries\)"):
        server.row_topk(feature(tokenizer), 3, len(tokenizer))


def test_client_errors_are_not_retried(standin, tokenizer):
    server = connected(standin, tokenizer, retries=5)
    before = len(standin.requests)
    with pytest.raises(TeacherServerError, match="HTTP 400: Requested prompt logprobs of 21, which is greater"):
        server.prompt_logprobs([1, 2, 3], 21)
    assert len(standin.requests) == before + 1


@pytest.mark.parametrize("fault, message", [
    (lambda positions: positions[:4], "returned no log-probabilities for training row 7 at position 3"),
    (lambda positions: [None, *[{**p, next(iter(p)): {"logprob": float("nan"), "rank": 1}} for p in positions[1:]]],
     "non-finite log-probability for training row 7 at position 2"),
    (lambda positions: [None, *[dict(list(p.items())[1:]) for p in positions[1:]]],
     "returned 2 of 3 log-probabilities for training row 7 at position 2"),
])
def test_a_broken_answer_names_the_row_and_position(standin, tokenizer, fault, message):
    server = connected(standin, tokenizer)
    standin.corrupt = fault
    with pytest.raises(TeacherServerError, match=message):
        server.row_topk(feature(tokenizer, row=7), 3, len(tokenizer))


def test_ids_outside_the_students_vocabulary_are_refused(standin, tokenizer):
    server = connected(standin, tokenizer)
    with pytest.raises(TeacherServerError, match="outside the student's 10 ids"):
        server.row_topk(feature(tokenizer), 3, 10)


def test_connect_refusals(tokenizer):
    nowhere = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(TeacherServerError, match=f"teacher server {nowhere} is not reachable"):
        client(nowhere).connect(tokenizer)
    two = StandInServer(tokenizer, models=("a", "b"))
    try:
        with pytest.raises(ConfigError, match=r"serves 2 models \(a, b\): name one with --teacher_server_model"):
            client(two.url).connect(tokenizer)
        with pytest.raises(ConfigError, match="does not serve 'c'; it serves a, b"):
            client(two.url, model="c").connect(tokenizer)
        assert client(two.url, model="b").connect(tokenizer).model == "b"
    finally:
        two.close()


def test_another_tokenizer_is_refused(tokenizer):
    other = build_tokenizer(corpus_texts()[::-1][:500], vocab_size=len(tokenizer))
    server = StandInServer(other)
    try:
        with pytest.raises(VocabularyError, match="has another tokenizer than the student's.*--cross_tokenizer"):
            client(server.url).connect(tokenizer)
    finally:
        server.close()


def test_top_k_above_the_servers_limit_is_refused(standin, tokenizer):
    server = connected(standin, tokenizer)
    with pytest.raises(ConfigError, match=r"--teacher_top_k 32 is more than .* returns \(20\).*--max-logprobs 32"):
        server.check_top_k(32, "--teacher_top_k")
    server.check_top_k(20, "--teacher_top_k")


def test_api_key_from_the_environment(tokenizer, monkeypatch):
    server = StandInServer(tokenizer, api_key="s3cret")
    try:
        with pytest.raises(ConfigError, match="NEO_KEY: that environment variable is not set"):
            client(server.url, api_key_env="NEO_KEY").connect(tokenizer)
        with pytest.raises(TeacherServerError, match="HTTP 401: Unauthorized"):
            client(server.url).connect(tokenizer)
        monkeypatch.setenv("NEO_KEY", "s3cret")
        assert client(server.url, api_key_env="NEO_KEY").connect(tokenizer).model == "teacher"
        assert server.requests[-1][1]["authorization"] == "Bearer s3cret"
    finally:
        server.close()


def test_fingerprint_tolerates_noise_not_another_model(standin, tokenizer):
    server = connected(standin, tokenizer)
    saved = server.fingerprint(tokenizer)
    assert same_probe(saved, server.fingerprint(tokenizer))
    noisy = {**saved, "probe": [[[token, value + 0.01] for token, value in row] for row in saved["probe"]]}
    assert same_probe(saved, noisy)
    assert not same_probe(saved, {**saved, "server_model": "other"})
    standin.table = standin.table.roll(1, dims=1)  # other weights under the same name
    changed = server.fingerprint(tokenizer)
    assert not same_probe(saved, changed)
    identity = {"options": {}, "data": {}, "teacher": {"served_teacher": saved}}
    assert differences(identity, {**identity, "teacher": {"served_teacher": noisy}}) == []
    assert differences(identity, {**identity, "teacher": {"served_teacher": changed}}) == [
        "the served teacher 'teacher': its log-probabilities of the probe differ (another model, or other weights)"]


def test_served_source_fetches_ahead_and_checks_the_probe(standin, tokenizer):
    server = connected(standin, tokenizer)
    rows = [feature(tokenizer, row) for row in range(3)]
    source = ServedTeacher(server, server.fingerprint(tokenizer), 4, len(tokenizer), dataset=rows)
    collate = source.collator(lambda features: {"row_id": torch.tensor([f["row_id"] for f in features]),
                                                "labels": torch.tensor([f["labels"] for f in features])}, tokenizer)
    batch = collate(rows[:2])
    assert sorted(source.pending) == [0, 1]  # asked for as soon as the batch was collated
    fetched = source.targets(batch, student=None).teacher["teacher_topk"]
    assert not source.pending
    direct = [server.row_topk(row, 4, len(tokenizer)) for row in rows[:2]]
    assert torch.equal(fetched.token_ids, torch.cat([top.token_ids for top in direct]))
    late = {"row_id": torch.tensor([2]), "labels": torch.tensor([rows[2]["labels"]])}  # not fetched ahead
    assert torch.equal(source.targets(late, student=None).teacher["teacher_topk"].token_ids,
                       server.row_topk(rows[2], 4, len(tokenizer)).token_ids)
    assert source.log_figures(steps=2)["teacher_wait_s"] >= 0
    source.at_checkpoint()
    standin.table = standin.table.roll(1, dims=1)
    with pytest.raises(TeacherServerError, match="now serves another model than the one this run started with"):
        source.at_checkpoint()
    source.close()


def test_rollout_batches_are_scored_as_they_are_not_as_fetched_ahead(standin, tokenizer):
    """An on-policy batch replaces the rows fetched ahead: the source scores the batch's own tokens, with the
    teacher's log-probability of each answer token itself (what `sampled` steps read)."""
    server = connected(standin, tokenizer)
    row = feature(tokenizer, 0)
    source = ServedTeacher(server, server.fingerprint(tokenizer), 4, len(tokenizer), dataset=[row])
    source.collator(lambda features: {}, tokenizer)([row])  # fetched ahead, as at collate time
    answer = tokenizer("a green wave", add_special_tokens=False)["input_ids"]
    ids = row["input_ids"][:3] + answer
    batch = {"input_ids": torch.tensor([ids + [0]]), "attention_mask": torch.tensor([[1] * len(ids) + [0]]),
             "labels": torch.tensor([[IGNORE_INDEX] * 3 + answer + [IGNORE_INDEX]]), "row_id": torch.tensor([0]),
             "rollout": torch.tensor([True])}
    targets = source.targets(batch, student=None)
    assert not source.pending
    top, values = standin.expected(ids[2:-1], 4)
    assert torch.equal(targets.teacher["teacher_topk"].token_ids, top)
    own = torch.tensor([float(standin.table[ids[t], ids[t + 1]]) for t in range(2, len(ids) - 1)])
    torch.testing.assert_close(targets.token_log_probs, own)
    source.close()
