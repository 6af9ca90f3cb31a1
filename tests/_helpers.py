"""Tiny configs and random models shared by the tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

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


def block_crossing_config(**overrides):
    """A small config whose projections span several 128x128 FP8 blocks with partial edge blocks (160, 176 and
    200 rows/columns), like the real kv_a_proj_with_mqa (576 rows on a 5-row grid)."""
    fields = dict(hidden_size=160, kv_lora_rank=160, q_lora_rank=200, moe_intermediate_size=136,
                  intermediate_size=264, num_attention_heads=2, num_key_value_heads=2, qk_nope_head_dim=32,
                  qk_rope_head_dim=16, v_head_dim=32, vocab_size=300, n_routed_experts=8, n_group=4, topk_group=2,
                  num_experts_per_tok=2, num_hidden_layers=2, first_k_dense_replace=1)
    fields.update(overrides)
    return tiny_config(**fields)


def dequantize_by_blocks(weight_fp8, scale_inv):
    """Reference dequantization written block by block (independent of modeling_deepseek_v3.fp8)."""
    out = torch.empty(weight_fp8.shape, dtype=torch.float32)
    rows, cols = weight_fp8.shape
    for bi in range(0, rows, 128):
        for bj in range(0, cols, 128):
            block = weight_fp8[bi:bi + 128, bj:bj + 128].to(torch.float32)
            out[bi:bi + 128, bj:bj + 128] = block * scale_inv[bi // 128, bj // 128].to(torch.float32)
    return out


def write_dequantized_twin(official: dict, fp8_folder, twin_folder):
    """The non-quantized twin of an FP8 checkpoint: every FP8 weight replaced by its exact float32 dequantization,
    scales dropped, config without quantization_config."""
    from pathlib import Path

    from safetensors.torch import save_file

    twin_folder = Path(twin_folder)
    twin_folder.mkdir(parents=True, exist_ok=True)
    twin = {}
    for key, tensor in official.items():
        if key.endswith("_scale_inv"):
            continue
        if tensor.dtype == torch.float8_e4m3fn:
            twin[key] = dequantize_by_blocks(tensor, official[key + "_scale_inv"])
        else:
            twin[key] = tensor.to(torch.float32).clone()
    save_file(twin, str(twin_folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((Path(fp8_folder) / "config.json").read_text())
    config.pop("quantization_config")
    (twin_folder / "config.json").write_text(json.dumps(config))
    return twin


class LargestAllocation(TorchDispatchMode):
    """The largest tensor any op allocates while active (outputs that are views of an input are not new)."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                self.nbytes = max(self.nbytes, tensor.untyped_storage().nbytes())
        return out


class HostReads(TorchDispatchMode):
    """Counts the ops that read a tensor's value into Python while active (`.item()`, `float(t)`, `bool(t)`,
    `if t:`): on a GPU each of those waits for the device (a host sync)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def run_example(script, *args) -> str:
    """Run `examples/<script>` with `args` in a fresh interpreter; fail the test with its output tails."""
    # One compute thread: the tiny model gains nothing from more, and spinning OpenMP threads on a busy 2-core
    # machine can slow a run tenfold.
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, str(REPO / "examples" / script), *map(str, args)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout
