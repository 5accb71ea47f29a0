"""Adapters: MoSLoRA against plain LoRA and its merged and exported forms, the PEFT variants end to end, the PEFT
option pass-through, and the QLoRA options' start-up errors."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import run_flags
from llmneo import cli
import llmneo
from llmneo.adapters.lora import adapter_options, add_lora, lora_config, peft_wrapping
from llmneo.adapters.moslora import MoSLoraLinear
from llmneo.adapters.store import export_plain_lora, load_adapter, save_adapter, save_initial_adapter, write_serving_adapter
from llmneo.artifacts import merge_run
from llmneo.config import AdapterArguments, parse_config
from llmneo.demo.tiny import build_tiny_llama
from llmneo.errors import ConfigError
from llmneo.evaluation.metrics import teacher_fidelity_kl
from llmneo.losses.divergences import forward_kl
from llmneo.models.loading import load_student
from llmneo.pipeline import distill

RANK = 4


def base_model(tokenizer):
    return build_tiny_llama(tokenizer, hidden_size=32, seed=11).eval()


def probe_ids(tokenizer):
    return torch.tensor([tokenizer.encode("What colour is the sky? The sky is blue.")[:12]] * 2)


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomise(model, pattern, seed):
    """Give the adapter non-trivial weights (B starts at zero, which would hide every difference)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if pattern in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def moslora_model(tokenizer, **options):
    model = add_lora(base_model(tokenizer), AdapterArguments(adapter="moslora", lora_r=RANK, lora_alpha=8, **options))
    randomise(model, "lora_B", seed=1)
    return model


def lora_modules(model, cls):
    return [module for module in model.modules() if isinstance(module, cls)]


def test_moslora_layers_replace_every_linear_but_the_head(tokenizer):
    model = moslora_model(tokenizer)
    layers = lora_modules(model, MoSLoraLinear)
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 decoder layers
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {name.split(".")[-3] for name in trainable} == {"lora_A", "lora_B", "lora_mixer"}
    assert all(layer.lora_mixer["default"].weight.shape == (RANK, RANK) for layer in layers)


