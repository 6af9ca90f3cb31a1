"""bitsandbytes 4-bit (NF4/FP4) and 8-bit (LLM.int8) quantization of DeepSeek-V3, the routed experts included.

transformers' bitsandbytes integration replaces every `nn.Linear` and leaves the fused routed experts
(`gate_up_proj` [E, 2I, D], `down_proj` [E, D, I]: parameters, not linears, 97% of the weights of the 671B model)
in bf16. Here the whole layer is quantized:

- every `nn.Linear` (MLA projections, dense MLPs, shared experts, MTP `eh_proj`) becomes `bnb.nn.Linear4bit` /
  `bnb.nn.Linear8bitLt`, as transformers does;
- `DeepseekV3Experts` becomes `DeepseekV3QuantizedExperts`: per expert one quantized `[2I, D]` gate/up matrix
  (gate rows first, as in the fused tensor) and one `[D, I]` down matrix, run on the tokens routed to that expert
  only (`expert_loop`);
- the router (`gate`, not a linear), the norms, the embedding and `lm_head` stay in high precision, and so does
  any module named in `BitsAndBytesConfig.llm_int8_skip_modules` (module names, dotted suffixes or prefixes:
  `["lm_head", "experts"]` keeps the routed experts in bf16).

`DeepseekV3PreTrainedModel.from_pretrained(path, quantization_config=BitsAndBytesConfig(...))` routes here: the
model is built on the meta device, the quantized modules replace the linears and experts, and
`official_checkpoint.load_fp8_checkpoint` streams the folder (the FP8 release or a BF16/FP32 checkpoint in the
official layout) one shard at a time, each weight dequantized (FP8) and rounded to `dtype` on its target device,
then quantized there. The host never holds more than one tensor beyond the shard being read.

Shape suffixes as in modeling_deepseek_v3.py: T tokens, D hidden, I expert width, E experts, K experts per token.

bitsandbytes is imported lazily (inside try blocks) so that the modeling file, which imports this module only on
a quantized load, still works as Hub remote code where bitsandbytes is not installed.
"""

import torch
from torch import nn
from transformers.activations import ACT2FN


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as error:
        raise ImportError(
            "quantization_config=BitsAndBytesConfig(...) needs bitsandbytes: pip install bitsandbytes"
        ) from error
    return bitsandbytes


def bitsandbytes_config(quantization_config):
    """`quantization_config` (a `BitsAndBytesConfig`, or its dict form) as a `BitsAndBytesConfig` when it asks for
    bitsandbytes 4-bit or 8-bit quantization, else None. Does not import bitsandbytes."""
    from transformers import BitsAndBytesConfig

    if isinstance(quantization_config, BitsAndBytesConfig):
        return quantization_config
    if isinstance(quantization_config, dict) and (
        quantization_config.get("quant_method") == "bitsandbytes"
        or quantization_config.get("load_in_4bit")
        or quantization_config.get("load_in_8bit")
    ):
        return BitsAndBytesConfig.from_dict(dict(quantization_config))
    return None


