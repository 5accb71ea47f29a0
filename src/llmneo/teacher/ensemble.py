"""Several teachers in one run (``--teachers``): one teacher signal over member signals, each member any source
(teacher/sources.py) built exactly as a one-teacher run with its settings would build it (teachers.py:
``member_config``).

How the members' terms combine is a routing type:

- ``ColumnRouting``: each training row names its teacher (data/routing.py); a member scores its own rows only
  (the batch's rows as a batch of their own, same width), rows naming none train with CE alone. The batch's loss is
  the sum of the members' losses on their rows, each divided by the answer tokens of the whole optimizer step, so the
  normalisation is unchanged.
- ``MixtureRouting``: every member scores every row and the loss is Σ wᵢ·(αCE + (1−α)T²Dᵢ) with Σ wᵢ = 1, which is
  αCE + (1−α)T²·Σ wᵢDᵢ: the mixture of the KD terms. A member of weight 0 is not run.

Each member's own KD term is logged beside the combined one as ``kd_loss/NAME`` (column: its rows' contribution,
so the terms add up to ``kd_loss``; mixture: its whole term before weighting), and under column routing each
member's share of the rows as ``teacher_rows/NAME`` (``teacher_rows/none``: CE only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
from dataclasses import dataclass

import torch

from ..data.collators import batch_rows
from ..data.routing import NO_TEACHER, ROUTE_COLUMN
from ..errors import ConfigError
from ..evaluation.metrics import HeldOutOptions, evaluate_against_teacher
from ..losses.contract import LossParts, LossSettings, answer_mask
from ..losses.targets import StudentSide, TeacherTargets
from ..rollouts import ROLLOUT
from ..teachers import member_config, teacher_members, teacher_weights
from .loading import load_teacher
from .signal import NoTeacher, RunModels, SourceParts, TeacherSignal

logger = logging.getLogger(__name__)


def _kind(view) -> type[TeacherSignal]:
    from .choice import source_kind  # choice lists this class among the sources it asks

    return source_kind(view)


@dataclass
class Share:
    """One member's part of a batch: its name, weight, and batch rows (None: all of them)."""

    name: str | None  # None: the rows that name no teacher (CE only)
    weight: float
    rows: torch.Tensor | None = None


class Routing:
    """Which member scores which rows of a batch, with what weight."""

    def shares(self, inputs: dict, names: list[str]) -> list[Share]:
        raise NotImplementedError

    def assign(self, members: dict[str, TeacherSignal]) -> None:
        """Tell each member which training rows it scores (all, unless a routing says otherwise)."""

    def identity(self) -> dict:
        return {}


class MixtureRouting(Routing):
    def __init__(self, weights: list[float]):
        self.weights = weights

    def shares(self, inputs: dict, names: list[str]) -> list[Share]:
        return [Share(name, weight) for name, weight in zip(names, self.weights, strict=True) if weight > 0]


class ColumnRouting(Routing):
    def __init__(self, routes: list[int]):
        self.routes = torch.tensor(routes, dtype=torch.long)  # by row_id: the index of the row's teacher

    def shares(self, inputs: dict, names: list[str]) -> list[Share]:
        routed = self.routes[inputs["row_id"].cpu()]
        found = [Share(name, 1.0, (routed == index).nonzero().flatten()) for index, name in enumerate(names)]
        return found + [Share(None, 1.0, (routed == NO_TEACHER).nonzero().flatten())]

    def assign(self, members: dict[str, TeacherSignal]) -> None:
        for index, member in enumerate(members.values()):
            member.score_only(set((self.routes == index).nonzero().flatten().tolist()))

    def identity(self) -> dict:
        return {"routes_sha256": hashlib.sha256(self.routes.numpy().tobytes()).hexdigest()}


ROUTINGS = {"mixture": lambda config, dataset: MixtureRouting(teacher_weights(config)),
            "column": lambda config, dataset: ColumnRouting(dataset[ROUTE_COLUMN])}


