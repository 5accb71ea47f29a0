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
