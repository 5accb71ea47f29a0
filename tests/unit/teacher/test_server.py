"""The served-teacher client (teacher/server.py) and source (ServedTeacher) against an in-process stand-in: rows
against the stand-in's own model, retries, every refusal and fault message, the fingerprint's tolerance."""

from __future__ import annotations

import json
import math
import time
from types import SimpleNamespace

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
    server.fingerprint()
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
    (lambda positions: [None, *[{t: v for t, v in p.items() if v["rank"] != 1} for p in positions[1:]]],
     "returned 2 of 3 log-probabilities for training row 7 at position 2"),
    # row 1 of the reliability round: values that are not log-probabilities
    (lambda positions: [None, *[{t: {**v, "logprob": v["logprob"] + 8.0} for t, v in p.items()} for p in positions[1:]]],
     r"returned log-probability \d+\.\d+ > 0 for token \d+ at training row 7 at position 2: not a log-probability "
     r"\(tolerance 0\.0001\)"),
    # row 2: top-k probabilities summing past 1 (each value still <= 0)
    (lambda positions: [None, *[{t: {**v, "logprob": -0.05 * v["rank"]} for t, v in p.items()} for p in positions[1:]]],
     r"top-3 probabilities sum to 2\.7\d* for training row 7 at position 2: more than 1 \(tolerance 0\.001\)"),
    # row 3: every entry rank 1
    (lambda positions: [None, *[{t: {**v, "rank": 1} for t, v in p.items()} for p in positions[1:]]],
     r"returned ranks \[1, 1, 1.*\] for training row 7 at position 2: the top 3 must have ranks 1\.\.3, each once"),
    # ranks that disagree with the values
    (lambda positions: [None, *[{t: {**v, "rank": 4 - v["rank"] if v["rank"] <= 3 else v["rank"]} for t, v in p.items()}
                                for p in positions[1:]]],
     r"log-probability -\d+\.\d+ at rank 2 above -\d+\.\d+ at rank 1 for training row 7 at position 2"),
    # row 4: null or a list where an entry belongs, null inside an entry
    (lambda positions: [None, None, None, ["a", 1], *positions[4:]],
     r"returned a list where the log-probabilities of training row 7 at position 2 belong"),
    (lambda positions: [None, *[{t: None for t in p} for p in positions[1:]]],
     r"returned null for token \d+ at training row 7 at position 2: expected"),
    (lambda positions: [None, *[{t: {"logprob": "x", "rank": 1} for t in p} for p in positions[1:]]],
     r"returned \{\"logprob\": \"x\", \"rank\": 1\} for token \d+ at training row 7 at position 2"),
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
        with pytest.raises(TeacherServerError, match="HTTP 401: Unauthorized; the server wants an API key: put it in "
                                                     "an environment variable and name that variable with "
                                                     "--teacher_server_api_key_env"):
            client(server.url).connect(tokenizer)
        monkeypatch.setenv("NEO_KEY", "")
        with pytest.raises(ConfigError, match="NEO_KEY: that environment variable is set but empty"):
            client(server.url, api_key_env="NEO_KEY").connect(tokenizer)
        monkeypatch.setenv("NEO_KEY", "wrong")
        with pytest.raises(TeacherServerError, match=r"HTTP 401: Unauthorized; the server refused the key in \$NEO_KEY"):
            client(server.url, api_key_env="NEO_KEY").connect(tokenizer)
        monkeypatch.setenv("NEO_KEY", "s3cret")
        assert client(server.url, api_key_env="NEO_KEY").connect(tokenizer).model == "teacher"
        assert server.requests[-1][1]["authorization"] == "Bearer s3cret"
    finally:
        server.close()


def test_fingerprint_tolerates_noise_not_another_model(standin, tokenizer):
    server = connected(standin, tokenizer)
    saved = server.fingerprint()
    assert same_probe(saved, server.fingerprint())
    noisy = {**saved, "probe": [[[token, value + 0.01] for token, value in row] for row in saved["probe"]]}
    assert same_probe(saved, noisy)
    assert not same_probe(saved, {**saved, "server_model": "other"})
    standin.table = standin.table.roll(1, dims=1)  # other weights under the same name
    changed = server.fingerprint()
    assert not same_probe(saved, changed)
    identity = {"options": {}, "data": {}, "teacher": {"served_teacher": saved}}
    assert differences(identity, {**identity, "teacher": {"served_teacher": noisy}}) == []
    assert differences(identity, {**identity, "teacher": {"served_teacher": changed}}) == [
        "the served teacher 'teacher': its log-probabilities of the probe differ (another model, or other weights)"]