class TeacherEnsemble(TeacherSignal):
    """The members (name -> source, in --teachers order) and how their terms combine."""

    def __init__(self, members: dict[str, TeacherSignal], routing: Routing, offload: bool = False):
        self.members, self.routing, self.offload = members, routing, offload
        self.device = None
        self.rows_seen = dict.fromkeys([*members, "none"], 0)
        same_tokens = [member.kd_vocab_size for member in members.values() if member.kd_vocab_size is not None]
        self.kd_vocab_size = same_tokens[0] if same_tokens else None  # evaluation on the student's own tokens
        readers = [member.teacher_tokenizer for member in members.values() if member.teacher_tokenizer is not None]
        self.teacher_tokenizer = readers[0] if readers else None

    # ---- choice and construction (teacher/choice.py) ----

    @classmethod
    def chosen(cls, config) -> bool:
        return bool(config.training.teachers)

    @classmethod
    def connect(cls, config, tokenizer) -> dict:
        return {member["name"]: _kind(view).connect(view, tokenizer) for member, view in _views(config)}

    @classmethod
    def reading_tokenizer(cls, config):
        """The one member that reads its own rendering of each row (the rows carry one teacher's rendering)."""
        readers = [(member["name"], view) for member, view in _views(config) if _kind(view).reads_own_rendering]
        if len(readers) > 1:
            raise ConfigError(f"teachers {readers[0][0]} and {readers[1][0]} both read their own rendering of each row "
                              "(a loaded model with cross_tokenizer): at most one per run; capture the other's "
                              "signal with `llm-neo cache-teacher --cross_tokenizer` and give it as a cache")
        return _kind(readers[0][1]).reading_tokenizer(readers[0][1]) if readers else None

    @classmethod
    def open_cache(cls, config, tokenizer, dataset, data: dict) -> dict:
        return {member["name"]: _kind(view).open_cache(view, tokenizer, dataset, data) for member, view in _views(config)}

    @classmethod
    def build(cls, config, parts: SourceParts) -> TeacherSignal:
        """Each member as its one-teacher run builds it (a loaded member's model loaded here, once)."""
        members, models = {}, parts.models
        for member, view in _views(config):
            kind, name = _kind(view), member["name"]
            teacher = load_teacher(view.model) if kind.loads_teacher else None
            # the reading member's tokenizer was loaded once for the data side (choice.reading_teacher_tokenizer)
            reader = models.teacher_tokenizer if kind.reads_own_rendering else None
            own = RunModels(models.tokenizer, models.student, teacher, reader, models.head)
            members[name] = kind.build(view, SourceParts(own, (parts.cache or {}).get(name),
                                                         (parts.connection or {}).get(name), parts.dataset))
            logger.info("teacher %s: %s", name, type(members[name]).__name__)
        routing = ROUTINGS[config.training.teacher_routing](config, parts.dataset)
        routing.assign(members)
        return cls(members, routing, config.training.teacher_offload)

    # ---- the trainer's side ----

    def place(self, placer, device) -> None:
        self.device = device
        for member in self.members.values():
            if self.offload and member.teacher is not None:
                member.attach(member.teacher.to("cpu"), device)  # moved to the device only while scoring
            else:
                member.place(placer, device)

    def loaded_teachers(self) -> list[torch.nn.Module]:
        return [teacher for member in self.members.values() for teacher in member.loaded_teachers()]

    def collator(self, padded, tokenizer):
        for member in self.members.values():
            padded = member.collator(padded, tokenizer)
        return padded

    def targets(self, inputs: dict, student: StudentSide) -> TeacherTargets:
        return EnsembleTargets(self, inputs, sampled=False)

    def sampled_targets(self, inputs: dict, student: StudentSide) -> TeacherTargets:
        return EnsembleTargets(self, inputs, sampled=True)

    def member_parts(self, share: Share, batch: tuple[dict, StudentSide], settings: LossSettings, items,
                     sampled: bool = False) -> LossParts:
        """One member's loss on its rows (divided by the step's ``items``), its teacher on the device meanwhile."""
        member = self.members[share.name] if share.name is not None else NoTeacher()
        inputs, student = batch
        if share.rows is not None:
            self.rows_seen[share.name or "none"] += len(share.rows)
            inputs, student = batch_rows(inputs, share.rows), student.select(share.rows)
        settings = dataclasses.replace(settings, kd_vocab_size=member.kd_vocab_size or settings.kd_vocab_size)
        with self._scoring(member):
            targets = member.sampled_targets(inputs, student) if sampled else member.targets(inputs, student)
            return targets.loss(student, inputs["labels"], settings, items)

    @contextlib.contextmanager
    def _scoring(self, member: TeacherSignal):
        """--teacher_offload: the member's teacher on the device while it scores (and its loss is computed)."""
        moves = self.offload and member.teacher is not None and self.device is not None
        if moves:
            member.teacher.to(self.device)
        try:
            yield
        finally:
            if moves:
                member.teacher.to("cpu")

    def planned(self, rows: list[int], on_policy: bool, next_on_policy: bool) -> None:
        for member in self.members.values():
            member.planned(rows, on_policy, next_on_policy)

    def diagnostics(self, trainer, dataset, report) -> dict:
        return {f"{key}/{name}": value for name, member in self.members.items()
                for key, value in member.diagnostics(trainer, dataset, report).items()}

    def evaluate(self, trainer, dataset) -> dict:
        """The student's held-out metrics once, then what each member adds to them (``NAME/metric``)."""
        options = HeldOutOptions(batch_size=trainer.args.per_device_eval_batch_size,
                                 kd_vocab_size=trainer.loss_settings.kd_vocab_size,
                                 chunk_size=trainer.loss_settings.chunk_size, byte_lengths=trainer.byte_lengths)
        metrics = evaluate_against_teacher(trainer.model, dataset, trainer.eval_collator, None, options)
        for name, member in self.members.items():
            with self._scoring(member):
                found = member.evaluate(trainer, dataset)
            metrics.update({f"{key}/{name}": value for key, value in found.items() if key not in metrics})
        return metrics

    def log_figures(self, steps: int) -> dict:
        figures = {f"{key}/{name}": value for name, member in self.members.items()
                   for key, value in member.log_figures(steps).items()}
        rows = sum(self.rows_seen.values())
        if rows:  # column routing: each member's share of the rows trained on since the last log
            figures.update({f"teacher_rows/{name}": round(count / rows, 4) for name, count in self.rows_seen.items()})
        self.rows_seen = dict.fromkeys(self.rows_seen, 0)
        return figures

    def at_checkpoint(self) -> None:
        for member in self.members.values():
            member.at_checkpoint()

    def close(self) -> None:
        for member in self.members.values():
            member.close()

    def identity(self) -> dict:
        """Each member's (a loaded member's weights are the run's ``models``: models/identity.read_models)."""
        return {"teachers": {name: member.identity() for name, member in self.members.items()},
                **self.routing.identity()}


