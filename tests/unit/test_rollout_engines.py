"""The transformers rollout engine against the references of tests/rollout_reference.py (the vLLM engine meets the
same ones in tests/e2e/test_rollout_server.py): a stopped answer keeps its stop token as its last label, the cached
decoding's log-probabilities equal a full forward at every step, prompt plus answer never pass the positions, and
top-p keeps exactly the tokens up to the one that crosses p. Also: the gap figure keeps a NaN, the served engine's
sync schedule and its refusals' wording."""

from __future__ import annotations

import math

import pytest
import torch

from llmneo.demo.tiny import build_tiny_llama
from llmneo.errors import ConfigError, RolloutServerError
from llmneo.rollout_engines import AdapterSync, Answers, RolloutEngine, ServedEngine, TransformersEngine, nucleus
from llmneo.rollouts import IGNORE_INDEX, Rollouts, RolloutSettings, RolloutStats, stop_token_ids
from llmneo.server_client import ServerSettings
from rollout_reference import full_forward_log_probs, nucleus_set, stop_kept

PROMPTS = [[5, 17, 33, 9, 40, 41], [7, 8, 60]]  # two lengths: the shorter is left-padded


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny_llama(tokenizer, hidden_size=32, seed=3).eval()


def engine(tokenizer, temperature=1.0, top_p=1.0, stops=None, budget=12):
    settings = RolloutSettings(budget, temperature, top_p, 0)
    return TransformersEngine(settings, stops or stop_token_ids(tokenizer), tokenizer.pad_token_id)


def test_a_stopped_answer_keeps_its_stop_token_as_its_last_label(model, tokenizer):
    free = engine(tokenizer, temperature=0, stops={-1}).generate(model, PROMPTS[:1], [0], 12).tokens[0]
    stop = free[3]
    stopped = engine(tokenizer, temperature=0, stops={stop}).generate(model, PROMPTS[:1], [0], 12)
    expected = free[:free.index(stop) + 1]
    assert stopped.tokens[0] == expected and stop_kept(stopped.tokens[0], {stop}) and stopped.cut == [False]
    rollouts = Rollouts(RolloutSettings(12, 0.0, 1.0, 0), tokenizer, engine(tokenizer, 0, stops={stop}))
    inputs = {"input_ids": torch.tensor([PROMPTS[0] + [1, 2]]), "labels": torch.tensor([[IGNORE_INDEX] * 6 + [1, 2]])}
    batch = rollouts.batch(model, inputs, step=0)
    labelled = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    assert labelled == expected and labelled[-1] == stop


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_cached_decoding_equals_a_full_forward_at_every_step(model, tokenizer, temperature, top_p):
    answers = engine(tokenizer, temperature, top_p, stops={-1}).generate(model, PROMPTS, [11, 12], 12)
    assert [len(answer) for answer in answers.tokens] == [12, 12] and answers.cut == [True, True]
    for prompt, answer, log_probs in zip(PROMPTS, answers.tokens, answers.log_probs, strict=True):
        reference = full_forward_log_probs(model, prompt, answer)
        assert max(abs(a - b) for a, b in zip(log_probs, reference, strict=True)) <= 1e-5


class Limited(RolloutEngine):
    """An engine with a position limit of its own (as a server's max_model_len), answering at full budget."""

    def positions(self) -> int:
        return 10

    def generate(self, model, prompts, seeds, budget):
        return Answers([[3] * budget for _ in prompts], [True] * len(prompts), [[0.0] * budget for _ in prompts])


def test_prompt_and_answer_never_pass_the_positions(tokenizer):
    short = build_tiny_llama(tokenizer, hidden_size=32, seed=3).eval()
    short.config.max_position_embeddings = 9
    rollouts = Rollouts(RolloutSettings(16, 1.0, 1.0, 0), tokenizer, engine(tokenizer, stops={-1}))
    answers, _ = rollouts.generate(short, PROMPTS, [1, 2])
    assert [len(answer) for answer in answers] == [3, 3]  # the longest prompt (6) + 3 = 9 positions
    with pytest.raises(ConfigError, match="an on-policy prompt of 9 tokens leaves no room for an answer in the "
                                          "model's 9 positions: lower --max_length"):
        rollouts.generate(short, [list(range(5, 14))], [1])
    limited = Rollouts(RolloutSettings(16, 1.0, 1.0, 0), tokenizer, Limited(RolloutSettings(), set()))
    model = build_tiny_llama(tokenizer, hidden_size=32, seed=3).eval()
    assert [len(answer) for answer in limited.generate(model, PROMPTS, [1, 2])[0]] == [4, 4]  # the engine's 10


