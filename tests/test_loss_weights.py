"""The trainer mixes the loss terms with the configured alpha and temperature (not 1 - alpha, not T = 1), checked
at alpha = 0.2, T = 2 against CE and KD written out here from both models' logits."""

import pytest
import torch
import torch.nn.functional as F

from test_accumulation import make_trainer

ALPHA, TEMPERATURE = 0.2, 2.0


def reference_terms(student, teacher, batch):
    """Mean CE and T^2 * KL(p_t || p_s) at temperature T over the shifted answer tokens, one token at a time."""
    with torch.no_grad():
        student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce, kd, count = 0.0, 0.0, 0
    labels = batch["labels"]
    for row in range(labels.shape[0]):
        for position in range(labels.shape[1] - 1):
            target = int(labels[row, position + 1])
            if target == -100:
                continue
            count += 1
            z_s, z_t = student_logits[row, position].double(), teacher_logits[row, position].double()
            ce += float(torch.logsumexp(z_s, 0) - z_s[target])
            log_p_s = F.log_softmax(z_s / TEMPERATURE, 0)
            log_p_t = F.log_softmax(z_t / TEMPERATURE, 0)
            kd += float((log_p_t.exp() * (log_p_t - log_p_s)).sum()) * TEMPERATURE**2
    return ce / count, kd / count


@pytest.mark.parametrize("loss_impl", ["fused", "naive"])
def test_logged_terms_combine_with_alpha_and_temperature(models_dir, train_file, tmp_path, loss_impl):
    from llmneo.data.collators import make_collator

    trainer, dataset, tokenizer = make_trainer(models_dir, train_file, tmp_path, alpha=ALPHA, temperature=TEMPERATURE,
                                               loss_impl=loss_impl)
    batch = make_collator(tokenizer)([dataset[i] for i in range(4)])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch).detach()
    terms = trainer.loss_terms()
    ce, kd = float(terms["ce_loss"]), float(terms["kd_loss"])
    assert abs(ce - kd) > 0.05  # otherwise swapping the weights would go unnoticed
    assert float(loss) == pytest.approx(ALPHA * ce + (1 - ALPHA) * kd, rel=1e-5)
    reference_ce, reference_kd = reference_terms(trainer.model, trainer.teacher, batch)
    assert ce == pytest.approx(reference_ce, rel=1e-4)
    assert kd == pytest.approx(reference_kd, rel=1e-4)