def test_served_source_fetches_ahead_and_checks_the_probe(standin, tokenizer):
    server = connected(standin, tokenizer)
    rows = [feature(tokenizer, row) for row in range(3)]
    source = ServedTeacher(server, server.fingerprint(), 4, len(tokenizer), dataset=rows)
    collate = source.collator(lambda features: {"row_id": torch.tensor([f["row_id"] for f in features]),
                                                "labels": torch.tensor([f["labels"] for f in features])}, tokenizer)
    batch = collate(rows[:2])
    assert sorted(source.pending) == [0, 1]  # asked for as soon as the batch was collated
    fetched = source.targets(batch, student=None).teacher.rows
    assert not source.pending
    direct = [server.row_topk(row, 4, len(tokenizer)) for row in rows[:2]]
    assert torch.equal(fetched.token_ids, torch.cat([top.token_ids for top in direct]))
    late = {"row_id": torch.tensor([2]), "labels": torch.tensor([rows[2]["labels"]])}  # not fetched ahead
    assert torch.equal(source.targets(late, student=None).teacher.rows.token_ids,
                       server.row_topk(rows[2], 4, len(tokenizer)).token_ids)
    assert source.log_figures(steps=2)["teacher_wait_s"] >= 0
    source.at_checkpoint()
    standin.table = standin.table.roll(1, dims=1)
    with pytest.raises(TeacherServerError, match="now serves another model than the one this run started with"):
        source.at_checkpoint()
    source.close()


def test_rollout_batches_are_scored_as_they_are_and_their_rows_never_asked_for(standin, tokenizer):
    """In an on-policy run collated rows wait until their step is known: the rows an on-policy step replaces are
    never asked for; the source scores the batch's own tokens, with the teacher's log-probability of each answer
    token itself (what `sampled` steps read); rows collated ahead for an off-policy step are asked for at once."""
    server = connected(standin, tokenizer)
    rows = []
    for row, text in enumerate(["the sea is blue and calm", "a storm comes over the hill", "grey clouds and rain"]):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 3 + ids[3:], "row_id": row})
    source = ServedTeacher(server, server.fingerprint(), 4, len(tokenizer), dataset=rows, deferred=True)
    before = len(standin.requests)
    source.collator(lambda features: {}, tokenizer)([rows[0], rows[1]])  # step k, on-policy
    source.collator(lambda features: {}, tokenizer)([rows[2]])  # collated ahead for step k + 1, off-policy
    assert len(standin.requests) == before and not source.pending
    source.planned([0, 1], on_policy=True, next_on_policy=False)
    assert sorted(source.pending) == [2] and not source.waiting
    row = rows[0]
    answer = tokenizer("a green wave", add_special_tokens=False)["input_ids"]
    ids = row["input_ids"][:3] + answer
    batch = {"input_ids": torch.tensor([ids + [0]]), "attention_mask": torch.tensor([[1] * len(ids) + [0]]),
             "labels": torch.tensor([[IGNORE_INDEX] * 3 + answer + [IGNORE_INDEX]]), "row_id": torch.tensor([0]),
             "rollout": torch.tensor([True])}
    targets = source.targets(batch, student=None)
    source.pending[2][0].result()  # the row asked for ahead is answered in the background: wait for it
    asked = [body["prompt"] for path, body in standin.requests[before:] if path == "/v1/completions"]
    assert row["input_ids"] not in asked and rows[1]["input_ids"] not in asked  # replaced rows: never
    assert sorted(asked) == sorted([ids, rows[2]["input_ids"]])  # the rollout row, and the row for the next step
    top, values = standin.expected(ids[2:-1], 4)
    assert torch.equal(targets.teacher.rows.token_ids, top)
    own = torch.tensor([float(standin.table[ids[t], ids[t + 1]]) for t in range(2, len(ids) - 1)])
    torch.testing.assert_close(targets.teacher.token_log_probs, own)
    source.close()


def _same_token_twice(handler, data: bytes) -> None:
    """A completions answer whose first position names one token twice (JSON keeps the last of duplicate keys)."""
    answer = json.loads(data)
    entry = answer["choices"][0]["prompt_logprobs"][1]
    token, value = next(iter(entry.items()))
    text = json.dumps(answer).replace(json.dumps({token: value})[1:-1],
                                      json.dumps({token: value})[1:-1] + ", " + json.dumps({token: value})[1:-1], 1)
    _send_raw(handler, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
              + str(len(text)).encode() + b"\r\n\r\n" + text.encode())


def _send_raw(handler, data: bytes, pause: float = 0.0) -> None:
    handler.close_connection = True
    if not pause:
        handler.wfile.write(data)
        return
    for i in range(len(data)):
        handler.wfile.write(data[i:i + 1])
        handler.wfile.flush()
        time.sleep(pause)


def _bad_status_line(handler, data: bytes) -> None:
    _send_raw(handler, b"HTPP/1.1 2OO fine\r\n\r\n" + data)


def _short_body(handler, data: bytes) -> None:
    _send_raw(handler, b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(data) + 100).encode() + b"\r\n\r\n" + data)


def test_a_token_named_twice_at_one_position_is_refused(standin, tokenizer):
    server = connected(standin, tokenizer)
    standin.raw = _same_token_twice
    with pytest.raises(TeacherServerError, match=r"not valid JSON \(key '\d+' appears twice in one object\)"):
        server.row_topk(feature(tokenizer, row=7), 3, len(tokenizer))


