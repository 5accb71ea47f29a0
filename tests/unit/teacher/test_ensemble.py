"""Several teachers in one run (teacher/ensemble.py): a teacher on the student's tokenizer ("same") and a
character-level one with another tokenizer and chat template ("char"), combined by column routing and by two
mixture weightings, against a float64 reference written here (the models' logits recomputed row by row, without
padding; every sum in float64): the step's loss, ce_loss, kd_loss and each teacher's term, on dataset answers and on
an on-policy step (full and sampled)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import write_jsonl
from rollout_reference import answered_rows
from llmneo.config import parse_config
from llmneo.data.loading import TeacherSide, build_dataset
from llmneo.data.routing import row_routes
from llmneo.demo.tiny import corpus_rows
from llmneo.losses.contract import IGNORE_INDEX
from llmneo.models.loading import load_student_tokenizer
from llmneo.teacher.choice import load_models, reading_teacher_tokenizer, teacher_signal
from llmneo.teacher.ensemble import TeacherEnsemble
from llmneo.training.setup import build_trainer

ALPHA, TEMPERATURE = 0.3, 2.0
ROUTES = ["same", "char", None, "char", "same", "same", None, "char"]  # rows 0..7, then repeating


def teachers_json(models_dir, char_teacher) -> str:
    return json.dumps([{"name": "same", "model": models_dir["teacher"]},
                       {"name": "char", "model": char_teacher, "cross_tokenizer": "exact"}])


def routed_file(tmp_path, routes=ROUTES) -> str:
    rows = corpus_rows()[:24]
    return write_jsonl(tmp_path / "routed.jsonl", [{**row, "teacher": routes[i % len(routes)]}
                                                   for i, row in enumerate(rows)])


def ensemble_trainer(models_dir, char_teacher, data: str, out, **extra):
    """The pipeline's steps up to the trainer, for a neo run over the two teachers."""
    flags = ["--method", "neo", "--student_model", models_dir["student"], "--dataset", data, "--output_dir", str(out),
             "--lora_r", "4", "--max_steps", "1", "--per_device_train_batch_size", "8", "--learning_rate", "1e-2",
             "--seed", "0", "--max_length", "256", "--alpha", str(ALPHA), "--disable_tqdm", "true",
             "--teachers", teachers_json(models_dir, char_teacher)]
    for key, value in {"temperature": TEMPERATURE, **extra}.items():
        flags += [f"--{key}", str(value)]
    config = parse_config(flags)
    tokenizer = load_student_tokenizer(config.model)
    teacher_tokenizer = reading_teacher_tokenizer(config)
    on_policy = config.training.on_policy_fraction > 0
    dataset, _ = build_dataset(config.data, tokenizer, config.training.seed,
                               TeacherSide(teacher_tokenizer, on_policy, row_routes(config)))
    dataset = dataset.add_column("row_id", list(range(len(dataset))))
    torch.manual_seed(0)
    models = load_models(config, tokenizer, teacher_tokenizer=teacher_tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    signal = teacher_signal(config, models, dataset=dataset)
    assert isinstance(signal, TeacherEnsemble) and list(signal.members) == ["same", "char"]
    assert signal.members["char"].teacher_tokenizer is teacher_tokenizer  # loaded once, for the data side
    assert signal.members["same"].teacher_tokenizer is None  # reads the student's rows
    return build_trainer(config, models, signal, dataset), dataset


def step_terms(trainer, batch, items: int) -> dict:
    trainer.model.train()
    trainer.reset_loss_terms()
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(items))
    return {"loss": float(loss), **{key: float(value) for key, value in trainer.loss_terms().items()}}


# ---------------------------------------------------------------- the float64 reference


def log_probs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)


def kl(log_t: torch.Tensor, log_s: torch.Tensor) -> float:
    return float((log_t.exp() * (log_t - log_s)).sum())


