"""evaluation/answers.py and evaluation/cross_tokenizer.py: prompts cut where the answer starts; the teacher's
mass on mapped tokens."""

from __future__ import annotations

import pytest
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


def test_aligned_intervals_resample_each_rows_own_boundaries(models_dir, char_teacher, tokenizer, tmp_path):
    """The intervals of aligned_kl and aligned agreement are the bootstrap of each held-out row's own sums: each
    row evaluated alone gives its sums; resampled with the same draws they give the same interval."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from llmneo.config import DataArguments
    from llmneo.data.collators import AlignedCollator, make_collator
    from llmneo.data.loading import TeacherSide, build_dataset
    from llmneo.data.vocabulary import build_vocabulary_map
    from llmneo.evaluation.bootstrap import resampled_rows
    from llmneo.evaluation.cross_tokenizer import aligned_batches, evaluate_aligned
    from llmneo.lm_head import output_rows
    from llmneo.models.loading import load_reading_tokenizer
    from conftest import write_jsonl
    from llmneo.demo.tiny import corpus_rows

    char_tokenizer = load_reading_tokenizer(char_teacher, role="teacher")
    path = write_jsonl(tmp_path / "rows.jsonl", corpus_rows()[:7])
    rows, _ = build_dataset(DataArguments(dataset=path, max_length=256), tokenizer, 0, TeacherSide(char_tokenizer))
    student = AutoModelForCausalLM.from_pretrained(models_dir["student"])
    teacher = AutoModelForCausalLM.from_pretrained(char_teacher)
    vocab_map = build_vocabulary_map(char_tokenizer, tokenizer, output_rows(teacher), output_rows(student))
    collator = AlignedCollator(make_collator(tokenizer), tokenizer.padding_side, char_tokenizer.pad_token_id)
    together = evaluate_aligned(student, teacher, aligned_batches(rows, collator, 3), vocab_map, bootstrap=200)
    alone = [evaluate_aligned(student, teacher, aligned_batches(rows.select([i]), collator, 1), vocab_map)
             for i in range(len(rows))]
    counts = np.array([len(row) for row in rows["aligned_student"]], dtype=np.float64)
    draws = resampled_rows(len(rows), 200)
    for metric in ("aligned_kl", "aligned_top1_agreement"):
        sums = np.array([found[metric] * count for found, count in zip(alone, counts, strict=True)])
        values = sums[draws].sum(1) / counts[draws].sum(1)
        low, high = np.percentile(values, [2.5, 97.5])
        assert together[f"{metric}_ci_low"] == pytest.approx(low, rel=1e-5)
        assert together[f"{metric}_ci_high"] == pytest.approx(high, rel=1e-5)
        assert low <= together[metric] <= high