@pytest.mark.parametrize("fault, message", [
    (_bad_status_line, r"malformed status line 'HTPP/1.1 2OO fine"),
    (_short_body, r"the answer broke off after \d+ bytes, 100 more were announced"),
])
def test_broken_http_is_named_in_one_line_and_retried(standin, tokenizer, fault, message):
    """Row 4: a malformed status line or a body shorter than its Content-Length is one line, tried again (a
    retry can help: the next answer may be whole), and a good answer after it is taken."""
    server = connected(standin, tokenizer, retries=2)
    standin.raw = fault
    before = sum(path == "/v1/completions" for path, _ in standin.requests)
    with pytest.raises(TeacherServerError, match=message + r".*\(after 3 tries\)") as raised:
        server.row_topk(feature(tokenizer, row=7), 3, len(tokenizer))
    assert "\n" not in str(raised.value)
    assert sum(path == "/v1/completions" for path, _ in standin.requests) == before + 3
    calls = []
    standin.raw = lambda handler, data: (calls.append(1), fault(handler, data)) if not calls else _send_raw(
        handler, b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    assert len(server.row_topk(feature(tokenizer, row=7), 3, len(tokenizer))) > 0


def test_the_timeout_bounds_the_whole_answer_not_each_read(standin, tokenizer):
    """Row 5: a server that sends a valid answer a byte every 0.2 s with a 1 s timeout and one retry is given up
    on after about 2 s, not after the many seconds the whole answer would take."""
    server = connected(standin, tokenizer, retries=1, timeout=1.0)
    standin.raw = lambda handler, data: _send_raw(
        handler, b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data, pause=0.2)
    start = time.monotonic()
    with pytest.raises(TeacherServerError, match=r"no whole answer within 1 s \(--teacher_server_timeout\) "
                                                 r"\(after 2 tries\)"):
        server.row_topk(feature(tokenizer, row=7), 3, len(tokenizer))
    assert time.monotonic() - start < 4.0


def test_retries_wait_a_doubling_backoff(standin, tokenizer, monkeypatch):
    waits = []  # the client's own waits only (patching time.sleep itself would also catch other threads' sleeps)
    monkeypatch.setattr("llmneo.server_client.time", SimpleNamespace(sleep=waits.append))
    server = TeacherServer(ServerSettings(standin.url, retries=3, backoff=0.5)).connect(tokenizer)
    standin.failures = 3
    server.prompt_logprobs([1, 2, 3], 2)
    assert waits == [0.5, 1.0, 2.0]
    standin.failures = 4
    with pytest.raises(TeacherServerError, match="after 4 tries"):
        server.prompt_logprobs([1, 2, 3], 2)
    assert waits[3:] == [0.5, 1.0, 2.0]  # no wait after the last try


def test_the_standin_answers_in_vllms_order(standin, tokenizer):
    """Each position: its own next token first, then the top-k by rank; the unit layer sees what vLLM sends."""
    server = connected(standin, tokenizer)
    ids = feature(tokenizer)["input_ids"]
    entries = server.prompt_logprobs(ids, 3)
    for t, entry in enumerate(entries):
        keys = list(entry)
        assert keys[0] == str(ids[t + 1])
        rest = [int(entry[key]["rank"]) for key in keys[1:]]
        assert rest == sorted(rest) and set(range(1, 4)) <= {int(v["rank"]) for v in entry.values()}


def test_a_changed_value_at_the_same_ids_is_another_model(standin, tokenizer):
    """The probe comparison looks at values, not only at which ids come first: weights scaled so the order of
    every row stays while its values move are another model."""
    server = connected(standin, tokenizer)
    saved = server.fingerprint()
    standin.table = torch.log_softmax(standin.table * 1.5, dim=-1)  # same ranking, other probabilities
    changed = server.fingerprint()
    assert [[token for token, _ in row] for row in changed["probe"]] == [[token for token, _ in row]
                                                                          for row in saved["probe"]]
    assert not same_probe(saved, changed)
    shifted = {**saved, "probe": [[[token, value - 0.06] for token, value in row] for row in saved["probe"]]}
    assert not same_probe(saved, shifted)  # just past the stated tolerance of 0.05


def test_open_checks_k_right_after_connecting(standin, tokenizer):
    """check_top_k needs only connect (it read a probe only fingerprint() set); open does connect, fingerprint
    and the k check, in one call, for runs and cache captures alike."""
    client(standin.url).connect(tokenizer).check_top_k(20, "--top_k")
    server, fingerprint = TeacherServer.open(ServerSettings(standin.url, backoff=0.0), tokenizer, 8, "--top_k")
    assert fingerprint == server.fingerprint() and fingerprint["server_model"] == "teacher"
    with pytest.raises(ConfigError, match=r"--top_k 32 is more than .* returns \(20\)"):
        TeacherServer.open(ServerSettings(standin.url, backoff=0.0), tokenizer, 32, "--top_k")
