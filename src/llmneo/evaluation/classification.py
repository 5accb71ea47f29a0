"""Held-out metrics of a sequence classifier: accuracy, precision, recall and F1; with a teacher also agreement
with its predicted class and KL(teacher || student) per text.

With two classes precision, recall and F1 are those of class 1 (the positive class, as in SST-2); with more they
are macro averages over the classes. A class that is never predicted (or never present) scores 0 there.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..losses.divergences import forward_kl


def classification_scores(predictions: torch.Tensor, references: torch.Tensor, num_labels: int) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of class ids ``predictions`` against ``references``."""
    classes = torch.arange(num_labels)
    predicted = predictions[:, None] == classes  # (N, C)
    actual = references[:, None] == classes
    true_positives = (predicted & actual).sum(0).double()
    precision = true_positives / predicted.sum(0).clamp(min=1)
    recall = true_positives / actual.sum(0).clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    pick = (lambda values: values[1].item()) if num_labels == 2 else (lambda values: values.mean().item())
    return {"accuracy": (predictions == references).double().mean().item(), "precision": pick(precision),
            "recall": pick(recall), "f1": pick(f1)}


@torch.no_grad()
def class_logits(model, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits.float()


@torch.no_grad()
def evaluate_classifier(student, dataset, collator, teacher=None, batch_size: int = 8,
                        progress: bool = False) -> dict[str, float]:
    """Scores of ``student`` on the labelled ``dataset``; with ``teacher`` also teacher_agreement and kl_to_teacher."""
    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    predictions, references, agree, kl = [], [], 0, 0.0
    loader = DataLoader(dataset.select_columns(["input_ids", "labels"]), batch_size=batch_size, collate_fn=collator)
    for batch in tqdm(loader, desc="evaluating", unit="batch", disable=not progress):
        batch = {key: value.to(device) for key, value in batch.items()}
        logits = class_logits(student, batch)
        predictions.append(logits.argmax(-1).cpu())
        references.append(batch["labels"].cpu())
        if teacher is not None:
            reference = class_logits(teacher, batch)
            agree += (logits.argmax(-1) == reference.argmax(-1)).sum().item()
            kl += forward_kl(logits, reference).sum().item()
    student.train(was_training)
    predictions, references = torch.cat(predictions), torch.cat(references)
    metrics = {**classification_scores(predictions, references, student.config.num_labels), "texts": len(references)}
    if teacher is not None:
        metrics.update(teacher_agreement=agree / len(references), kl_to_teacher=kl / len(references))
    return metrics


@torch.no_grad()
def class_fidelity_kl(reference, quantized, batch: dict) -> float:
    """Mean KL(reference || quantized) per text of ``batch``: what quantizing the teacher changed."""
    return forward_kl(class_logits(quantized, batch), class_logits(reference, batch)).mean().item()