def exact_kl(logits_s: torch.Tensor, logits_t: torch.Tensor, mapping, temperature: float) -> float:
    """T²·forward KL over [mapped pairs, the rest as one bucket] (exact mode), at temperature T."""
    p_s, p_t = F.softmax(logits_s / temperature, -1), F.softmax(logits_t / temperature, -1)
    q_s = torch.cat([p_s[mapping.student_ids], (1 - p_s[mapping.student_ids].sum())[None]])
    q_t = torch.cat([p_t[mapping.teacher_ids], (1 - p_t[mapping.teacher_ids].sum())[None]])
    return temperature ** 2 * float((q_t * (q_t.log() - q_s.log())).sum())


class Reference:
    """Both teachers and the student as the trainer holds them, in float64."""

    def __init__(self, trainer, temperature: float = TEMPERATURE):
        members, self.temperature = trainer.signal.members, temperature
        self.student = copy.deepcopy(trainer.model).double().eval()
        self.same = copy.deepcopy(members["same"].teacher).double().eval()
        self.char = copy.deepcopy(members["char"].teacher).double().eval()
        self.mapping = members["char"].vocab_map.to("cpu")
        self.aligner = members["char"].answers

    def logits(self, model, ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0].double()

    def kd(self, s: torch.Tensor, t: torch.Tensor) -> float:
        """T²·KL(teacher/T ‖ student/T) of one position, over the shared vocabulary."""
        vocab, temperature = min(s.shape[-1], t.shape[-1]), self.temperature
        return temperature ** 2 * kl(F.log_softmax(t[:vocab] / temperature, -1), F.log_softmax(s[:vocab] / temperature, -1))

    def dataset_row(self, row: dict) -> dict:
        """CE, and each teacher's T²·KD summed over the row's answer tokens (char: at its aligned boundaries)."""
        ids, labels = row["input_ids"], row["labels"]
        s = self.logits(self.student, ids)
        t = self.logits(self.same, ids)
        ce = kd_same = 0.0
        for p in range(len(ids) - 1):
            if labels[p + 1] == IGNORE_INDEX:
                continue
            ce -= float(F.log_softmax(s[p], -1)[labels[p + 1]])
            kd_same += self.kd(s[p], t[p])
        c = self.logits(self.char, row["teacher_input_ids"])
        kd_char = sum(exact_kl(s[a], c[b], self.mapping, self.temperature)
                      for a, b in zip(row["aligned_student"], row["aligned_teacher"], strict=True))
        return {"ce": ce, "same": kd_same, "char": kd_char, "tokens": sum(label != IGNORE_INDEX for label in labels[1:])}

    def answer_row(self, row: dict, prompt: list[int], answer: list[int], sampled: bool) -> dict:
        """An on-policy row (the prompt and an answer): each teacher's full term (T²·KD at every answer token, char
        at aligned boundaries) or sampled term (log p_s − log p_t of the sampled tokens, char per aligned byte
        span), summed."""
        ids = prompt + answer
        s, t = self.logits(self.student, ids), self.logits(self.same, ids)
        alignment = self.aligner.align(row["row_id"], answer, len(prompt))
        teacher_ids = alignment.teacher_input_ids
        c = self.logits(self.char, teacher_ids)
        pairs = list(zip(alignment.student_positions, alignment.teacher_positions, strict=True))
        log_s, log_t, log_c = (F.log_softmax(x, -1) for x in (s, t, c))
        positions = range(len(prompt) - 1, len(ids) - 1)
        if sampled:
            same = sum(float(log_s[p, ids[p + 1]] - log_t[p, ids[p + 1]]) for p in positions)
            ends = pairs[1:] + ([alignment.end] if alignment.end else [])
            char = sum(sum(float(log_s[p, ids[p + 1]]) for p in range(a, a_end))
                       - sum(float(log_c[p, teacher_ids[p + 1]]) for p in range(b, b_end))
                       for (a, b), (a_end, b_end) in zip(pairs, ends, strict=False))
        else:
            same = sum(self.kd(s[p], t[p]) for p in positions)
            char = sum(exact_kl(s[a], c[b], self.mapping, self.temperature) for a, b in pairs)
        return {"ce": 0.0, "same": same, "char": char, "tokens": len(answer)}


