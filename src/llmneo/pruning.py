"""Depth pruning (`llm-neo prune-layers`): which decoder layers a pruned student keeps, measured on calibration rows
(``--strategy``), and the pruned copy itself, which keeps them unchanged with the teacher's embeddings, final norm,
head and tokenizer (the paper's "Llama 3 pruned 1B" and Minitron-depth students are made this way).

- ``even``: N layers evenly spaced from the first to the last (no data needed);
- ``block-influence`` (ShortGPT): a layer's importance is 1 − the mean cosine similarity between its input and
  output hidden states; the least important layers go, all at once;
- ``greedy``: remove one layer at a time, each time the one whose removal keeps the pruned model closest to the
  unpruned one (mean KL(unpruned ‖ pruned) over the calibration rows' answer tokens). It optimises exactly the
  quantity it reports, so it is the default when calibration data is given.

Every layer's score and the calibration KL and CE after each removal are written to ``pruning.json`` beside the
pruned model.
"""

from __future__ import annotations

import copy
import json
import logging
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from .config import DataArguments
from .data.collators import make_collator
from .data.loading import build_dataset
from .errors import ConfigError
from .lm_head import capture_final_hidden, output_head
from .losses.contract import answer_mask, answer_rows, answer_targets
from .models.loading import load_student_tokenizer, load_tokenizer
from .runtime.model_dir import check_model_files, model_directory
from .runtime.run_dir import require_new_output

logger = logging.getLogger(__name__)

STRATEGIES = ("even", "block-influence", "greedy")
PRUNING_FILE = "pruning.json"
CHUNK_ROWS = 512  # answer positions whose logits are built at once


@dataclass
class PruningResult:
    strategy: str
    kept: list[int]
    removed: list[int] = field(default_factory=list)  # in the order they went
    scores: dict[int, float] = field(default_factory=dict)  # per layer: block influence, or greedy's first-round KL
    steps: list[dict] = field(default_factory=list)  # after each removal: layer, calibration KL and CE


@dataclass(frozen=True)
class Calibration:
    """The rows layers are measured on: any ``distill --dataset`` file or id, how many rows, tokens per row."""

    data: str
    rows: int = 64
    max_length: int = 256


def prune_model_dir(path: str, output: str, keep: int | None = None, drop: list[int] | None = None,
                    strategy: str | None = None, calibration: Calibration | None = None) -> PruningResult:
    """Save the pruned model (safetensors) with the source's tokenizer and ``pruning.json``."""
    require_new_output(output)
    strategy = strategy or ("greedy" if calibration else "even")
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown --strategy {strategy}; expected one of {', '.join(STRATEGIES)}")
    if strategy != "even" and (calibration is None or drop is not None):
        raise ConfigError(f"--strategy {strategy} chooses the layers from --calibration data with --keep N")
    check_model_files(path, "source")
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval()
    total = model.config.num_hidden_layers
    if strategy == "even":
        result = PruningResult("even", layers_to_keep(total, keep, drop))
    else:
        layers_to_keep(total, keep, None)  # checks N
        batches = calibration_batches(path, calibration.data, calibration.rows, calibration.max_length)
        choose = block_influence_choice if strategy == "block-influence" else greedy_choice
        result = choose(model, batches, total - keep)
    model.config.use_cache = False
    with model_directory(output) as partial:
        prune_layers(model, result.kept).save_pretrained(partial)
        load_tokenizer(path, role="source").save_pretrained(partial)
        Path(partial, PRUNING_FILE).write_text(json.dumps({**asdict(result), "source": str(path), "layers": total},
                                                          indent=1) + "\n", encoding="utf-8")
    logger.info("kept layers %s of %d (%s); student written to %s", result.kept, total, strategy, output)
    return result


def calibration_batches(model_path: str, data: str, rows: int, max_length: int, batch_size: int = 8) -> list[dict]:
    """Calibration rows tokenised as training rows are (the model's chat template, answer labels)."""
    from .config import ModelArguments

    tokenizer = load_student_tokenizer(ModelArguments(student_model=model_path))
    dataset, _ = build_dataset(DataArguments(dataset=data, max_samples=rows, max_length=max_length), tokenizer, seed=0)
    collate = make_collator(tokenizer)
    columns = dataset.select_columns(["input_ids", "labels"])
    return [collate([columns[i] for i in range(start, min(start + batch_size, len(columns)))])
            for start in range(0, len(columns), batch_size)]


def block_influence_choice(model, batches: list[dict], remove: int) -> PruningResult:
    scores = block_influence(model, batches)
    removed = sorted(scores, key=scores.get)[:remove]
    kept = [index for index in range(model.config.num_hidden_layers) if index not in removed]
    reference = final_hidden_states(model, batches)
    steps = []
    for count in range(1, remove + 1):
        subset = [index for index in range(model.config.num_hidden_layers) if index not in removed[:count]]
        steps.append({"removed": removed[count - 1], **divergence_from(model, subset, batches, reference)})
    return PruningResult("block-influence", kept, removed, scores, steps)


