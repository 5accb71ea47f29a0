"""What the benchmarks share: reference shapes, random-init Llamas, synthetic rows, a step clock, a collator."""

from __future__ import annotations

import time

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (DataCollatorForSeq2Seq, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
                          TrainerCallback)

# (hidden, layers, attention heads, intermediate); key/value heads = heads / 4 as in Llama 3.
PRESETS = {
    "cpu": {"vocab": 32000, "teacher": (512, 8, 8, 1536), "student": (256, 4, 4, 768), "rank": 16, "seq": 256,
            "batch": 4, "dtype": torch.float32},
    "llama": {"vocab": 128256, "teacher": (4096, 32, 32, 14336), "student": (2048, 16, 32, 8192), "rank": 128,
              "seq": 2048, "batch": 4, "dtype": torch.bfloat16},
}


def build_llama(vocab, shape, dtype, seed, tie=False):
    hidden, layers, heads, intermediate = shape
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=max(heads // 4, 1), intermediate_size=intermediate, use_cache=False,
                         max_position_embeddings=16384, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    if not torch.cuda.is_available():
        return LlamaForCausalLM(config).to(dtype)
    # On a GPU the weights are drawn there, in their dtype: an 8B model drawn in fp32 on the CPU costs minutes of
    # device time per benchmark (the values do not matter for speed or memory).
    with torch.device("cuda"):
        return LlamaForCausalLM._from_config(config, dtype=dtype)


def parameter_count(shape, vocab, tie=False) -> int:
    """Parameters of a Llama of this shape, by formula (for FLOP counts)."""
    hidden, layers, heads, intermediate = shape
    head_dim = hidden // heads
    kv = max(heads // 4, 1) * head_dim
    per_layer = hidden * (hidden + 2 * kv + hidden) + 3 * hidden * intermediate + 2 * hidden
    return layers * per_layer + vocab * hidden * (1 if tie else 2) + hidden


def synthetic_rows(rows, seq, vocab, seed=0, variable=False):
    """Random ids; the first quarter of each row a prompt. ``variable``: lengths uniform in [seq/2, seq]."""
    generator = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for _ in range(rows):
        length = int(torch.randint(seq // 2, seq + 1, (1,), generator=generator)) if variable else seq
        row = torch.randint(0, vocab, (length,), generator=generator)
        label = row.clone()
        label[: length // 4] = -100
        ids.append(row.tolist())
        labels.append(label.tolist())
    return Dataset.from_dict({"input_ids": ids, "labels": labels, "row_id": list(range(rows))})


def pad_only_tokenizer():
    """The collator only pads: a tokenizer object with a pad token is all it needs."""
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0}, unk_token="<pad>")),
                                   pad_token="<pad>")


def padding_collator():
    return DataCollatorForSeq2Seq(pad_only_tokenizer(), label_pad_token_id=-100, padding=True)


class StepClock(TrainerCallback):
    """Wall-clock time at the end of every optimizer step (device-synchronised)."""

    def __init__(self):
        self.times, self.tokens = [], []
        self.started = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        self.tokens.append(state.num_input_tokens_seen)  # with include_num_input_tokens_seen="non_padding"

    def seconds_after_first(self) -> tuple[int, float]:
        """Steps and seconds from the end of the first step (warm-up) to the end of the last."""
        return len(self.times) - 1, self.times[-1] - self.times[0]

    def seconds_per_step(self) -> float:
        """Mean seconds per optimizer step from the start of training, the first step included."""
        return (self.times[-1] - self.started) / len(self.times)

    def tokens_per_second(self) -> float:
        """Non-padding input tokens per second after the first step."""
        return (self.tokens[-1] - self.tokens[0]) / (self.times[-1] - self.times[0])


def word_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A tokenizer of ``vocab`` whole-word ids (t0 t1 ...), with EOS: the rows are ids already; a server (vLLM loads
    its tokenizer.json) or a chat template (rollouts' stop tokens) needs only a tokenizer that reads them."""
    words = {"<unk>": 0, "<pad>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def train_steps(student, dataset, collator, preset, steps, out, signal, tokenizer=None, **options):
    """``steps`` optimizer steps of the real TokenDistillTrainer (no logging, no saving); the trainer and its StepClock.
    ``options``: further NeoTrainingArguments fields."""
    from llmneo.config import NeoTrainingArguments
    from llmneo.training import TokenDistillTrainer

    args = NeoTrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=preset["batch"],
                                learning_rate=1e-4, logging_steps=10**6, report_to=[], disable_tqdm=True,
                                bf16=preset["dtype"] == torch.bfloat16, save_strategy="no", seed=0,
                                remove_unused_columns=False, **options)
    clock = StepClock()
    trainer = TokenDistillTrainer(model=student, args=args, train_dataset=dataset, data_collator=collator, callbacks=[clock],
                         signal=signal, processing_class=tokenizer)
    trainer.train()
    return trainer, clock
