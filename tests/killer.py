"""A `llm-neo` command line that SIGKILLs itself: after optimizer step N (``step N``), or in the middle of saving
checkpoint N (``save N``), as a crash would. Run as ``python -c KILLER MODE N ARGS...``."""

KILLER = """
import os, signal, sys
from transformers import Trainer, TrainerCallback
import llmneo.pipeline as pipeline

mode, when = sys.argv[1], int(sys.argv[2])

class KillAfterStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == when:
            os.kill(os.getpid(), signal.SIGKILL)

save_rng = Trainer._save_rng_state

def die_while_saving(self, output_dir):  # model and optimizer are on disk, the trainer state is not
    if self.state.global_step == when:
        os.kill(os.getpid(), signal.SIGKILL)
    save_rng(self, output_dir)

distill = pipeline.distill
if mode == "step":
    pipeline.distill = lambda config, callbacks=(): distill(config, [*callbacks, KillAfterStep()])
else:
    Trainer._save_rng_state = die_while_saving
from llmneo.cli import main
sys.exit(main(sys.argv[3:]))
"""

# A `llm-neo` command line that SIGKILLs itself while writing a model directory: ``weights-start`` (before the first
# safetensors file), ``weights-middle`` (after half of one is on disk) or ``tokenizer`` (before the tokenizer files:
# at the tokenizer's save, or export-lora's first file copy). Run as ``python -c WRITE_KILLER POINT ARGS...``.
WRITE_KILLER = """
import os, shutil, signal, sys
import safetensors.torch
from transformers import PreTrainedTokenizerBase
import transformers.modeling_utils, peft.peft_model
import llmneo.cli, llmneo.artifacts, llmneo.gguf, llmneo.pruning, llmneo.adapters.store

point = sys.argv[1]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

original = safetensors.torch.save_file

def save_file(tensors, filename, metadata=None):
    if point == "weights-start":
        die()
    original(tensors, filename, metadata=metadata)
    if point == "weights-middle":
        os.truncate(filename, os.path.getsize(filename) // 2)
        die()

for module in [module for module in sys.modules.values() if module is not sys.modules["__main__"]]:
    for name, value in list(getattr(module, "__dict__", {}).items()):
        if value is original:  # every module that imported it by name
            setattr(module, name, save_file)
if point == "tokenizer":
    PreTrainedTokenizerBase.save_pretrained = lambda *args, **kwargs: die()
    shutil.copy2 = lambda *args, **kwargs: die()
sys.exit(llmneo.cli.main(sys.argv[2:]))
"""
