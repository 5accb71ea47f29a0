"""Distilling across tokenizers through the trainer and the pipeline: equal to the one-tokenizer loss when the
tokenizers are one, and a real run from a character-level teacher into the BPE student."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import run_flags
from llmneo.config import parse_config
from llmneo.data.loading import TeacherSide, build_dataset
from llmneo.data.vocabulary import byte_lengths
from llmneo.runtime.layout import MAP_FILE
from llmneo.errors import ConfigError
from llmneo.evaluation.metrics import HeldOutOptions, evaluate_against_teacher
from llmneo.data.collators import make_collator
from llmneo.models.loading import load_reading_tokenizer, load_student_tokenizer
from llmneo.pipeline import distill
from llmneo.teacher.choice import load_models, teacher_signal
from llmneo.training.setup import build_trainer


def first_step(models_dir, train_file, tmp_path, teacher: str, loss_impl: str, **extra):
    """Loss, CE, KD and trainable gradients of one micro-batch of 8 rows through TokenDistillTrainer.compute_loss."""
    config = parse_config(run_flags(models_dir, train_file, tmp_path / "run", teacher=teacher, loss_impl=loss_impl,
                                    alpha=0.3, temperature=2.0, **extra))
    tokenizer = load_student_tokenizer(config.model)
    teacher_tokenizer = (load_reading_tokenizer(config.model.teacher_model, role="teacher")
                         if config.training.cross_tokenizer else None)
    dataset, _ = build_dataset(config.data, tokenizer, config.training.seed, TeacherSide(teacher_tokenizer))
    torch.manual_seed(0)
    models = load_models(config, tokenizer, teacher_tokenizer=teacher_tokenizer)
    (tmp_path / "run").mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(config, models, teacher_signal(config, models), dataset)
    batch = trainer.data_collator([dataset[i] for i in range(8)])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(400))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    terms = trainer.loss_terms()
    return loss.detach(), terms["ce_loss"].detach(), terms["kd_loss"].detach(), grads


@pytest.mark.e2e
@pytest.mark.parametrize("loss_impl", ["fused", "naive"])
@pytest.mark.parametrize("teacher", ["teacher", "teacher_padded"])
def test_exact_with_one_tokenizer_equals_the_standard_step(models_dir, train_file, tmp_path, loss_impl, teacher):
    """Through the data, the collator and TokenDistillTrainer: --cross_tokenizer exact with the student's own tokenizer
    gives the standard loss, CE, KD and gradients (1e-5), the padded-vocabulary teacher included."""
    standard = first_step(models_dir, train_file, tmp_path / "a", models_dir[teacher], loss_impl)
    across = first_step(models_dir, train_file, tmp_path / "b", models_dir[teacher], loss_impl, cross_tokenizer="exact")
    for ours, reference in zip(across[:3], standard[:3], strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert standard[3].keys() == across[3].keys()
    for name, grad in standard[3].items():
        torch.testing.assert_close(across[3][name], grad, rtol=1e-5, atol=1e-5)


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["exact", "hybrid"])
def test_a_run_across_tokenizers(models_dir, train_file, tmp_path, char_teacher, mode):
    out = tmp_path / "run"
    summary = distill(parse_config(run_flags(models_dir, train_file, out, teacher=char_teacher, cross_tokenizer=mode,
                                             eval_ratio=0.2, max_length=256)))
    assert summary.steps == 3 and (out / MAP_FILE).is_file()
    metrics = summary.final_metrics
    assert 0.5 < metrics["aligned_coverage"] < 1.0 and 0.3 < metrics["teacher_mapped_mass"] <= 1.0
    for name in ("eval_aligned_kl", "eval_aligned_coverage", "eval_bits_per_byte", "eval_perplexity"):
        assert math.isfinite(metrics[name]), name
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [entry for entry in logged if "kd_loss" in entry]
    assert len(steps) == 3 and all(math.isfinite(entry["kd_loss"]) and entry["kd_loss"] > 0 for entry in steps)


def test_cross_tokenizer_refuses_what_it_cannot_do(models_dir, train_file, tmp_path):
    base = run_flags(models_dir, train_file, tmp_path / "run", cross_tokenizer="exact")
    for extra, message in ((["--packing", "true"], "needs padded rows"),
                           (["--loss_impl", "liger"], "use loss_impl fused or naive")):
        with pytest.raises(ConfigError, match=message):
            parse_config(base + extra)
    with pytest.raises(ConfigError, match="cache_tail renormalize is for a cache over the student's own tokens"):
        parse_config(base + ["--teacher_cache", str(tmp_path), "--cache_tail", "renormalize"])
    with pytest.raises(ConfigError, match="teacher_chat_template is for a teacher with another tokenizer"):
        parse_config(run_flags(models_dir, train_file, tmp_path / "run", teacher_chat_template="plain"))
    lora = run_flags(models_dir, train_file, tmp_path / "run", method="lora", cross_tokenizer="uld")
    with pytest.raises(ConfigError, match="cross_tokenizer uld is for the kd and neo methods, not lora"):
        parse_config(lora)


def test_bits_per_byte_equals_a_hand_computation(models_dir, tokenizer):
    """NLL of the answer tokens in bits over the UTF-8 bytes of the answer text (markers count no bytes)."""
    from llmneo.data.tokenize import encode_messages
    from transformers import AutoModelForCausalLM
    import datasets

    answer = "Ça va? 東京 is big."
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": answer}]
    ids, labels = encode_messages(tokenizer, messages, 256)
    model = AutoModelForCausalLM.from_pretrained(models_dir["student"]).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    nll = sum(-F.log_softmax(logits[t - 1], -1)[ids[t]].item() for t in range(1, len(ids)) if labels[t] != -100)
    answer_bytes = len(answer.encode("utf-8")) + len("\n")  # "<|im_end|>" is no text; the "\n" after it is
    dataset = datasets.Dataset.from_dict({"input_ids": [ids], "labels": [labels]})
    metrics = evaluate_against_teacher(model, dataset, make_collator(tokenizer),
                                       options=HeldOutOptions(byte_lengths=byte_lengths(tokenizer)))
    assert metrics["answer_bytes"] == answer_bytes
    assert metrics["bits_per_byte"] == pytest.approx(nll / math.log(2) / answer_bytes, rel=1e-6)


@pytest.mark.e2e
def test_eval_compares_a_teacher_with_another_tokenizer_at_aligned_boundaries(models_dir, char_teacher, tmp_path):
    """`llm-neo eval` of a model directory beside a teacher with another tokenizer: bits per byte for the model,
    and the aligned-boundary metrics instead of token-by-token ones."""
    from llmneo.evaluation.evaluate import EvalRequest, evaluate_target
    from conftest import write_jsonl
    from llmneo.demo.tiny import corpus_rows

    data = write_jsonl(tmp_path / "held.jsonl", corpus_rows()[:6])
    metrics = evaluate_target(EvalRequest(target=models_dir["student"], dataset=data, teacher_model=char_teacher,
                                          max_length=256, bootstrap=0), write=False)["held_out"]
    assert "kl_to_teacher" not in metrics and "top1_agreement" not in metrics
    assert 0.5 < metrics["aligned_coverage"] < 1 and metrics["aligned_kl"] > 0 and metrics["bits_per_byte"] > 0
    same = evaluate_target(EvalRequest(target=models_dir["student"], dataset=data, teacher_model=models_dir["teacher"],
                                       max_length=256, bootstrap=0), write=False)["held_out"]
    assert "kl_to_teacher" in same and "aligned_kl" not in same
    assert same["bits_per_byte"] == pytest.approx(metrics["bits_per_byte"])
    # A model directory whose tokenizer has no chat template reads the rows through the fallback template.
    alone = evaluate_target(EvalRequest(target=char_teacher, dataset=data, max_length=256, bootstrap=0),
                            write=False)["held_out"]
    assert math.isfinite(alone["bits_per_byte"]) and alone["answer_bytes"] > 0


FULL_TOP_K = 100_000  # more than the teacher's vocabulary: every id is cached


def without_teacher(flags: list[str]) -> list[str]:
    at = flags.index("--teacher_model")
    return flags[:at] + flags[at + 2:]


@pytest.fixture(scope="module")
def aligned_cache(models_dir, train_file, char_teacher, tmp_path_factory):
    """A float32 cache of every teacher id at the aligned boundaries, captured through the CLI."""
    from llmneo import cli

    cache_dir = tmp_path_factory.mktemp("aligned-cache") / "cache"
    flags = run_flags(models_dir, train_file, cache_dir.parent / "unused", teacher=char_teacher,
                      cross_tokenizer="exact", max_length=256)
    assert cli.main(["cache-teacher", "--cache_dir", str(cache_dir), "--top_k", str(FULL_TOP_K), "--cache_dtype",
                     "float32", "--shard_rows", "16", "--cache_batch_size", "4", *flags]) == 0
    return cache_dir


def logged_steps(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["exact", "uld", "hybrid"])
def test_a_cache_across_tokenizers_trains_like_the_online_teacher(models_dir, train_file, tmp_path, char_teacher,
                                                                  aligned_cache, mode, monkeypatch):
    """One cache serves every mode. With every id cached in float32, the run without the teacher (nor its tokenizer)
    logs the losses, gradient norms and coverage of the run with the teacher online, and trains the same adapter."""
    from safetensors.torch import load_file
    import llmneo.teacher.choice as choice_module
    import llmneo.teacher.signal as signal_module

    flags = run_flags(models_dir, train_file, tmp_path / "online", teacher=char_teacher, cross_tokenizer=mode,
                      max_length=256)
    online = distill(parse_config(flags))
    monkeypatch.setattr(choice_module, "load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    monkeypatch.setattr(signal_module, "load_reading_tokenizer",
                        lambda *a, **k: pytest.fail("the teacher's tokenizer was loaded"))
    cached = distill(parse_config(without_teacher(run_flags(
        models_dir, train_file, tmp_path / "cached", teacher=char_teacher, cross_tokenizer=mode, max_length=256,
        teacher_cache=aligned_cache))))
    pairs = list(zip(logged_steps(tmp_path / "online"), logged_steps(tmp_path / "cached"), strict=True))
    assert sum("kd_loss" in line for line, _ in pairs) == 3
    for online_line, cached_line in pairs:
        for key in ("loss", "ce_loss", "kd_loss", "grad_norm", "train_aligned_coverage", "train_teacher_mapped_mass"):
            if key in online_line:
                assert cached_line[key] == pytest.approx(online_line[key], rel=1e-4, abs=1e-6), key
    assert cached.final_metrics["aligned_coverage"] == online.final_metrics["aligned_coverage"]
    weights = [load_file(run / "adapter" / "adapter_model.safetensors") for run in (online.run_dir, cached.run_dir)]
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-4, atol=1e-6)


@pytest.mark.e2e
def test_a_cache_is_refused_by_a_run_of_the_other_kind(models_dir, train_file, tmp_path, char_teacher, aligned_cache):
    from llmneo.teacher.capture import CaptureSettings, cache_teacher

    one_tokenizer = tmp_path / "one-tokenizer-cache"
    cache_teacher(parse_config(run_flags(models_dir, train_file, tmp_path / "unused")), one_tokenizer,
                  CaptureSettings(top_k=8, shard_rows=64))
    cases = (({"cross_tokenizer": "exact", "teacher_cache": one_tokenizer}, "needs a cache captured with --cross_tokenizer"),
             ({"teacher_cache": aligned_cache}, r"was captured across tokenizers .*: add --cross_tokenizer exact"),
             ({"cross_tokenizer": "uld", "teacher_cache": aligned_cache, "teacher_chat_template": "plain"},
              r"was captured with another --teacher_chat_template than this run's \(plain\)"))
    for number, (extra, message) in enumerate(cases):
        flags = without_teacher(run_flags(models_dir, train_file, tmp_path / f"run-{number}", teacher=char_teacher,
                                          max_length=256, **extra))
        with pytest.raises(ConfigError, match=message):
            distill(parse_config(flags))
        assert not (tmp_path / f"run-{number}" / "metrics.jsonl").exists()


@pytest.mark.e2e
def test_a_cache_across_tokenizers_places_its_rows_in_left_padded_batches(models_dir, train_file, tmp_path,
                                                                          char_teacher):
    """A student tokenizer that pads on the left shifts every row's positions in the batch: the cached boundaries
    are shifted like the online ones, so both runs log the same losses."""
    import shutil
    from llmneo import cli

    student = tmp_path / "left-student"
    shutil.copytree(models_dir["student"], student)
    settings = json.loads((student / "tokenizer_config.json").read_text())
    (student / "tokenizer_config.json").write_text(json.dumps({**settings, "padding_side": "left"}))
    models = {**models_dir, "student": str(student)}
    common = {"teacher": char_teacher, "cross_tokenizer": "exact", "max_length": 256}
    cache_dir = tmp_path / "cache"
    assert cli.main(["cache-teacher", "--cache_dir", str(cache_dir), "--top_k", str(FULL_TOP_K), "--cache_dtype",
                     "float32", *run_flags(models, train_file, tmp_path / "unused", **common)]) == 0
    distill(parse_config(run_flags(models, train_file, tmp_path / "online", **common)))
    distill(parse_config(without_teacher(run_flags(models, train_file, tmp_path / "cached", teacher_cache=cache_dir,
                                                   **common))))
    pairs = list(zip(logged_steps(tmp_path / "online"), logged_steps(tmp_path / "cached"), strict=True))
    assert sum("kd_loss" in line for line, _ in pairs) == 3
    for online_line, cached_line in pairs:
        for key in ("loss", "ce_loss", "kd_loss", "grad_norm"):
            if key in online_line:
                assert cached_line[key] == pytest.approx(online_line[key], rel=1e-4, abs=1e-6), key
