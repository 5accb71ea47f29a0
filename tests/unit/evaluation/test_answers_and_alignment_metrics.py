"""evaluation/answers.py and evaluation/cross_tokenizer.py: prompts cut where the answer starts; the teacher's
mass on mapped tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from datasets import Dataset

from llmneo.evaluation.answers import answers, held_out_prompts, held_out_teacher_prompts
from llmneo.evaluation.cross_tokenizer import teacher_mapped_mass
from llmneo.losses.vocab_map import VocabularyMap
from llmneo.demo.tiny import build_tiny_llama


def test_held_out_prompts_stop_before_the_first_answer_token():
    rows = Dataset.from_dict({"input_ids": [[5, 6, 7, 8], [1, 2, 3]], "labels": [[-100, -100, 7, 8], [-100, 2, 3]],
                              "teacher_input_ids": [[9, 9, 9], [4, 4]], "aligned_teacher": [[1, 2], []]})
    assert [ids.tolist() for ids in held_out_prompts(rows, 5)] == [[[5, 6]], [[1]]]
    assert [ids.tolist() for ids in held_out_teacher_prompts(rows, 2)] == [[[9, 9]], [[4, 4]]]


def test_answers_are_greedy_and_leave_the_model_mode_alone(tokenizer):
    model = build_tiny_llama(tokenizer, hidden_size=32, seed=6).train()
    prompt = torch.tensor([tokenizer.encode("hello")])
    first, second = answers(model, tokenizer, [prompt, prompt], max_new_tokens=4)
    assert first == second and model.training


def test_mapped_mass_is_the_teacher_probability_on_paired_ids():
    logits = torch.randn(3, 6)
    vocab_map = VocabularyMap(torch.tensor([0, 4]), torch.tensor([1, 0]), 5, 2)
    expected = F.softmax(logits[:, :5], -1)[:, [0, 4]].sum(1)
    torch.testing.assert_close(teacher_mapped_mass(logits, vocab_map), expected)