@dataclass
class EnsembleTargets(TeacherTargets):
    """A batch's targets from every member its routing gives rows to, computed member by member in ``loss``."""

    ensemble: TeacherEnsemble
    inputs: dict
    sampled: bool

    def loss(self, student: StudentSide, labels, settings: LossSettings, num_items) -> LossParts:
        items = num_items if num_items is not None else answer_mask(labels).sum()
        ensemble = self.ensemble
        names = list(ensemble.members)
        loss = ce = kd = labels.new_zeros((), dtype=torch.float32)
        terms = {}
        for share in ensemble.routing.shares(self.inputs, names):
            if share.rows is not None and not len(share.rows):  # none of the batch's rows is this member's
                if share.name is not None:
                    terms[f"kd_loss/{share.name}"] = kd.detach() * 0  # every log line names every member
                continue
            if share.name is None and ROLLOUT in self.inputs:  # no teacher to score these answers (data refuses it)
                continue
            parts = ensemble.member_parts(share, (self.inputs, student), settings, items, self.sampled)
            loss, ce, kd = loss + share.weight * parts.loss, ce + share.weight * parts.ce, kd + share.weight * parts.kd
            if share.name is not None:
                terms[f"kd_loss/{share.name}"] = parts.kd.detach()
        return LossParts(loss, ce.detach(), kd.detach(), terms)


def _views(config):
    return [(member, member_config(config, member)) for member in teacher_members(config)]
