"""The paths that only a CUDA GPU runs (marker ``gpu``: skipped without one; benchmarks/gpu_check.py's pytest part
runs them): a 4-bit student's training step, packed rows equal padded rows under flash attention, the fused head
in bf16 against an fp32 reference, and Liger on CUDA equal to the fused head."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import run_flags
from llmneo.config import parse_config
from llmneo.data.collators import make_collator
from llmneo.data.loading import build_datasets
from llmneo.data.packing import PackingCollator, packed_model_inputs
from llmneo.losses.contract import LossSettings
from llmneo.losses.divergences import get_divergence
from llmneo.losses.fused import fused_distillation_loss
from llmneo.losses.liger import liger_distillation_loss
from llmneo.models.loading import load_student, load_student_tokenizer
from llmneo.pipeline import distill

pytestmark = pytest.mark.gpu
TOKENS, STUDENT_HIDDEN, TEACHER_HIDDEN, VOCAB = 1024, 256, 384, 8192


def head_case(dtype, seed=0):
    """Hidden states and heads on the GPU; every position an answer except a prompt of 8 per row."""
    generator = torch.Generator().manual_seed(seed)
    shape = (4, TOKENS // 4)
    case = {"student_hidden": torch.randn(*shape, STUDENT_HIDDEN, generator=generator),
            "student_weight": torch.randn(VOCAB, STUDENT_HIDDEN, generator=generator) / STUDENT_HIDDEN**0.5,
            "teacher_hidden": torch.randn(*shape, TEACHER_HIDDEN, generator=generator),
            "teacher_weight": torch.randn(VOCAB, TEACHER_HIDDEN, generator=generator) / TEACHER_HIDDEN**0.5}
    labels = torch.randint(0, VOCAB, shape, generator=generator)
    labels[:, :8] = -100
    return {key: value.cuda().to(dtype) for key, value in case.items()}, labels.cuda()


def reference_loss(case, labels, alpha, temperature):
    """α·CE + (1−α)·T²·KL(teacher ‖ student) at T over the answer positions, in fp32 from full logits."""
    mask = labels[:, 1:] != -100
    student = F.linear(case["student_hidden"].float(), case["student_weight"].float())[:, :-1][mask]
    teacher = F.linear(case["teacher_hidden"].float(), case["teacher_weight"].float())[:, :-1][mask]
    ce = F.cross_entropy(student, labels[:, 1:][mask])
    kl = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                  reduction="batchmean", log_target=True)
    return alpha * ce + (1 - alpha) * temperature**2 * kl


def test_fused_head_in_bf16_matches_an_fp32_reference():
    case, labels = head_case(torch.bfloat16)
    hidden = case["student_hidden"].clone().requires_grad_(True)
    parts = fused_distillation_loss(hidden, case["student_weight"], labels, case["teacher_hidden"],
                                    case["teacher_weight"], settings=LossSettings(alpha=0.5, temperature=2.0))
    parts.loss.backward()
    reference_hidden = case["student_hidden"].float().clone().requires_grad_(True)
    reference = reference_loss({**case, "student_hidden": reference_hidden}, labels, 0.5, 2.0)
    reference.backward()
    assert float(parts.loss.detach()) == pytest.approx(float(reference.detach()), rel=2e-2)
    cosine = F.cosine_similarity(hidden.grad.float().flatten(), reference_hidden.grad.flatten(), dim=0)
    assert float(cosine) > 0.99


@pytest.mark.requires_liger
def test_liger_on_cuda_equals_the_fused_head():
    case, labels = head_case(torch.float32, seed=1)
    settings = LossSettings(alpha=0.3, temperature=2.0, divergence=get_divergence("forward_kl"))
    results = []
    for loss in (liger_distillation_loss, fused_distillation_loss):
        hidden = case["student_hidden"].clone().requires_grad_(True)
        parts = loss(hidden, case["student_weight"], labels, case["teacher_hidden"], case["teacher_weight"],
                     settings=settings)
        parts.loss.backward()
        results.append((parts, hidden.grad))
    (liger, liger_grad), (fused, fused_grad) = results
    for name in ("loss", "ce", "kd"):
        torch.testing.assert_close(getattr(liger, name), getattr(fused, name), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(liger_grad, fused_grad, rtol=1e-3, atol=1e-5)


def test_nf4_student_trains_through_its_adapter(models_dir, train_file, tmp_path):
    flags = run_flags(models_dir, train_file, tmp_path / "run", student_quantization="nf4", bf16="true",
                      max_steps=3, learning_rate="5e-3")
    config = parse_config(flags)
    student = load_student(config.model)
    assert any(type(module).__name__ == "Linear4bit" for module in student.modules())
    del student
    distill(config)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in adapter.items() if "lora_B" in name]
    assert lora_b and all(torch.isfinite(tensor).all() for tensor in adapter.values())
    assert max(float(tensor.abs().max()) for tensor in lora_b) > 0  # B starts at zero: the adapter learned


@pytest.mark.parametrize("attention", ["flash_attention_2", "sdpa"])
def test_packed_rows_equal_padded_rows_on_cuda(models_dir, train_file, tmp_path, attention):
    if attention == "flash_attention_2":
        pytest.importorskip("flash_attn", reason="flash-attn is not installed on this machine")
    from transformers import AutoModelForCausalLM

    config = parse_config(run_flags(models_dir, train_file, tmp_path))
    tokenizer = load_student_tokenizer(config.model)
    dataset = build_datasets(config.data, tokenizer, 0)[0]
    features = [dataset[i] for i in range(6)]
    model = AutoModelForCausalLM.from_pretrained(models_dir["teacher"], dtype=torch.bfloat16,
                                                 attn_implementation=attention).cuda().eval()
    with torch.no_grad():
        padded = {key: value.cuda() for key, value in make_collator(tokenizer)(features).items()}
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        expected = logits[padded["attention_mask"].bool()]  # each row's real tokens, rows in order
        packed = {key: value.cuda() if torch.is_tensor(value) else value
                  for key, value in PackingCollator(attention)(features).items()}
        got = model(**packed_model_inputs(packed, model)).logits[0]
    assert got.shape == expected.shape
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
