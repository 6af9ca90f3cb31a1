"""Tiny configs and random models shared by the tests."""

import json
from pathlib import Path

import torch

from modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM

REPO = Path(__file__).resolve().parent.parent
PRESETS = REPO / "configuration"


def tiny_config(**overrides) -> DeepseekV3Config:
    """The `deepseek-v3-tiny` preset (YaRN on, MTP on, 1 dense + 2 MoE layers) with `overrides` applied."""
    fields = json.loads((PRESETS / "deepseek-v3-tiny.json").read_text())
    fields.update(overrides)
    return DeepseekV3Config(**fields)


def random_model(config: DeepseekV3Config, seed: int = 0, dtype=torch.float32) -> DeepseekV3ForCausalLM:
    """A float32 model in eval mode whose norms and routing biases are not at their trivial init values, so that a
    bug in any of them shows up in the outputs."""
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config).to(dtype).eval()
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                tensor.normal_(0.0, 0.05)
            elif "norm" in name and name.endswith("weight"):
                tensor.normal_(1.0, 0.2)
    return model


def relative_max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the magnitude of b (the 'logit scale')."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-12)).item()
