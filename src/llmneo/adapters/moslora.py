"""MoSLoRA (Mixture-of-Subspaces LoRA, arXiv 2406.11909) as a PEFT LoRA layer.

For each targeted linear layer, ``h = W0·x + s·B(M(A(dropout(x))))`` with A (r×d_in), a trainable r×r mixer M and
B (d_out×r); s = lora_alpha / r (or / √r with rslora). It plugs into PEFT through LoRA's custom-module mapping
(``LoraConfig._register_custom_module``) rather than a fork. Its mixer lives in ``lora_mixer``, so PEFT itself trains,
freezes, saves and loads it with the adapter (every ``lora_`` parameter is adapter state), and merging uses
PEFT's own code through ``get_delta_weight`` = s·B·M·A.

Since B(M(A x)) = (B·M)(A x), folding the mixer into B gives a plain LoRA with the same output. That is the export:
stock PEFT, vLLM and anything else that loads LoRA can use it.
"""

from __future__ import annotations

import math

import torch
from peft import LoraConfig
from peft.tuners.lora import layer as lora_layer
from peft.utils.other import transpose
from torch import nn

MIXER_SUFFIX = "lora_mixer.weight"


class MoSLoraLinear(lora_layer.Linear):
    """A LoRA ``Linear`` with an r×r mixer between A and B."""

    adapter_layer_names = (*lora_layer.Linear.adapter_layer_names, "lora_mixer")
    mixer_init = "kaiming"

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
        if config.use_dora:
            raise ValueError("MoSLoRA does not combine with DoRA: choose one of the two")
        if "lora_mixer" not in self._modules:
            self.lora_mixer = nn.ModuleDict()  # before the parent's set_adapter walks adapter_layer_names
        super().update_layer(adapter_name, r, lora_alpha, config, **kwargs)
        reference = self.lora_A[adapter_name].weight
        mixer = nn.Linear(r, r, bias=False).to(device=reference.device, dtype=reference.dtype)
        if self.mixer_init == "orthogonal":
            nn.init.orthogonal_(mixer.weight)
        else:
            nn.init.kaiming_uniform_(mixer.weight, a=math.sqrt(5))
        self.lora_mixer[adapter_name] = mixer
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def get_delta_weight(self, adapter) -> torch.Tensor:
        weight_b = self.lora_B[adapter].weight
        weights = [weight_b, self.lora_mixer[adapter].weight, self.lora_A[adapter].weight]
        # As PEFT does: half-precision products on CPU are slow, so compute them in fp32 there.
        upcast = weight_b.device.type == "cpu" and weight_b.dtype in (torch.float16, torch.bfloat16)
        if upcast:
            weights = [weight.float() for weight in weights]
        delta = transpose(weights[0] @ weights[1] @ weights[2], self.fan_in_fan_out) * self.scaling[adapter]
        return delta.to(weight_b.dtype) if upcast else delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if kwargs.get("adapter_names") is not None:
            raise NotImplementedError("MoSLoRA does not support mixed-adapter batches (adapter_names)")
        if self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)
        self._check_forward_args(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a = self.lora_A[name]
            inputs = self.lora_dropout[name](self._cast_input_dtype(x, lora_a.weight.dtype))
            result = result + self.lora_B[name](self.lora_mixer[name](lora_a(inputs))) * self.scaling[name]
        return result.to(result_dtype)

    def __repr__(self) -> str:
        return "moslora." + super().__repr__().removeprefix("lora.")


class OrthogonalMixerMoSLoraLinear(MoSLoraLinear):
    mixer_init = "orthogonal"


LAYERS = {"kaiming": MoSLoraLinear, "orthogonal": OrthogonalMixerMoSLoraLinear}


def register_moslora(config: LoraConfig, mixer_init: str = "kaiming") -> LoraConfig:
    """Make PEFT build MoSLoRA layers for the linear layers ``config`` targets."""
    if mixer_init not in LAYERS:
        raise ValueError(f"unknown mixer_init '{mixer_init}'; expected one of {list(LAYERS)}")
    config._register_custom_module({nn.Linear: LAYERS[mixer_init]})
    return config


def fold_mixers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A MoSLoRA adapter state dict as a plain LoRA one: B' = B·M, the mixers dropped, A unchanged."""
    folded = {key: value for key, value in state_dict.items() if not key.endswith(MIXER_SUFFIX)}
    for key, mixer in state_dict.items():
        if key.endswith(MIXER_SUFFIX):
            b_key = key.removesuffix(MIXER_SUFFIX) + "lora_B.weight"
            weight_b = state_dict[b_key]
            folded[b_key] = (weight_b.float() @ mixer.float()).to(weight_b.dtype)
    return folded