def combine(per_row: list[dict], routes: list, weights: dict | None, alpha: float) -> dict:
    """The step's figures: column (``weights`` None: each row's own teacher, CE alone where none) or mixture."""
    tokens = sum(row["tokens"] for row in per_row)
    if weights is not None:
        terms = {name: sum(row[name] for row in per_row) / tokens for name in ("same", "char")}
        kd = sum(weights[name] * terms[name] for name in terms)
        ce = sum(row["ce"] for row in per_row) / tokens
        return {"loss": alpha * ce + (1 - alpha) * kd, "ce_loss": ce, "kd_loss": kd,
                **{f"kd_loss/{name}": value for name, value in terms.items()}}
    terms = {name: sum(row[name] for row, route in zip(per_row, routes, strict=True) if route == name) / tokens
             for name in ("same", "char")}
    ce = sum(row["ce"] for row in per_row) / tokens
    ce_alone = sum(row["ce"] for row, route in zip(per_row, routes, strict=True) if route is None) / tokens
    kd = sum(terms.values())
    return {"loss": alpha * (ce - ce_alone) + ce_alone + (1 - alpha) * kd, "ce_loss": ce, "kd_loss": kd,
            **{f"kd_loss/{name}": value for name, value in terms.items()}}


def assert_terms(ours: dict, expected: dict) -> None:
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


# ---------------------------------------------------------------- dataset answers


@pytest.mark.parametrize("routing,weights", [("column", None), ("mixture", (0.5, 0.5)), ("mixture", (0.8, 0.2))])
def test_dataset_answers_equal_a_float64_reference(models_dir, char_teacher, tmp_path, routing, weights):
    extra = {"teacher_routing": routing, **({"teacher_weights": f"{weights[0]},{weights[1]}"} if weights else {})}
    trainer, dataset = ensemble_trainer(models_dir, char_teacher, routed_file(tmp_path), tmp_path / "run", **extra)
    rows = [dataset[i] for i in range(8)]
    reference = Reference(trainer)
    per_row = [reference.dataset_row(row) for row in rows]
    expected = combine(per_row, ROUTES, dict(zip(("same", "char"), weights, strict=True)) if weights else None, ALPHA)
    ours = step_terms(trainer, trainer.data_collator(rows), sum(row["tokens"] for row in per_row))
    assert_terms(ours, expected)
    assert expected["kd_loss/same"] > 0 and expected["kd_loss/char"] > 0
    if routing == "column":  # each teacher's share of the rows, and the rows that train with CE alone
        assert trainer.signal.log_figures(1) == {"teacher_rows/same": 0.375, "teacher_rows/char": 0.375,
                                                 "teacher_rows/none": 0.25}


# ---------------------------------------------------------------- an on-policy step


ON_POLICY_ROUTES = ["same", "char", "char", "same"]


@pytest.mark.parametrize("loss", ["full", "sampled"])
@pytest.mark.parametrize("routing,weights", [("column", None), ("mixture", (0.5, 0.5)), ("mixture", (0.25, 0.75))])
def test_an_on_policy_step_equals_a_float64_reference(models_dir, char_teacher, tmp_path, loss, routing, weights):
    extra = {"teacher_routing": routing, **({"teacher_weights": f"{weights[0]},{weights[1]}"} if weights else {}),
             "on_policy_fraction": 1, "on_policy_loss": loss, "rollout_temperature": 0, "warmup_steps": 0}
    temperature = 1.0 if loss == "sampled" else TEMPERATURE  # the sampled estimator is at T = 1
    trainer, dataset = ensemble_trainer(models_dir, char_teacher, routed_file(tmp_path, ON_POLICY_ROUTES),
                                        tmp_path / "run", temperature=temperature, **extra)
    rows = [dataset[i] for i in range(4)]
    batch, prompts, answers = answered_rows(trainer, rows)
    reference = Reference(trainer, temperature)
    per_row = [reference.answer_row(row, prompt, answer, loss == "sampled")
               for row, prompt, answer in zip(rows, prompts, answers, strict=True)]
    expected = combine(per_row, ON_POLICY_ROUTES,
                       dict(zip(("same", "char"), weights, strict=True)) if weights else None, alpha=0.0)
    ours = step_terms(trainer, batch, sum(map(len, answers)))
    assert_terms(ours, expected)
    assert ours["ce_loss"] == 0.0 and expected["kd_loss/same"] != 0 and expected["kd_loss/char"] != 0


