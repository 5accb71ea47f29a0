"""teacher/online.py: the teacher's rows at answer positions or aligned pairs equal its full logits there."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmneo.demo.tiny import build_tiny_llama
from llmneo.losses.contract import answer_mask, answer_rows
from llmneo.teacher.online import answer_logit_chunks, rows_at, teacher_logits


def test_answer_chunks_and_rows_at_positions_equal_the_full_logits(tokenizer):
    model = build_tiny_llama(tokenizer, hidden_size=32, seed=4).eval()
    ids = torch.randint(0, len(tokenizer), (2, 7))
    labels = ids.clone()
    labels[:, :3] = -100
    mask = torch.ones_like(ids)
    full = teacher_logits(model, ids, mask)
    assert not full.requires_grad
    chunks = list(answer_logit_chunks(model, {"input_ids": ids, "attention_mask": mask}, answer_mask(labels), 3,
                                      vocab=20))
    assert [chunk.shape[0] for chunk in chunks] == [3, 3, 2]
    torch.testing.assert_close(torch.cat(chunks), answer_rows(full, answer_mask(labels))[:, :20])
    rows, weight = rows_at(model, ids, mask, torch.tensor([0, 1]), torch.tensor([5, 2]))
    torch.testing.assert_close(F.linear(rows, weight), full[[0, 1], [5, 2]])
