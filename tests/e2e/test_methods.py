"""The four methods through `distill`: what trains, what stays frozen, what is written, and merging."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

import llmneo.teacher.choice as choice
from conftest import run_flags
from llmneo.artifacts import merge_run
from llmneo.config import parse_config
from llmneo.pipeline import distill


class CaptureModel(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


def saved_weights(model_dir) -> dict:
    return load_file(f"{model_dir}/model.safetensors")


@pytest.fixture(scope="module")
def runs(models_dir, train_file, tmp_path_factory):
    """One short run per method, recording the trained model and every teacher forward call."""
    results = {}
    original_load_teacher = choice.load_teacher  # the one place a run's teacher model loads
    for method in ("sft", "lora", "kd", "neo"):
        calls, loaded = [], []

        def load_teacher(model_args, calls=calls, loaded=loaded, **kwargs):
            teacher = original_load_teacher(model_args, **kwargs)
            teacher.register_forward_hook(lambda *args: calls.append(1))
            loaded.append(teacher)
            return teacher

        choice.load_teacher = load_teacher
        try:
            out = tmp_path_factory.mktemp(method)
            capture = CaptureModel()
            summary = distill(parse_config(run_flags(models_dir, train_file, out, method=method)), callbacks=[capture])
        finally:
            choice.load_teacher = original_load_teacher
        results[method] = {"summary": summary, "model": capture.model, "teacher": loaded, "calls": calls, "out": out}
    return results


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["lora", "neo"])
def test_adapter_methods_freeze_base_and_train_adapter(runs, models_dir, method):
    model = runs[method]["model"]
    base = saved_weights(models_dir["student"])
    trained = {k: v for k, v in model.named_parameters()}
    compared = 0
    for name, value in trained.items():
        if "lora_" in name:
            continue
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(value.detach(), base[key]), f"base weight {key} changed"
        compared += 1
    assert compared == len(base)
    lora_b = [v for k, v in trained.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: non-zero means it trained


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["sft", "kd"])
def test_full_methods_train_the_student(runs, models_dir, method):
    model = runs[method]["model"]
    base = saved_weights(models_dir["student"])
    changed = [name for name, value in model.named_parameters() if not torch.equal(value.detach(), base[name])]
    assert len(changed) == len(base)


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["kd", "neo"])
def test_teacher_is_called_and_stays_bit_identical(runs, models_dir, method):
    (teacher,) = runs[method]["teacher"]
    assert runs[method]["calls"], "the teacher was never called"
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    reference = saved_weights(models_dir["teacher"])
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, reference[name]), name


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["sft", "lora"])
def test_ce_methods_never_load_or_call_the_teacher(runs, method):
    assert runs[method]["teacher"] == [] and runs[method]["calls"] == []
    logged = [json.loads(line) for line in (runs[method]["out"] / "metrics.jsonl").read_text().splitlines()]
    assert all(entry["kd_loss"] == 0 for entry in logged if "kd_loss" in entry)


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["sft", "lora", "kd", "neo"])
def test_run_directory_artifacts(runs, method):
    out = runs[method]["out"]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [entry for entry in logged if "ce_loss" in entry]
    assert [entry["step"] for entry in steps] == [1, 2, 3]
    for entry in steps:
        assert {"step", "loss", "ce_loss", "kd_loss", "learning_rate"} <= set(entry)
        if method in ("kd", "neo"):
            assert entry["kd_loss"] > 0
            assert entry["loss"] == pytest.approx(0.5 * entry["ce_loss"] + 0.5 * entry["kd_loss"], rel=1e-3)
        else:
            assert entry["loss"] == pytest.approx(entry["ce_loss"], rel=1e-3)
    weights = out / ("adapter/adapter_model.safetensors" if method in ("lora", "neo") else "model/model.safetensors")
    assert weights.is_file()
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt")) and not list(out.rglob("*.pth"))
    card = (out / "README.md").read_text()
    last = steps[-1]
    distils = method in ("kd", "neo")
    for needle in (f"llm-neo run: {method}", f"alpha (CE weight) | {0.5 if distils else 'CE only'}",
                   f"temperature | {1.0 if distils else 'CE only'}", "optimizer steps | 3",
                   f"final ce_loss | {last['ce_loss']}", f"final kd_loss | {last['kd_loss']}"):
        assert needle in card


@pytest.mark.e2e
def test_resolved_config_round_trips(runs):
    out = runs["neo"]["out"]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["distill"]["method"] == "neo" and saved["adapter"]["lora_alpha"] == 8.0
    reloaded = parse_config(["--config", str(out / "config.yaml")])
    assert reloaded.to_dict() == runs["neo"]["summary"].config.to_dict()


@pytest.mark.e2e
def test_merge_gives_the_same_logits_as_base_plus_adapter(runs, tmp_path):
    model = runs["neo"]["model"].eval()
    merged_dir = merge_run(runs["neo"]["out"], tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    ids = torch.randint(5, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        actual = merged(input_ids=ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    assert not hasattr(merged, "peft_config")


@pytest.mark.e2e
def test_merge_dtype_sets_the_merged_weights_dtype(runs, tmp_path):
    from llmneo import cli

    full = load_file(str(merge_run(runs["neo"]["out"], tmp_path / "fp32") / "model.safetensors"))
    assert cli.main(["merge", str(runs["neo"]["out"]), "--output", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    half = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert full.keys() == half.keys()
    for name, value in full.items():
        assert value.dtype == torch.float32 and half[name].dtype == torch.bfloat16, name
        # merged in bf16 from a fp32 base: within bf16 rounding of the fp32 merge
        torch.testing.assert_close(half[name].float(), value, atol=1e-3, rtol=2 ** -7, msg=name)


@pytest.mark.e2e
def test_merge_of_a_full_weights_run_copies_the_trained_model(runs, tmp_path):
    model = runs["sft"]["model"].eval()
    merged = AutoModelForCausalLM.from_pretrained(merge_run(runs["sft"]["out"], tmp_path / "merged")).eval()
    for name, value in model.state_dict().items():
        assert torch.equal(value, merged.state_dict()[name]), name


@pytest.mark.e2e
def test_merge_refuses_a_directory_that_is_not_a_run(tmp_path):
    from llmneo.errors import ConfigError

    with pytest.raises(ConfigError, match=r"is not a run directory: config.yaml is missing"):
        merge_run(tmp_path, tmp_path / "out")


@pytest.mark.e2e
def test_min_lr_ratio_floors_the_cosine_schedule(models_dir, train_file, tmp_path):
    flags = run_flags(models_dir, train_file, tmp_path, method="lora", max_steps=6, warmup_steps=0,
                      min_lr_ratio=0.5, learning_rate=0.01)
    distill(parse_config(flags))
    rates = [json.loads(line)["learning_rate"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if '"learning_rate"' in line]
    assert rates[0] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False)) and 0.005 < rates[-1] < 0.006