# ---------------------------------------------------------------- a served member under column routing


def test_a_served_member_is_asked_for_its_own_rows_only(models_dir, tmp_path):
    """Column routing: the served teacher's collator asks the server for the rows naming it, not the others."""
    from standin_server import StandInServer

    from llmneo.teacher.choice import connect_teacher

    tokenizer = load_student_tokenizer(parse_config(["--student_model", models_dir["student"], "--dataset", "x",
                                                     "--method", "lora"]).model)
    server = StandInServer(tokenizer)
    try:
        listed = json.dumps([{"name": "same", "model": models_dir["teacher"]},
                             {"name": "srv", "server": server.url, "top_k": 8}])
        data = routed_file(tmp_path, ["same", "srv", None, "srv"])
        flags = ["--method", "neo", "--student_model", models_dir["student"], "--dataset", data, "--output_dir",
                 str(tmp_path / "run"), "--lora_r", "4", "--max_steps", "1", "--per_device_train_batch_size", "4",
                 "--max_length", "256", "--teachers", listed, "--cache_tail", "bucket"]
        config = parse_config(flags)
        connection = connect_teacher(config, tokenizer)
        dataset, _ = build_dataset(config.data, tokenizer, 0, TeacherSide(routes=row_routes(config)))
        dataset = dataset.add_column("row_id", list(range(len(dataset))))
        models = load_models(config, tokenizer)
        (tmp_path / "run").mkdir()
        signal = teacher_signal(config, models, dataset=dataset, connection=connection)
        trainer = build_trainer(config, models, signal, dataset)
        server.requests.clear()
        batch = trainer.data_collator([dataset[i] for i in range(8)])
        items = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        terms = step_terms(trainer, batch, items)
        asked = [body for path, body in server.requests if path == "/v1/completions"]
        assert len(asked) == 4  # rows 1, 3, 5, 7 name srv
        assert terms["kd_loss/srv"] > 0 and terms["kd_loss/same"] > 0 and not signal.members["srv"].pending
    finally:
        signal.close() if "signal" in locals() else None
        server.close()


def test_offloaded_teachers_score_on_the_device_and_wait_on_the_cpu(models_dir, char_teacher, tmp_path):
    """--teacher_offload: the step's figures are the reference's, and each teacher is moved to the device only
    around its own scoring (the moves recorded)."""
    trainer, dataset = ensemble_trainer(models_dir, char_teacher, routed_file(tmp_path), tmp_path / "run",
                                        teacher_routing="mixture", teacher_offload="true")
    moves = []
    for name, member in trainer.signal.members.items():
        original = member.teacher.to
        member.teacher.to = lambda device, name=name, original=original: (moves.append((name, str(device))),
                                                                           original(device))[1]
    rows, reference = [dataset[i] for i in range(8)], Reference(trainer)
    per_row = [reference.dataset_row(row) for row in rows]
    ours = step_terms(trainer, trainer.data_collator(rows), sum(row["tokens"] for row in per_row))
    assert_terms(ours, combine(per_row, ROUTES, {"same": 0.5, "char": 0.5}, ALPHA))
    device = str(trainer.args.device)
    assert moves == [("same", device), ("same", "cpu"), ("char", device), ("char", "cpu")]
