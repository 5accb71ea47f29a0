"""Token-level divergences between the teacher's and the student's next-token distributions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(z_t / T) || softmax(z_s / T)) per row, in fp32. Shapes (N, V) -> (N,)."""
    student_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    teacher_p = teacher_logp.exp()
    # Tokens the teacher rules out (-inf logits, e.g. masked padding ids) contribute 0, not 0 * inf = nan.
    terms = torch.where(teacher_p > 0, teacher_p * (teacher_logp - student_logp), 0.0)
    return terms.sum(-1)