def quantized_linear(in_features: int, out_features: int, bias: bool, quantization_config) -> nn.Module:
    """An empty `bnb.nn.Linear4bit` or `bnb.nn.Linear8bitLt` set up by `quantization_config` (build it on the meta
    device; `quantize_weight` fills it)."""
    bnb = _bitsandbytes()
    qc = quantization_config
    if qc.load_in_4bit:
        return bnb.nn.Linear4bit(
            in_features, out_features, bias=bias, compute_dtype=qc.bnb_4bit_compute_dtype,
            compress_statistics=qc.bnb_4bit_use_double_quant, quant_type=qc.bnb_4bit_quant_type,
            quant_storage=qc.bnb_4bit_quant_storage,
        )
    return bnb.nn.Linear8bitLt(
        in_features, out_features, bias=bias, has_fp16_weights=qc.llm_int8_has_fp16_weight,
        threshold=qc.llm_int8_threshold,
    )


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether `module` is a bitsandbytes 4-bit or 8-bit linear (False without bitsandbytes installed)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def quantize_weight(module: nn.Module, value: torch.Tensor, device) -> None:
    """Quantize `value` [out, in] (high precision) into the bitsandbytes linear `module`, on `device`.

    bitsandbytes quantizes when a parameter moves to a device: the high-precision copy lives only until then."""
    bnb = _bitsandbytes()
    old = module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        new = bnb.nn.Params4bit(
            value, requires_grad=False, blocksize=old.blocksize, compress_statistics=old.compress_statistics,
            quant_type=old.quant_type, quant_storage=old.quant_storage, module=module,
        )
    else:
        # Int8Params quantizes only on a move from the host: one tensor's round trip when `value` is on a GPU.
        new = bnb.nn.Int8Params(value.cpu(), requires_grad=False, has_fp16_weights=old.has_fp16_weights)
    module.weight = new.to(device)


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The weight [out, in] of a bitsandbytes linear (or a plain `nn.Linear`), dequantized."""
    bnb = _bitsandbytes()
    weight = module.weight
    if isinstance(weight, bnb.nn.Params4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    if isinstance(weight, bnb.nn.Int8Params) and getattr(weight, "SCB", None) is not None:
        return bnb.functional.int8_vectorwise_dequant(weight.data, weight.SCB)
    return weight.detach()


def expert_loop(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor, num_experts: int,
                expert_fn) -> torch.Tensor:
    """`sum_k w_k * expert_{idx_k}(x)` for every token, calling `expert_fn(e, x_nD) -> y_nD` once per expert that
    received tokens, on those tokens only. Returns float32 [T, D] (combined in float32, as the fused experts do).

    Memory is O(routed tokens): nothing of the size of all experts' weights is created. One host sync on the
    per-expert counts (the eager reference path of `DeepseekV3Experts` accepts the same)."""
    T, K = topk_idx_TK.shape
    out_TD = torch.zeros(T, x_TD.shape[-1], dtype=torch.float32, device=x_TD.device)
    flat_expert = topk_idx_TK.reshape(-1)
    order = torch.argsort(flat_expert, stable=True)
    counts = torch.bincount(flat_expert, minlength=num_experts).tolist()
    flat_weight = topk_weight_TK.reshape(-1)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        slot = order[start : start + count]
        start += count
        token = slot // K
        y_nD = expert_fn(expert, x_TD[token])
        out_TD.index_add_(0, token, y_nD.float() * flat_weight[slot, None])
    return out_TD


class DeepseekV3QuantizedExperts(nn.Module):
    """The routed experts of one MoE layer with bitsandbytes-quantized weights: `gate_up[e]` ([2I, D], gate rows
    first) and `down[e]` ([D, I]) are `bnb.nn.Linear4bit` or `bnb.nn.Linear8bitLt`. Same forward contract as
    `DeepseekV3Experts`; each expert runs on its routed tokens only (dequantizing one expert at a time).

    The module names (`gate_up`, `down`) do not end in `_proj`, so PEFT targets such as `"down_proj"` keep meaning
    the dense and shared-expert MLPs; LoRA on the routed experts targets `"experts"` (peft_experts.py), on this
    module and on the bf16 one alike, so adapters move between the two.
    """

    def __init__(self, config, quantization_config):
        super().__init__()
        self.config = config
        self.num_experts = config.n_routed_experts
        D, I = config.hidden_size, config.moe_intermediate_size
        self.gate_up = nn.ModuleList(quantized_linear(D, 2 * I, False, quantization_config) for _ in range(self.num_experts))
        self.down = nn.ModuleList(quantized_linear(I, D, False, quantization_config) for _ in range(self.num_experts))
        for linear in (*self.gate_up, *self.down):
            # bitsandbytes repacks a 4-bit weight into a CPU-only layout on its first CPU inference call (on
            # AVX512-BF16 hosts), after which `dequantize_4bit` of the weight, and so a LoRA merge, reads garbage.
            if hasattr(linear, "support_avx512bf16_for_cpu"):
                linear.support_avx512bf16_for_cpu = False
        self.act_fn = ACT2FN[config.hidden_act]

    def expert_gate_up(self, expert: int, x_nD: torch.Tensor) -> torch.Tensor:
        return self.gate_up[expert](x_nD)

    def expert_down(self, expert: int, h_nI: torch.Tensor) -> torch.Tensor:
        return self.down[expert](h_nI)

    def forward(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor) -> torch.Tensor:
        """x_TD [T, D], topk_idx_TK [T, K], topk_weight_TK [T, K] float32 -> float32 [T, D]."""

        def expert(e, x_nD):
            gate, up = self.gate_up[e](x_nD).chunk(2, dim=-1)
            return self.down[e](self.act_fn(gate) * up)

        return expert_loop(x_TD, topk_idx_TK, topk_weight_TK, self.num_experts, expert)


def _matches(name: str, patterns) -> bool:
    return any(name == p or name.endswith("." + p) or name.startswith(p + ".") for p in patterns)


class BitsAndBytesQuantizer:
    """What `load_fp8_checkpoint(..., quantizer=...)` needs to load a checkpoint straight into bitsandbytes modules:
    `prepare` swaps the modules of the meta model, `place` quantizes each weight as it is read, `finish` checks
    that every expert is complete and marks the model as transformers marks its bitsandbytes models."""

    def __init__(self, quantization_config):
        self.config = quantization_config
        if quantization_config.load_in_4bit == quantization_config.load_in_8bit:
            raise ValueError("quantization_config: expected exactly one of load_in_4bit and load_in_8bit")
        skip = quantization_config.llm_int8_skip_modules
        self.skip_modules = list(skip) if skip is not None else ["lm_head"]
        self._pending = {}  # (fused parameter name, expert) -> {half: tensor}: gate/up halves waiting for the other

    def prepare(self, model: nn.Module) -> None:
        """Replace, on a meta-device model, every `nn.Linear` and `DeepseekV3Experts` not skipped by quantized
        modules."""
        from .modeling_deepseek_v3 import DeepseekV3Experts

        for name, module in list(model.named_modules()):
            if not name or _matches(name, self.skip_modules):
                continue
            if type(module) is nn.Linear:
                with torch.device("meta"):
                    new = quantized_linear(module.in_features, module.out_features, module.bias is not None, self.config)
            elif isinstance(module, DeepseekV3Experts):
                with torch.device("meta"):
                    new = DeepseekV3QuantizedExperts(module.config, self.config)
            else:
                continue
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, new)

    def place(self, model: nn.Module, param_name: str, expert, half, read, device) -> bool:
        """Quantize the checkpoint tensor for `param_name` (in-memory name; `expert`/`half` from
        `official_key_to_parameter`) on `device` if it belongs to a quantized module; `read()` returns the tensor
        (high precision, on `device`). Returns False for tensors the caller places itself."""
        module_name, _, leaf = param_name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            return False
        if isinstance(module, DeepseekV3QuantizedExperts):
            self._place_expert(module, param_name, leaf, expert, half, read(), device)
            return True
        if leaf == "weight" and is_quantized_linear(module):
            quantize_weight(module, read(), device)
            return True
        return False

    def _place_expert(self, module, param_name, leaf, expert, half, value, device):
        if expert is None:  # a fused [E, ...] tensor (a checkpoint saved from the fused parameters)
            for e in range(module.num_experts):
                target = module.gate_up[e] if leaf == "gate_up_proj" else module.down[e]
                quantize_weight(target, value[e], device)
            return
        if half is None:
            quantize_weight(module.down[expert], value, device)
            return
        halves = self._pending.setdefault((param_name, expert), {})
        halves[half] = value
        if len(halves) == 2:
            del self._pending[(param_name, expert)]
            quantize_weight(module.gate_up[expert], torch.cat([halves[0], halves[1]]), device)

    def finish(self, model: nn.Module, folder) -> None:
        """Check completeness; set `is_loaded_in_4bit`/`is_loaded_in_8bit`, `hf_quantizer` and
        `config.quantization_config` (PEFT's `prepare_model_for_kbit_training` and the Trainer read those)."""
        from transformers.quantizers import AutoHfQuantizer

        from .official_checkpoint import CheckpointError

        if self._pending:
            (name, expert), halves = next(iter(self._pending.items()))
            missing = "up_proj" if 0 in halves else "gate_proj"
            raise CheckpointError(f"{folder}: {name.rsplit('.', 1)[0]}.{expert}.{missing}.weight is missing "
                                  f"({len(self._pending)} expert halves in all)")
        model.is_loaded_in_4bit = bool(self.config.load_in_4bit)
        model.is_loaded_in_8bit = bool(self.config.load_in_8bit)
        model.config.quantization_config = self.config
        model.hf_quantizer = AutoHfQuantizer.from_config(self.config, pre_quantized=False)


def is_bitsandbytes_model(model: nn.Module) -> bool:
    """Whether `model` holds bitsandbytes-quantized weights (loaded with a `BitsAndBytesConfig`)."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def expected_4bit_footprint(model: nn.Module) -> int:
    """Bytes of `model` if its quantized linears and experts took half a byte per weight and everything else kept
    its dtype (what `get_memory_footprint()` should report for a 4-bit model; the per-block scales are extra)."""
    total = 0
    quantized = set()
    for module in model.modules():
        if is_quantized_linear(module):
            quantized.add(id(module.weight))
            total += module.in_features * module.out_features // 2
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in quantized:
            total += tensor.numel() * tensor.element_size()
    return total


__all__ = [
    "BitsAndBytesQuantizer",
    "DeepseekV3QuantizedExperts",
    "bitsandbytes_config",
    "dequantized_weight",
    "expected_4bit_footprint",
    "expert_loop",
    "is_bitsandbytes_model",
    "is_quantized_linear",
    "quantize_weight",
    "quantized_linear",
]