@pytest.mark.parametrize("top_p", [0.75, 0.76, 0.5, 0.1, 0.999])
def test_top_p_keeps_the_tokens_up_to_the_one_that_crosses_p(top_p):
    probs = [0.125, 0.5, 0.0625, 0.25, 0.0625]  # exact in binary: 0.75 is reached exactly by two tokens
    kept = nucleus(torch.tensor([probs]), top_p)[0]
    assert {i for i, p in enumerate(kept.tolist()) if p > 0} == nucleus_set(probs, top_p)
    assert kept.sum().item() == pytest.approx(1.0)
    generator = torch.Generator().manual_seed(0)
    random = torch.softmax(torch.randn(4, 50, generator=generator) * 3, dim=-1)
    for row, renormalised in zip(random, nucleus(random, top_p), strict=True):
        assert {i for i, p in enumerate(renormalised.tolist()) if p > 0} == nucleus_set(row.tolist(), top_p)


def test_sampling_at_top_p_draws_only_from_the_nucleus_and_from_all_of_it(model, tokenizer):
    prompt = PROMPTS[0]
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1].double() / 0.1, dim=-1)
    allowed = nucleus_set(probs.tolist(), 0.8)
    mass = sum(probs[i].item() for i in allowed)
    likely = {i for i in allowed if probs[i].item() / mass > 0.03}  # each missed by 200 draws with p < 0.3%
    first = {engine(tokenizer, 0.1, 0.8, stops={-1}).generate(model, [prompt], [seed], 1).tokens[0][0]
             for seed in range(200)}
    assert first <= allowed and likely <= first and len(first) >= 2


def test_the_largest_gap_is_kept_and_a_nan_shows():
    stats = RolloutStats()
    for gap in (1e-6, 3e-4, 2e-5):
        stats.observe_gap(gap)
    assert stats.figures()["rollout_logprob_gap"] == 3e-4
    stats.observe_gap(math.nan)
    stats.observe_gap(0.5)
    assert math.isnan(stats.figures()["rollout_logprob_gap"])


class Recorded(ServedEngine):
    """The served engine with the adapter writing and the server replaced by a record of the syncs."""

    def _sync(self, model, step, tries=None):
        self.synced.append(step)
        self.sync.last_step = step if step is not None else 0


@pytest.mark.parametrize("every,expected_syncs,staleness", [(1, [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]),
                                                            (2, [0, 2, 4], [0, 1, 0, 1, 0]),
                                                            (3, [0, 3], [0, 1, 2, 0, 1])])
def test_the_adapter_is_synced_every_n_on_policy_steps(tmp_path, every, expected_syncs, staleness):
    served = Recorded(RolloutSettings(), {2}, ServerSettings("http://127.0.0.1:1/v1"), AdapterSync(tmp_path, every))
    served.synced = []
    for step in range(5):
        served.before_step(None, step)
    assert served.synced == expected_syncs and served.sync.staleness == staleness
    assert served.figures()["rollout_staleness"] == max(staleness) and served.sync.staleness == []


@pytest.mark.parametrize("status,reason,expected", [
    (404, '{"detail":"Not Found"}', "does not take adapters at run time: start vLLM with the environment variable "
                                    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"),
    (500, "Call to add_lora method failed: Worker failed with error 'LoRA rank 16 is greater than max_lora_rank 8.'",
     "the adapter's rank 16 is above rollout server http://h:1/v1's --max-lora-rank: restart vLLM with "
     "--max-lora-rank 16, or lower --lora_r"),
    (500, "Worker failed with error 'LoRA is not enabled. Use --enable-lora to enable LoRA.'",
     "has LoRA off: start vLLM with --enable-lora"),
    (400, "something else", "refused the student's adapter: something else"),
])
def test_a_refused_first_adapter_is_explained(tokenizer, status, reason, expected):
    from llmneo.adapters.lora import add_lora
    from llmneo.config import AdapterArguments

    student = add_lora(build_tiny_llama(tokenizer, hidden_size=32, seed=3), AdapterArguments(lora_r=16))
    served = ServedEngine(RolloutSettings(), {2}, ServerSettings("http://h:1/v1", option="--rollout_server"),
                          AdapterSync(None))
    message = served._refusal(RolloutServerError("x", reason=reason, status=status), student)
    assert expected in message
