"""Distilling across tokenizers: token bytes, the vocabulary map, aligned boundaries and the three KD modes, each
against an independent reference written here."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from llmneo.data.alignment import align_rendered, render_messages, render_text
from llmneo.data.tokenize import encode_messages, encode_text, ensure_chat_template
from llmneo.data.vocabulary import build_vocabulary_map, byte_lengths, token_bytes
from llmneo.losses.vocab_map import load_vocabulary_map
from llmneo.demo.tiny import build_char_tokenizer, build_tokenizer, corpus_texts
from llmneo.losses.contract import LossSettings, answer_mask
from llmneo.losses.cross_vocab import cross_tokenizer_parts, cross_vocab_kd_sum, from_logit_rows
from llmneo.losses.cross_vocab_modes import CROSS_VOCAB_MODES, mapped_buckets, student_divergence, teacher_targets
from llmneo.losses.divergences import get_divergence
from llmneo.losses.reference import distillation_loss

UNICODE_ANSWER = "Café, naïve façade: 東京 ünïcødé — ok!"
CONVERSATION = [{"role": "user", "content": "Say something with accents."},
                {"role": "assistant", "content": UNICODE_ANSWER},
                {"role": "user", "content": "And again?"},
                {"role": "assistant", "content": "Sure: hello world."}]


@pytest.fixture(scope="module")
def bpe():
    return build_tokenizer(corpus_texts())


@pytest.fixture(scope="module")
def bpe_other_merges():
    return build_tokenizer(corpus_texts()[::-1][:300], vocab_size=300)


@pytest.fixture(scope="module")
def chars():
    tokenizer = build_char_tokenizer(corpus_texts()[:200])  # some characters of the answers are unseen: bytes
    ensure_chat_template(tokenizer)
    return tokenizer


# ---------------------------------------------------------------- token bytes and the vocabulary map


def test_token_bytes_undo_each_convention(bpe, chars):
    """Byte-level (Ġ) and SentencePiece (▁, <0xNN>) spellings become the same bytes; special tokens none."""
    assert token_bytes(bpe)[bpe.convert_tokens_to_ids("Ġthe")] == b" the"
    assert token_bytes(chars)[chars.convert_tokens_to_ids("▁")] == b" "
    assert token_bytes(chars)[chars.convert_tokens_to_ids("<0xE6>")] == b"\xe6"
    for tokenizer in (bpe, chars):
        assert token_bytes(tokenizer)[tokenizer.convert_tokens_to_ids("<|im_end|>")] is None
        # Every ordinary id's bytes are what decoding it alone gives, when that is whole UTF-8.
        for index, value in enumerate(token_bytes(tokenizer)):
            if value is None:
                continue
            decoded = tokenizer.decode([index], clean_up_tokenization_spaces=False)
            if "\ufffd" not in decoded:
                assert value == decoded.encode("utf-8"), (index, value, decoded)


def test_vocabulary_map_pairs_equal_bytes_one_to_one(bpe, chars, tmp_path):
    mapping = build_vocabulary_map(chars, bpe, len(chars), len(bpe) + 8)  # the student's output layer is padded
    teacher_bytes, student_bytes = token_bytes(chars), token_bytes(bpe)
    pairs = list(zip(mapping.teacher_ids.tolist(), mapping.student_ids.tolist(), strict=False))
    assert pairs and all(teacher_bytes[t] == student_bytes[s] is not None for t, s in pairs)
    expected = {value for value in student_bytes if value is not None} & {v for v in teacher_bytes if v is not None}
    assert {student_bytes[s] for _, s in pairs} == expected
    assert len(set(mapping.teacher_ids.tolist())) == len(mapping) == len(set(mapping.student_ids.tolist()))
    assert (mapping.teacher_size, mapping.student_size) == (len(chars), len(bpe))  # padding rows take no part
    mapping.save(tmp_path)
    loaded = load_vocabulary_map(tmp_path)
    assert torch.equal(loaded.teacher_ids, mapping.teacher_ids) and loaded.student_size == mapping.student_size


def test_identical_tokenizers_map_the_shared_output_range(bpe):
    mapping = build_vocabulary_map(bpe, bpe, len(bpe) + 16, len(bpe) + 4)
    assert mapping.identical and torch.equal(mapping.student_ids, torch.arange(len(bpe) + 4))


def test_byte_lengths_count_text_bytes_only(bpe):
    lengths = byte_lengths(bpe, len(bpe) + 3)
    assert lengths.shape == (len(bpe) + 3,) and lengths[-3:].tolist() == [0, 0, 0]
    ids = bpe(UNICODE_ANSWER, add_special_tokens=False)["input_ids"]
    assert lengths[ids].sum().item() == len(UNICODE_ANSWER.encode("utf-8"))
    assert lengths[bpe.convert_tokens_to_ids("<|im_end|>")] == 0


# ---------------------------------------------------------------- aligned boundaries


def reference_boundaries(tokenizer, text: str, ids: list[int], span: tuple[int, int], limit: int) -> dict:
    """Without offsets: the bytes of the first tokens, joined, are a prefix of the text's bytes; byte b of the
    answer -> the position predicting the text from b."""
    spelled = [value if value is not None else tokenizer.convert_ids_to_tokens(i).encode() for i, value in
               enumerate(token_bytes(tokenizer))]
    data, origin, found = text.encode("utf-8"), len(text[: span[0]].encode("utf-8")), {}
    prefix = b""
    for index in range(1, len(ids)):
        prefix += spelled[ids[index - 1]]
        assert data.startswith(prefix)
        if 0 <= len(prefix) - origin < limit:
            found[len(prefix) - origin] = index - 1
    return found


def shared_bytes(s_answer: bytes, t_answer: bytes, student_tokenizer, teacher_tokenizer) -> int:
    """The length of the answers' common byte prefix, where a chat marker is compared whole: the shared text stops
    where the first marker of either side begins, unless both have the same marker there."""
    limit = next((i for i, (a, b) in enumerate(zip(s_answer, t_answer, strict=False)) if a != b),
                 min(len(s_answer), len(t_answer)))
    markers = [(answer.find(name.encode()), name) for answer, tokenizer in ((s_answer, student_tokenizer),
               (t_answer, teacher_tokenizer)) for name in tokenizer.all_special_tokens if name.encode() in answer]
    for at, name in sorted(markers):
        if at < limit and not (s_answer[at:].startswith(name.encode()) and t_answer[at:].startswith(name.encode())
                               and at + len(name) <= limit):
            limit = at
    return limit


def reference_alignment(student_tokenizer, teacher_tokenizer, messages, max_length):
    student = render_messages(student_tokenizer, messages, max_length)
    teacher = render_messages(teacher_tokenizer, messages, max_length)
    pairs = []
    for s_span, t_span in zip(student[1], teacher[1], strict=False):
        s_answer, t_answer = student[0][slice(*s_span)].encode(), teacher[0][slice(*t_span)].encode()
        limit = shared_bytes(s_answer, t_answer, student_tokenizer, teacher_tokenizer)
        s_at = reference_boundaries(student_tokenizer, student[0], student[2], s_span, limit)
        t_at = reference_boundaries(teacher_tokenizer, teacher[0], teacher[2], t_span, limit)
        pairs += [(s_at[c], t_at[c]) for c in sorted(s_at.keys() & t_at.keys())]
    return pairs


def align(student_tokenizer, teacher_tokenizer, messages=CONVERSATION, max_length=512):
    ids, _ = encode_messages(student_tokenizer, messages, max_length)
    return align_rendered(render_messages(student_tokenizer, messages, max_length),
                          render_messages(teacher_tokenizer, messages, max_length), ids,
                          token_bytes(student_tokenizer), token_bytes(teacher_tokenizer))


@pytest.mark.parametrize("teacher_name", ["chars", "bpe_other_merges"])
def test_alignment_equals_decoding_reference(bpe, teacher_name, request):
    """Token by token, against boundaries found by decoding prefixes: multi-byte UTF-8 (split into bytes by both
    tokenizers), Ġ against ▁ spaces, and the templates' special tokens (ChatML against the fallback template)."""
    teacher = request.getfixturevalue(teacher_name)
    alignment = align(bpe, teacher)
    pairs = list(zip(alignment.student_positions, alignment.teacher_positions, strict=False))
    assert pairs == reference_alignment(bpe, teacher, CONVERSATION, 512)
    assert alignment.teacher_input_ids == render_messages(teacher, CONVERSATION, 512)[2]
    # Every aligned student position predicts an answer token; the texts both models have read are equal.
    labels = encode_messages(bpe, CONVERSATION, 512)[1]
    assert all(labels[position + 1] != -100 for position in alignment.student_positions)
    student_text, teacher_text = render_messages(bpe, CONVERSATION, 512)[0], render_messages(teacher, CONVERSATION, 512)[0]
    student_offsets = bpe(student_text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    teacher_offsets = teacher(teacher_text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    for s, t in pairs:
        s_read, t_read = student_text[: student_offsets[s][1]], teacher_text[: teacher_offsets[t][1]]
        assert s_read.rsplit("assistant", 1)[-1].lstrip("|>\n") == t_read.rsplit("assistant", 1)[-1].lstrip("|>\n")


def test_alignment_details(bpe, chars, bpe_other_merges):
    ids, labels = encode_messages(bpe, CONVERSATION, 512)
    answer_positions = [i - 1 for i in range(1, len(labels)) if labels[i] != -100]
    # One tokenizer: every answer position is aligned, end-of-turn marker included.
    same = align(bpe, bpe)
    assert same.student_positions == answer_positions == same.teacher_positions
    # ChatML against the fallback template: the answers' own text aligns, the end-of-turn markers do not.
    across = align(bpe, chars)
    im_end = bpe.convert_tokens_to_ids("<|im_end|>")
    assert all(ids[position + 1] != im_end for position in across.student_positions)
    assert 0 < len(across.student_positions) < len(answer_positions)
    # The character-level teacher cuts at every character: each student boundary in an answer's text aligns,
    # so only positions before end-of-turn markers (and the "\n" after them) are missing.
    missing = set(answer_positions) - set(across.student_positions)
    assert all(bpe.decode(ids[position + 1]) in ("<|im_end|>", "\n") for position in missing)
    # Cutting both rows at max_length keeps the boundaries before the cut, and only those.
    full, cut = align(bpe, bpe_other_merges), align(bpe, bpe_other_merges, max_length=40)
    kept = [(s, t) for s, t in zip(full.student_positions, full.teacher_positions, strict=False) if s < 39 and t < 39]
    assert kept and list(zip(cut.student_positions, cut.teacher_positions, strict=False)) == kept


def test_the_plain_teacher_template_renders_incrementally_and_aligns_the_answers(bpe, chars):
    """A base teacher reading 'Question: ... Answer: ...' prose: every answer's text aligns, the markers do not."""
    from transformers import PreTrainedTokenizerFast
    from llmneo.data.tokenize import set_chat_template

    plain = PreTrainedTokenizerFast(tokenizer_object=chars.backend_tokenizer, eos_token="</s>", pad_token="<pad>")
    set_chat_template(plain, "plain")
    text = render_messages(plain, CONVERSATION, 512)[0]
    assert text.startswith("Question: Say something with accents.\n\nAnswer: " + UNICODE_ANSWER + "\n\n")
    across, full = align(bpe, plain), align(bpe, chars)
    assert across.student_positions == full.student_positions  # the answers' own text, whatever the template


def test_plain_text_rows_align_from_the_first_token(bpe, chars):
    text = "Plain text: naïve café 東京."
    ids, _ = encode_text(bpe, text, 512)
    alignment = align_rendered(render_text(bpe, text, 512), render_text(chars, text, 512), ids, token_bytes(bpe),
                               token_bytes(chars))
    assert alignment.student_positions[0] == 0 and alignment.teacher_positions[0] == 0  # BOS predicts the text
    assert len(alignment.student_positions) == len(render_text(bpe, text, 512)[2]) - 2  # all but BOS-less EOS step


# ---------------------------------------------------------------- on-policy answers (the student's own tokens)

PROMPT = CONVERSATION[:3]


def sampled_answer(tokenizer, pieces: list[str], stop: bool = True, tail: list[int] = ()) -> list[int]:
    """A tokenization the tokenizer would not produce itself: each piece encoded on its own, as a sample can be."""
    answer = [token for piece in pieces for token in tokenizer(piece, add_special_tokens=False)["input_ids"]]
    return answer + list(tail) + ([tokenizer.convert_tokens_to_ids("<|im_end|>")] if stop else [])


def reference_answer_alignment(student_tokenizer, teacher_tokenizer, answer: list[int], prompt_length: int):
    """By decoding: the student's boundaries from its tokens' joined spellings, the teacher's from prefixes of its
    rendering of the prompt and the decoded answer; pairs before the shared end, and the pair at it."""
    spelled = [value if value is not None else student_tokenizer.convert_ids_to_tokens(i).encode()
               for i, value in enumerate(token_bytes(student_tokenizer))]
    data = b"".join(spelled[token] for token in answer)
    text = student_tokenizer.decode(answer, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    whole = "\ufffd" not in text
    text = text.split("\ufffd")[0]  # an answer cut inside a character: the text before it
    teacher = render_messages(teacher_tokenizer, PROMPT + [{"role": "assistant", "content": text}], 10**6)
    t_answer = teacher[0][slice(*teacher[1][-1])].encode()
    limit = shared_bytes(data if whole else text.encode(), t_answer, student_tokenizer, teacher_tokenizer)
    s_at = {len(b"".join(spelled[token] for token in answer[:i])): prompt_length + i - 1 for i in range(len(answer) + 1)}
    t_at = reference_boundaries(teacher_tokenizer, teacher[0], teacher[2], teacher[1][-1], limit + 1)
    pairs = [(s_at[c], t_at[c]) for c in sorted(s_at.keys() & t_at.keys()) if c < limit]
    end = (s_at[limit], t_at[limit]) if limit in s_at and limit in t_at else None
    return teacher[2], pairs, end


def byte_token(tokenizer, value: int) -> int:
    return next(i for i, spelled in enumerate(token_bytes(tokenizer)) if spelled == bytes([value]))


@pytest.mark.parametrize("teacher_name", ["chars", "bpe_other_merges", "bpe"])
@pytest.mark.parametrize("case", ["stopped", "cut", "inside a character"])
def test_sampled_answers_align_token_by_token_against_decoding(bpe, teacher_name, case, request):
    """The student's own tokens (not a re-tokenization of its text) against the teacher's rendering of the prompt
    and the answer's text: multi-byte characters, a sample that stops, one cut at the budget, one cut inside a
    character (its bytes up to the character are shared, nothing after)."""
    from llmneo.data.alignment import AnswerAligner

    teacher = request.getfixturevalue(teacher_name)
    pieces = ["Su", "re: na", "ïve 東", "京 hel", "lo."]
    answer = {"stopped": sampled_answer(bpe, pieces), "cut": sampled_answer(bpe, pieces, stop=False),
              "inside a character": sampled_answer(bpe, ["Sure ", "ok"], stop=False,
                                                   tail=[byte_token(bpe, 0xE6), byte_token(bpe, 0x9D)])}[case]
    prompt_length = 17
    ours = AnswerAligner(bpe, teacher, [json.dumps(PROMPT)]).align(0, answer, prompt_length)
    ids, pairs, end = reference_answer_alignment(bpe, teacher, answer, prompt_length)
    assert ours.teacher_input_ids == ids
    assert list(zip(ours.student_positions, ours.teacher_positions, strict=True)) == pairs
    assert ours.end == end
    assert len(pairs) >= 5 and all(prompt_length - 1 <= s < prompt_length + len(answer) - 1 for s, _ in pairs)
    if teacher_name == "bpe" and case == "stopped":  # the shared end-of-turn marker aligns (its
        # rendering ends with a newline after it)
        assert pairs[-1][0] == prompt_length + len(answer) - 2 and end == (prompt_length + len(answer) - 1, len(ids) - 2)


# ---------------------------------------------------------------- the KD modes


def naive_uld(student_logits, teacher_logits, temperature):
    """Row by row: sort both probability vectors, pad the shorter with zeros, L1."""
    values = []
    for s_row, t_row in zip(student_logits, teacher_logits, strict=False):
        p_s = sorted(F.softmax(s_row / temperature, -1), key=lambda x: -x.item())
        p_t = sorted(F.softmax(t_row / temperature, -1), key=lambda x: -x.item())
        width = max(len(p_s), len(p_t))
        p_s += [torch.zeros(())] * (width - len(p_s))
        p_t += [torch.zeros(())] * (width - len(p_t))
        values.append(sum((a - b).abs() for a, b in zip(p_s, p_t, strict=False)))
    return torch.stack(values)


def cross_vocab_divergence(student, teacher, mapping, mode, settings):
    """The divergence per aligned row from both models' logit rows."""
    return student_divergence(student, teacher_targets(teacher, mapping, CROSS_VOCAB_MODES[mode], settings.temperature),
                              mapping, settings)


def small_map(teacher_vocab=11, student_vocab=7):
    from llmneo.losses.vocab_map import VocabularyMap
    return VocabularyMap(torch.tensor([3, 0, 9, 5]), torch.tensor([1, 4, 0, 6]), teacher_vocab, student_vocab)


def test_uld_equals_naive_rows_with_gradients():
    torch.manual_seed(0)
    student = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(5, 11, dtype=torch.float64)
    settings = LossSettings(temperature=2.0)
    ours = cross_vocab_divergence(student, teacher, small_map(), "uld", settings)
    naive = naive_uld(student, teacher, 2.0)
    torch.testing.assert_close(ours.double(), naive, atol=1e-5, rtol=0)
    (grad_ours,) = torch.autograd.grad(ours.sum(), student)
    (grad_naive,) = torch.autograd.grad(naive.sum(), student)
    torch.testing.assert_close(grad_ours.double(), grad_naive, atol=1e-5, rtol=0)


def naive_exact(student_logits, teacher_logits, mapping, temperature):
    """Forward KL over [mapped pairs, rest] built by summing probabilities, row by row."""
    values = []
    for s_row, t_row in zip(student_logits, teacher_logits, strict=False):
        p_s, p_t = F.softmax(s_row / temperature, -1), F.softmax(t_row / temperature, -1)
        q_s = [p_s[i] for i in mapping.student_ids] + [p_s.sum() - p_s[mapping.student_ids].sum()]
        q_t = [p_t[i] for i in mapping.teacher_ids] + [p_t.sum() - p_t[mapping.teacher_ids].sum()]
        values.append(sum(t * (t.log() - s.log()) for s, t in zip(q_s, q_t, strict=False)))
    return torch.stack(values)


def test_exact_and_hybrid_equal_naive_partitions():
    torch.manual_seed(1)
    student = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 11, dtype=torch.float64)
    mapping, settings = small_map(), LossSettings(temperature=1.5)
    exact = cross_vocab_divergence(student, teacher, mapping, "exact", settings)
    naive = naive_exact(student, teacher, mapping, 1.5)
    torch.testing.assert_close(exact.double(), naive, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.autograd.grad(exact.sum(), student)[0].double(),
                               torch.autograd.grad(naive.sum(), student, retain_graph=True)[0], atol=1e-5, rtol=0)
    hybrid = cross_vocab_divergence(student, teacher, mapping, "hybrid", settings)
    rest_s = [i for i in range(7) if i not in mapping.student_ids.tolist()]
    rest_t = [i for i in range(11) if i not in mapping.teacher_ids.tolist()]
    weight = 1 - F.softmax(teacher / 1.5, -1)[:, mapping.teacher_ids].sum(1)
    expected = naive + weight * naive_uld(student[:, rest_s], teacher[:, rest_t], 1.5)
    torch.testing.assert_close(hybrid.double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.autograd.grad(hybrid.sum(), student)[0].double(),
                               torch.autograd.grad(expected.sum(), student)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_one_side_with_everything_mapped_stays_finite(divergence):
    """A student with every id mapped has no tail: the teacher is renormalised on the mapped ids. A teacher with
    every id mapped has a tail of probability 0 against the student's."""
    from llmneo.losses.vocab_map import VocabularyMap
    torch.manual_seed(4)
    student, teacher = torch.randn(3, 3, requires_grad=True), torch.randn(3, 5)
    everything_student = VocabularyMap(torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1]), 5, 3)
    buckets = mapped_buckets(student, teacher, everything_student)
    assert buckets[0].shape == buckets[1].shape == (3, 3)
    torch.testing.assert_close(buckets[1], teacher[:, :3])
    everything_teacher = VocabularyMap(torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1]), 3, 5)
    student_wide = torch.randn(3, 5, requires_grad=True)
    buckets = mapped_buckets(student_wide, teacher[:, :3], everything_teacher)
    assert F.softmax(buckets[1], -1)[:, -1].eq(0).all() and F.softmax(buckets[0], -1)[:, -1].gt(0).all()
    for source, mapping in ((student, everything_student), (student_wide, everything_teacher)):
        value = get_divergence(divergence)(*mapped_buckets(source, teacher[:, :mapping.teacher_size], mapping), 1.0)
        (grad,) = torch.autograd.grad(value.sum(), source)
        assert torch.isfinite(value).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "akl"])