def test_moslora_forward_is_b_mixer_a_scaled(tokenizer):
    """One layer against h = W0 x + (alpha / r) * B M A x written out here."""
    layer = lora_modules(moslora_model(tokenizer), MoSLoraLinear)[0]
    x = torch.randn(3, layer.in_features)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    mixer, w0 = layer.lora_mixer["default"].weight, layer.base_layer.weight
    expected = x @ w0.T + (8 / RANK) * (x @ a.T @ mixer.T @ b.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_moslora_with_identity_mixer_equals_plain_lora(tokenizer):
    ids = probe_ids(tokenizer)
    moslora = moslora_model(tokenizer)
    with peft_wrapping():
        plain = get_peft_model(base_model(tokenizer), LoraConfig(r=RANK, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for layer in lora_modules(moslora, MoSLoraLinear):
            layer.lora_mixer["default"].weight.copy_(torch.eye(RANK))
        plain.load_state_dict({k: v for k, v in moslora.state_dict().items() if "lora_mixer" not in k}, strict=False)
    torch.testing.assert_close(logits(moslora, ids), logits(plain, ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(moslora, ids), logits(base_model(tokenizer), ids))


def test_moslora_merge_save_reload_and_plain_export(tokenizer, tmp_path):
    ids = probe_ids(tokenizer)
    model = moslora_model(tokenizer)
    expected = logits(model, ids)
    save_adapter(model, tmp_path / "adapter", AdapterArguments(adapter="moslora"))
    reloaded = load_adapter(base_model(tokenizer), tmp_path / "adapter")
    assert torch.equal(logits(reloaded, ids), expected)
    merged = load_adapter(base_model(tokenizer), tmp_path / "adapter").merge_and_unload()
    assert not lora_modules(merged, MoSLoraLinear)
    torch.testing.assert_close(logits(merged, ids), expected, rtol=1e-5, atol=1e-5)
    export_plain_lora(tmp_path / "adapter", tmp_path / "plain")
    assert not any("mixer" in key for key in load_file(tmp_path / "plain" / "adapter_model.safetensors"))
    with peft_wrapping():
        stock = PeftModel.from_pretrained(base_model(tokenizer), tmp_path / "plain")  # stock PEFT, nothing registered
    torch.testing.assert_close(logits(stock, ids), expected, rtol=1e-5, atol=1e-5)


def test_a_sharded_models_adapter_is_saved_from_its_gathered_weights(tokenizer, tmp_path):
    """Under FSDP2 or ZeRO-3 each process holds a shard: the saved adapter is the gathered state dict's."""
    model = add_lora(base_model(tokenizer), AdapterArguments(lora_r=RANK, lora_alpha=8))
    gathered = {name: value + 1.0 if "lora_" in name else value for name, value in model.state_dict().items()}
    save_adapter(model, tmp_path / "adapter", AdapterArguments(), state_dict=gathered)
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    lora_names = [name for name in gathered if "lora_" in name]
    assert len(saved) == len(lora_names) > 0
    for name in lora_names:
        assert torch.equal(saved[name.replace(".default", "")], gathered[name]), name


def test_moslora_mixer_gradient_matches_the_formula(tokenizer):
    """For L = sum(g * h): dL/dM = s * B^T g^T (x A^T), written out here."""
    layer = lora_modules(moslora_model(tokenizer), MoSLoraLinear)[0]
    x, g = torch.randn(5, layer.in_features), torch.randn(5, layer.out_features)
    (layer(x) * g).sum().backward()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = (8 / RANK) * (b.T @ g.T) @ (x @ a.T)
    torch.testing.assert_close(layer.lora_mixer["default"].weight.grad, expected.detach(), rtol=1e-5, atol=1e-5)
    assert expected.abs().sum() > 0


def test_mixer_inits_and_rslora_scaling(tokenizer):
    orthogonal = moslora_model(tokenizer, mixer_init="orthogonal")
    mixer = lora_modules(orthogonal, MoSLoraLinear)[0].lora_mixer["default"].weight
    torch.testing.assert_close(mixer @ mixer.T, torch.eye(RANK), rtol=1e-5, atol=1e-5)
    rslora = moslora_model(tokenizer, peft_options='{"use_rslora": true}')
    assert lora_modules(rslora, MoSLoraLinear)[0].scaling["default"] == pytest.approx(8 / math.sqrt(RANK))


class RecordLogitsAtEnd(TrainerCallback):
    """The trained model's logits on fixed ids, and the mixer weights before and after training."""

    def __init__(self, ids):
        self.ids, self.before, self.after, self.final_logits = ids, {}, {}, None

    @staticmethod
    def mixers(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_mixer" in n}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = self.mixers(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = self.mixers(model)
        self.final_logits = logits(model, self.ids)


@pytest.mark.e2e
@pytest.mark.parametrize("adapter", ["lora", "moslora", "dora", "rslora", "pissa", "olora"])
def test_each_adapter_trains_saves_reloads_and_merges(models_dir, train_file, tmp_path, tokenizer, adapter):
    out = tmp_path / "run"
    recorder = RecordLogitsAtEnd(probe_ids(tokenizer))
    config = parse_config(run_flags(models_dir, train_file, out, adapter=adapter))
    summary = distill(config, callbacks=[recorder])
    assert json.loads((summary.weights_dir / "llmneo_adapter.json").read_text())["adapter"] in (adapter, "lora")
    reloaded = logits(load_adapter(load_student(config.model), summary.weights_dir), recorder.ids)
    # PiSSA/OLoRA were trained on a mutated base: the saved (converted) adapter on the original base must agree.
    torch.testing.assert_close(reloaded, recorder.final_logits, rtol=1e-4, atol=1e-4)
    merged = load_student(config.model.__class__(student_model=str(merge_run(out, tmp_path / "merged"))))
    torch.testing.assert_close(logits(merged, recorder.ids), reloaded, rtol=1e-4, atol=1e-4)
    assert "| adapter | " + adapter + " |" in (out / "README.md").read_text()
    if adapter == "moslora":
        assert recorder.before and all(not torch.equal(recorder.before[n], recorder.after[n]) for n in recorder.before)


@pytest.mark.e2e
def test_export_lora_command(models_dir, train_file, tmp_path, tokenizer, capsys):
    out = tmp_path / "run"
    config = parse_config(run_flags(models_dir, train_file, out, adapter="moslora"))
    distill(config)
    assert cli.main(["export-lora", str(out), "--output", str(tmp_path / "plain")]) == 0
    with peft_wrapping():
        stock = PeftModel.from_pretrained(load_student(config.model), tmp_path / "plain")
    ours = load_adapter(load_student(config.model), out / "adapter")
    ids = probe_ids(tokenizer)
    torch.testing.assert_close(logits(stock, ids), logits(ours, ids), rtol=1e-5, atol=1e-5)
    assert "plain LoRA adapter written to" in capsys.readouterr().out


@pytest.mark.parametrize("adapter_args", [AdapterArguments(adapter="dora", lora_r=RANK),
                                          AdapterArguments(adapter="lora", lora_r=RANK, peft_options='{"use_dora": true}')],
                         ids=["adapter dora", "use_dora through peft_options"])
def test_dora_has_no_plain_lora_form(tokenizer, tmp_path, adapter_args):
    """Decided from the saved adapter_config.json, so DoRA chosen through --peft_options is refused too."""
    model = add_lora(base_model(tokenizer), adapter_args)
    save_adapter(model, tmp_path / "dora", adapter_args)
    with pytest.raises(ConfigError, match="DoRA adapter has no plain-LoRA form"):
        export_plain_lora(tmp_path / "dora", tmp_path / "plain")


@pytest.mark.parametrize("options, message", [
    ('{"use_rslora": tru}', "peft_options is not valid JSON"),
    ('["use_dora"]', "must be a JSON object"),
    ('{"use_rsloraa": true}', "LoraConfig has no option 'use_rsloraa'; did you mean 'use_rslora'?"),
    ('{"r": 8}', "peft_options sets 'r': use --lora_r instead"),
])
def test_peft_options_errors(options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[").replace("?", r"\?")):
        lora_config(AdapterArguments(peft_options=options))


def test_peft_options_pass_through_from_yaml(models_dir, train_file, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("adapter: lora\npeft_options:\n  init_lora_weights: gaussian\n", encoding="utf-8")
    config = parse_config(["--config", str(path), *run_flags(models_dir, train_file, tmp_path / "run")])
    assert lora_config(config.adapter).init_lora_weights == "gaussian"
    with pytest.raises(ConfigError, match="moslora combines with neither DoRA"):
        lora_config(AdapterArguments(adapter="moslora", peft_options='{"use_dora": true}'))


def test_quantization_is_refused_at_start_up_without_cuda(models_dir, tmp_path, capsys):
    flags = run_flags(models_dir, str(tmp_path / "missing.jsonl"), tmp_path / "run", student_quantization="nf4",
                      teacher_quantization="int8")
    assert cli.main(["distill", *flags]) == 1  # the data file does not exist: the quantization check came first
    error = capsys.readouterr().err
    assert "--student_quantization nf4 and --teacher_quantization int8 needs a CUDA GPU" in error
    with pytest.raises(ConfigError, match="trains only through an adapter: use method lora or neo, not kd"):
        parse_config(run_flags(models_dir, "x.jsonl", tmp_path / "run", method="kd", student_quantization="nf4"))


def test_teacher_fidelity_kl_is_the_mean_kl_over_answer_tokens(tokenizer):
    reference, other = build_tiny_llama(tokenizer, seed=12), build_tiny_llama(tokenizer, seed=13)
    ids = probe_ids(tokenizer)
    labels = ids.clone()
    labels[:, :5] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    assert teacher_fidelity_kl(reference, reference, batch) == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        p, q = reference(input_ids=ids).logits[:, 4:-1], other(input_ids=ids).logits[:, 4:-1]
    expected = forward_kl(q.reshape(-1, q.shape[-1]), p.reshape(-1, p.shape[-1])).mean().item()
    assert teacher_fidelity_kl(reference, other, batch) == pytest.approx(expected, rel=1e-5)


def test_wrapping_prints_no_deprecation_of_ours_and_lets_other_warnings_through(tokenizer, tmp_path):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = add_lora(base_model(tokenizer), AdapterArguments(lora_r=RANK, lora_alpha=8))
        save_adapter(model, tmp_path / "adapter", AdapterArguments())
        load_adapter(base_model(tokenizer), tmp_path / "adapter")
        with peft_wrapping():
            warnings.warn("another FutureWarning", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == ["another FutureWarning"]


def test_llmneo_never_reads_the_deprecated_checkpointing_alias():
    reads = re.compile(r"\.is_gradient_checkpointing\b|getattr\([^)]*[\"']is_gradient_checkpointing")
    assert not [path for path in Path(llmneo.__file__).parent.rglob("*.py") if reads.search(path.read_text())]


@pytest.mark.e2e
@pytest.mark.parametrize("flags", [{"adapter": "pissa"}, {"adapter": "olora"},
                                   {"adapter": "lora", "peft_options": '{"init_lora_weights": "pissa_niter_4"}'}])
def test_a_checkpoint_of_a_base_mutating_init_is_not_merged(models_dir, train_file, tmp_path, flags):
    """A checkpoint's adapter fits the base as PiSSA/OLoRA modified it, whether the init came with --adapter or
    through --peft_options: merging it onto the original base is refused, read from its adapter_config.json."""
    out = tmp_path / "run"
    distill(parse_config(run_flags(models_dir, train_file, out, max_steps=2, save_strategy="steps", save_steps=2,
                                   **flags)))
    init = json.loads((out / "checkpoint-2" / "adapter_config.json").read_text())["init_lora_weights"]
    with pytest.raises(ConfigError, match=f"checkpoint .*checkpoint-2 holds an adapter initialised with {init}, for "
                                          "the base as that initialisation modified it: resume the run"):
        merge_run(out / "checkpoint-2", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_a_lora_config_becomes_the_adapter_options_that_rebuild_it():
    """peft_config= of the Python API: its own fields by llm-neo's names (targets in a stable order), every other
    non-default field in peft_options, and lora_config of those options the same adapter again."""
    given = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules={"v_proj", "q_proj"}, use_dora=True,
                       task_type="CAUSAL_LM")
    options = adapter_options(given)
    assert options == {"lora_r": 8, "lora_alpha": 16.0, "lora_dropout": 0.1, "target_modules": "q_proj,v_proj",
                        "peft_options": '{"use_dora": true}'}
    rebuilt = lora_config(AdapterArguments(**options))
    assert (rebuilt.r, rebuilt.lora_alpha, rebuilt.lora_dropout, rebuilt.use_dora) == (8, 16.0, 0.1, True)
    assert set(rebuilt.target_modules) == {"q_proj", "v_proj"}
    assert "target_modules" not in adapter_options(LoraConfig(r=4))  # PEFT's default: llm-neo's default applies
    with pytest.raises(ConfigError, match=r"peft_config must be a peft.LoraConfig .*, got dict"):
        adapter_options({"r": 8})


@pytest.mark.parametrize("kind", ["lora", "moslora", "pissa", "olora"])
def test_the_served_form_on_the_original_base_is_the_trained_student(tokenizer, tmp_path, kind):
    """What a rollout server loads (write_serving_adapter): a plain PEFT LoRA that stock PEFT applies to the untouched
    base and gets the trained student's logits: MoSLoRA's mixer folded, PiSSA/OLoRA converted to rank 2r."""
    model = add_lora(base_model(tokenizer), AdapterArguments(adapter=kind, lora_r=RANK, lora_alpha=8))
    initial = save_initial_adapter(model, tmp_path)
    randomise(model, "lora_B", seed=2)
    randomise(model, "lora_A", seed=3)
    size = write_serving_adapter(model, tmp_path / "served", initial)
    served = tmp_path / "served"
    assert size == (served / "adapter_model.safetensors").stat().st_size and not list(tmp_path.glob(".served*"))
    assert not any(key.endswith("mixer.weight") or "mixer" in key for key in load_file(served / "adapter_model.safetensors"))
    saved = json.loads((served / "adapter_config.json").read_text())
    assert saved["r"] == (2 * RANK if kind in ("pissa", "olora") else RANK)
    plain = PeftModel.from_pretrained(base_model(tokenizer), served)  # stock PEFT: no llm-neo layer kinds
    ids = probe_ids(tokenizer)
    torch.testing.assert_close(logits(plain, ids), logits(model, ids), rtol=1e-4, atol=1e-4)
    assert (logits(plain, ids) - logits(base_model(tokenizer), ids)).abs().max() > 1e-2