@torch.no_grad()
def block_influence(model, batches: list[dict]) -> dict[int, float]:
    """Per layer: 1 − mean cosine similarity between its input and output hidden states over real tokens."""
    layers = _layer_list(model)
    sums, counts, handles = [0.0] * len(layers), [0] * len(layers), []
    mask_holder = {}

    def hook(index):
        def record(_module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            cosine = F.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)
            real = mask_holder["mask"]
            sums[index] += float(cosine[real].sum())
            counts[index] += int(real.sum())
        return record

    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(hook(index), with_kwargs=True))
    try:
        for batch in batches:
            mask_holder["mask"] = batch["attention_mask"].bool()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {index: 1.0 - sums[index] / max(counts[index], 1) for index in range(len(layers))}


def greedy_choice(model, batches: list[dict], remove: int) -> PruningResult:
    reference = final_hidden_states(model, batches)
    kept, removed, steps, scores = list(range(model.config.num_hidden_layers)), [], [], {}
    for _ in range(remove):
        trials = {index: divergence_from(model, [i for i in kept if i != index], batches, reference) for index in kept}
        if not scores:
            scores = {index: trial["kl"] for index, trial in trials.items()}
        best = min(trials, key=lambda index: trials[index]["kl"])
        kept.remove(best)
        removed.append(best)
        steps.append({"removed": best, **trials[best]})
        logger.info("greedy pruning: removed layer %d (calibration KL %.4f, CE %.4f)", best, trials[best]["kl"],
                    trials[best]["ce"])
    return PruningResult("greedy", kept, removed, scores, steps)


@torch.no_grad()
def final_hidden_states(model, batches: list[dict]) -> list[torch.Tensor]:
    """The unpruned model's final hidden states at each batch's answer positions: its logits, H-wide."""
    states = []
    for batch in batches:
        with capture_final_hidden(model) as captured:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        states.append(answer_rows(captured.hidden, answer_mask(batch["labels"])))
    return states


@torch.no_grad()
def divergence_from(model, subset: list[int], batches: list[dict], reference: list[torch.Tensor]) -> dict:
    """Mean KL(unpruned ‖ model with only ``subset`` layers) and CE on the labels, per answer token."""
    weight = output_head(model).weight
    kl = ce = 0.0
    tokens = 0
    with only_layers(model, subset):
        pruned = final_hidden_states(model, batches)
    for batch, hidden, hidden_ref in zip(batches, pruned, reference, strict=True):
        targets = answer_targets(batch["labels"], answer_mask(batch["labels"]))
        for rows, rows_ref, target in zip(hidden.split(CHUNK_ROWS), hidden_ref.split(CHUNK_ROWS),
                                          targets.split(CHUNK_ROWS), strict=True):
            log_p = F.log_softmax(F.linear(rows, weight).float(), -1)
            log_q = F.log_softmax(F.linear(rows_ref, weight).float(), -1)
            kl += float((log_q.exp() * (log_q - log_p)).sum())
            ce += float(F.nll_loss(log_p, target, reduction="sum"))
            tokens += target.numel()
    return {"kl": kl / max(tokens, 1), "ce": ce / max(tokens, 1), "layers": len(subset)}


def _layer_list(model) -> torch.nn.ModuleList:
    return model.get_submodule(decoder_layers_prefix(model))


@contextmanager
def only_layers(model, subset: list[int]):
    """Inside the block the model runs only the decoder layers ``subset`` (weights shared, nothing copied)."""
    prefix = decoder_layers_prefix(model)
    parent_name, _, attribute = prefix.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    full, config = getattr(parent, attribute), model.config
    saved = (config.num_hidden_layers, getattr(config, "layer_types", None))
    setattr(parent, attribute, torch.nn.ModuleList([full[index] for index in subset]))
    config.num_hidden_layers = len(subset)
    if saved[1] is not None:
        config.layer_types = [saved[1][index] for index in subset]
    try:
        yield
    finally:
        setattr(parent, attribute, full)
        config.num_hidden_layers, layer_types = saved
        if layer_types is not None:
            config.layer_types = layer_types


def layers_to_keep(total: int, keep: int | None = None, drop: list[int] | None = None) -> list[int]:
    """``keep`` N layers evenly spaced from the first to the last, or all but the ``drop`` indices."""
    if (keep is None) == (drop is None):
        raise ConfigError("give exactly one of --keep N and --drop i,j,...")
    if keep is not None:
        if not 1 <= keep <= total:
            raise ConfigError(f"--keep {keep}: the model has {total} layers")
        return [0] if keep == 1 else sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})
    outside = [index for index in drop if not 0 <= index < total]
    if outside:
        raise ConfigError(f"--drop {outside[0]}: layers are numbered 0 to {total - 1}")
    kept = [index for index in range(total) if index not in set(drop)]
    if not kept:
        raise ConfigError("--drop removes every layer")
    return kept


def decoder_layers_prefix(model) -> str:
    """The state-dict prefix of the decoder layer list (``model.layers`` for Llama, Qwen, Mistral, ...)."""
    total = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == total and name:
            return name
    raise ConfigError(f"cannot find the {total} decoder layers of this {type(model).__name__}")


def prune_layers(model, keep: list[int]):
    """A copy of ``model`` with only the decoder layers ``keep`` (in order), every kept weight unchanged: the
    ``only_layers`` view of the model, copied, with each kept layer renumbered (its KV-cache index)."""
    with only_layers(model, keep):
        pruned = copy.deepcopy(model)
    for index, layer in enumerate(_layer_list(pruned)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    return pruned
