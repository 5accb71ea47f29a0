"""Peak extra memory of one loss forward+backward, run as its own process: ``python memory_probe.py fused|naive``.

Prints the bytes by which the process's peak RSS rose above its RSS just before the call. Run with
MALLOC_MMAP_THRESHOLD_ set low so that every large buffer is its own mapping and freeing it lowers the RSS.
"""

import sys

import torch
import torch.nn.functional as F

from llmneo.losses.contract import LossSettings
from llmneo.losses.reference import distillation_loss
from llmneo.losses.fused import fused_distillation_loss

TOKENS, HIDDEN, VOCAB, CHUNK = 8192, 64, 32000, 1024


def rss_field(name: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {name}")


def inputs():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, TOKENS + 1, HIDDEN, generator=generator).requires_grad_(True)
    teacher_hidden = torch.randn(1, TOKENS + 1, HIDDEN, generator=generator)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator) * 0.1
    teacher_weight = torch.randn(VOCAB, HIDDEN, generator=generator) * 0.1
    labels = torch.randint(0, VOCAB, (1, TOKENS + 1), generator=generator)
    labels[0, 0] = -100
    return hidden, weight, teacher_hidden, teacher_weight, labels


def fused(hidden, weight, teacher_hidden, teacher_weight, labels):
    fused_distillation_loss(hidden, weight, labels, teacher_hidden, teacher_weight, settings=LossSettings(chunk_size=CHUNK)).loss.backward()


def naive(hidden, weight, teacher_hidden, teacher_weight, labels):
    with torch.no_grad():
        teacher_logits = F.linear(teacher_hidden, teacher_weight)
    distillation_loss(F.linear(hidden, weight), labels, teacher_logits, settings=LossSettings(chunk_size=CHUNK)).loss.backward()


def main():
    tensors = inputs()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")  # resets the peak (VmHWM) to the current RSS
    before = rss_field("VmRSS")
    {"fused": fused, "naive": naive}[sys.argv[1]](*tensors)
    assert tensors[0].grad is not None
    print(rss_field("VmHWM") - before)


if __name__ == "__main__":
    main()