@pytest.mark.parametrize("padded", [False, True])
def test_exact_with_one_tokenizer_equals_the_standard_loss(bpe, divergence, padded):
    """Loss, CE, KD and gradients of the cross-tokenizer path with identical tokenizers equal the one-tokenizer
    loss, including output layers padded past the tokenizer (to different sizes)."""
    torch.manual_seed(2)
    vocab = len(bpe)
    student_size, teacher_size = (vocab + 8, vocab + 3) if padded else (vocab, vocab)
    labels = torch.randint(0, vocab, (2, 9))
    labels[0, :3] = labels[1, :5] = -100
    student_logits = torch.randn(2, 9, student_size, requires_grad=True)
    teacher_logits = torch.randn(2, 9, teacher_size)
    settings = LossSettings(alpha=0.3, temperature=2.0, divergence=get_divergence(divergence),
                            kd_vocab_size=min(student_size, teacher_size), chunk_size=4)
    reference = distillation_loss(student_logits, labels, teacher_logits, settings=settings, num_items=11)
    mapping = build_vocabulary_map(bpe, bpe, teacher_size, student_size)
    batch, position = answer_mask(labels).nonzero(as_tuple=True)
    ce_only = distillation_loss(student_logits, labels, settings=settings, num_items=11)
    kd_sum = cross_vocab_kd_sum(student_logits[batch, position],
                                from_logit_rows(teacher_logits[batch, position], mapping, CROSS_VOCAB_MODES["exact"]),
                                mapping, settings)
    ours = cross_tokenizer_parts(ce_only, kd_sum, 11, settings)
    for name in ("loss", "ce", "kd"):
        torch.testing.assert_close(getattr(ours, name), getattr(reference, name), atol=1e-5, rtol=1e-5)
    grad_ours = torch.autograd.grad(ours.loss, student_logits)[0]
    grad_reference = torch.autograd.grad(reference.loss, student_logits)[0]
    torch.testing.assert_close(grad_ours, grad_reference, atol=1e-5, rtol=1e-5)


def test_hidden_state_rows_equal_logit_rows_and_are_checkpointed():
    torch.manual_seed(3)
    mapping, settings = small_map(), LossSettings(chunk_size=2)
    hidden, weight = torch.randn(5, 6, requires_grad=True), torch.randn(7, 6, requires_grad=True)
    teacher_hidden, teacher_weight = torch.randn(5, 4), torch.randn(11, 4)
    hybrid = CROSS_VOCAB_MODES["hybrid"]
    from_hidden = cross_vocab_kd_sum(hidden, from_logit_rows(teacher_hidden, mapping, hybrid, teacher_weight),
                                     mapping, settings, weight)
    from_logits = cross_vocab_kd_sum(hidden @ weight.T, from_logit_rows(teacher_hidden @ teacher_weight.T, mapping, hybrid),
                                     mapping, settings)
    torch.testing.assert_close(from_hidden, from_logits)
    grads = torch.autograd.grad(from_hidden, (hidden, weight))
    expected = torch.autograd.grad(from_logits, (hidden, weight))
    for ours, reference in zip(grads, expected, strict=False):
        torch.testing.assert_close(ours, reference)
