"""bitsandbytes 4-bit (NF4/FP4) and 8-bit (LLM.int8) quantization of DeepSeek-V3, the routed experts included.

transformers' bitsandbytes integration replaces every `nn.Linear` and leaves the fused routed experts
(`gate_up_proj` [E, 2I, D], `down_proj` [E, D, I]: parameters, not linears, 97% of the weights of the 671B model)
in bf16. Here the whole layer is quantized:

- every `nn.Linear` (MLA projections, dense MLPs, shared experts, MTP `eh_proj`) becomes `bnb.nn.Linear4bit` /
  `bnb.nn.Linear8bitLt`, as transformers does;
- `DeepseekV3Experts` becomes `DeepseekV3QuantizedExperts`: per expert one quantized `[2I, D]` gate/up matrix
  (gate rows first, as in the fused tensor) and one `[D, I]` down matrix, run on the tokens routed to that expert
  only (`expert_loop`, the reference), or, for 4-bit weights, with grouped GEMMs over a chunk of experts
  dequantized at a time (`Stacked4bitExperts`, `moe_implementation="grouped_mm"`);
- the router (`gate`, not a linear), the norms, the embedding and `lm_head` stay in high precision, and so does
  any module named in `BitsAndBytesConfig.llm_int8_skip_modules` (module names, dotted suffixes or prefixes:
  `["lm_head", "experts"]` keeps the routed experts in bf16).

`DeepseekV3PreTrainedModel.from_pretrained(path, quantization_config=BitsAndBytesConfig(...))` routes here: the
model is built on the meta device, the quantized modules replace the linears and experts, and
`official_checkpoint.load_fp8_checkpoint` streams the folder (the FP8 release or a BF16/FP32 checkpoint in the
official layout) one shard at a time, each weight dequantized (FP8) and rounded to `dtype` on its target device,
then quantized there. The host never holds more than one tensor beyond the shard being read.

Shape suffixes as in modeling_deepseek_v3.py: T tokens, D hidden, I expert width, E experts, K experts per token;
P = T * K (token, expert) pairs sorted by expert, O/X a projection's output/input width.

bitsandbytes is imported lazily (inside try blocks) so that the modeling file, which imports this module only on
a quantized load, still works as Hub remote code where bitsandbytes is not installed.
"""

import math

import torch
from torch import nn
from transformers.activations import ACT2FN

from .modeling_deepseek_v3 import DeepseekV3Experts, _grouped_mm, combine_sorted_outputs, expert_loop, sort_by_expert


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


class Stacked4bitExperts:
    """One projection's 4-bit weights of all E experts (`bnb.nn.Linear4bit` modules of equal shape [O, X]) held in
    stacked buffers, so that experts `start:stop` are one contiguous slice: packed data [E, O*X/2], absmax
    [E, blocks] (uint8 under double quantization, with its float32 second-level absmax [E, blocks2] and offset [E]),
    dequantized with one bitsandbytes call per slice.

    Built once from the modules, whose `weight.data` and quant-state tensors are then re-pointed to views of the
    buffers expert by expert: no second copy is kept, but building holds the projection's packed bytes twice for a
    moment (the 671B gate/up: 3.8 GB). The modules keep their names and values; `is_current` tells when one of them
    was given a new weight (a merge requantizes, a device move copies) and the stack must be rebuilt."""

    def __init__(self, linears):
        first = linears[0].weight
        state = first.quant_state
        self.num_experts = len(linears)
        self.shape = tuple(state.shape)  # (O, X)
        self.blocksize, self.quant_type, self.nested = state.blocksize, state.quant_type, state.nested
        with torch.no_grad():
            self.data = first.data.new_empty(self.num_experts, first.data.numel())
            self.absmax = state.absmax.new_empty(self.num_experts, state.absmax.numel())
            if self.nested:
                self.absmax2 = state.state2.absmax.new_empty(self.num_experts, state.state2.absmax.numel())
                self.offset = state.offset.new_empty(self.num_experts)
                self.code2, self.blocksize2 = state.state2.code, state.state2.blocksize
            for e, linear in enumerate(linears):
                weight, expert_state = linear.weight, linear.weight.quant_state
                found = (tuple(expert_state.shape), expert_state.blocksize, expert_state.quant_type,
                         expert_state.nested, weight.data.numel(), expert_state.absmax.numel())
                expected = (self.shape, self.blocksize, self.quant_type, self.nested, self.data.shape[1],
                            self.absmax.shape[1])
                if found != expected:
                    raise ValueError(f"Stacked4bitExperts: expert {e} has (shape, blocksize, quant_type, nested, "
                                     f"packed bytes, blocks) = {found}, expected {expected} as expert 0")
                self.data[e].copy_(weight.data.reshape(-1))
                weight.data = self.data[e].view_as(weight.data)
                self.absmax[e].copy_(expert_state.absmax)
                expert_state.absmax = self.absmax[e]
                if self.nested:
                    self.absmax2[e].copy_(expert_state.state2.absmax)
                    expert_state.state2.absmax = self.absmax2[e]
                    self.offset[e].copy_(expert_state.offset)
                    expert_state.offset = self.offset[e]
        self.pointers = [linear.weight.data_ptr() for linear in linears]

    def is_current(self, linears) -> bool:
        return [linear.weight.data_ptr() for linear in linears] == self.pointers

    def dequantize(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Experts `start:stop` as one [stop - start, O, X] tensor of `dtype` (the values `dequantize_4bit` gives
        each expert)."""
        bnb = _bitsandbytes()
        n = stop - start
        absmax = self.absmax[start:stop]
        if self.nested:
            if absmax.shape[1] % self.blocksize2 == 0:  # second-level blocks never straddle two experts
                state2 = bnb.functional.QuantState(absmax=self.absmax2[start:stop].reshape(-1), code=self.code2,
                                                   blocksize=self.blocksize2, dtype=torch.float32)
                absmax = bnb.functional.dequantize_blockwise(absmax.reshape(-1), state2).view(n, -1)
            else:
                absmax = torch.stack([
                    bnb.functional.dequantize_blockwise(absmax[i], bnb.functional.QuantState(
                        absmax=self.absmax2[start + i], code=self.code2, blocksize=self.blocksize2,
                        dtype=torch.float32))
                    for i in range(n)
                ])
            absmax = absmax + self.offset[start:stop, None]  # float32, as dequantize_4bit adds it
        O, X = self.shape
        state = bnb.functional.QuantState(absmax=absmax.reshape(-1), shape=(n * O, X), blocksize=self.blocksize,
                                          quant_type=self.quant_type, dtype=dtype)
        return bnb.functional.dequantize_4bit(self.data[start:stop].reshape(-1, 1), state).view(n, O, X)

    def grouped_mm(self, x_PX: torch.Tensor, offsets_E: torch.Tensor, chunks, dtype: torch.dtype,
                   transposed: bool) -> torch.Tensor:
        """Rows of `x_PX` sorted by expert (group ends `offsets_E`, int32) times their expert's weight: `x @ W_e^T`
        ([P, X] -> [P, O]) if `transposed`, else `x @ W_e` ([P, O] -> [P, X], the input gradient). `chunks`:
        None (all experts at once) or (first expert, end expert, first row, end row) tuples covering all rows."""

        def multiply(x, start, stop, offsets):
            w = self.dequantize(start, stop, dtype)
            return _grouped_mm(x, w.transpose(1, 2) if transposed else w, offs=offsets)

        if chunks is None:
            return multiply(x_PX, 0, self.num_experts, offsets_E)
        out = x_PX.new_empty(x_PX.shape[0], self.shape[0] if transposed else self.shape[1])
        for start, stop, row_start, row_stop in chunks:
            if row_stop > row_start:
                rows = slice(row_start, row_stop)
                out[rows] = multiply(x_PX[rows], start, stop, offsets_E[start:stop] - row_start)
        return out


class _Frozen4bitGroupedMM(torch.autograd.Function):
    """`Stacked4bitExperts.grouped_mm` with autograd for the input only (the 4-bit weights are frozen). Backward
    dequantizes the chunks again rather than keeping them: saved state is the group offsets, not [E, O, X]."""

    @staticmethod
    def forward(ctx, x_PX, offsets_E, stacked, chunks, dtype):
        ctx.save_for_backward(offsets_E)
        ctx.stacked, ctx.chunks, ctx.dtype = stacked, chunks, dtype
        return stacked.grouped_mm(x_PX, offsets_E, chunks, dtype, transposed=True)

    @staticmethod
    def backward(ctx, grad_PO):
        (offsets_E,) = ctx.saved_tensors
        grad_PX = None
        if ctx.needs_input_grad[0]:
            grad_PX = ctx.stacked.grouped_mm(grad_PO.to(ctx.dtype).contiguous(), offsets_E, ctx.chunks, ctx.dtype,
                                             transposed=False)
        return grad_PX, None, None, None, None


class DeepseekV3QuantizedExperts(nn.Module):
    """The routed experts of one MoE layer with bitsandbytes-quantized weights: `gate_up[e]` ([2I, D], gate rows
    first) and `down[e]` ([D, I]) are `bnb.nn.Linear4bit` or `bnb.nn.Linear8bitLt`. Same forward contract as
    `DeepseekV3Experts`.

    `config.moe_implementation` picks the compute, as for the fused experts:
    - "eager" (the reference, and always for 8-bit weights): each expert runs on its routed tokens, through its
      bitsandbytes linears (one dequantization, GEMM and indexing per expert: launch-bound in training);
    - "grouped_mm" (4-bit only): tokens sorted by expert; per projection, a chunk of experts is dequantized with one
      bitsandbytes call (`Stacked4bitExperts`) and multiplied with one grouped GEMM. The chunk's dequantized
      weights, at most `dequantize_chunk_bytes` (1 GiB by default; at least one expert), are the only weight-sized
      temporaries: the 671B model's [256, 4096, 7168] gate/up stack is never materialized. Backward dequantizes
      again instead of saving them. More than one chunk costs one host sync per forward (the group row bounds).
    - "auto": grouped_mm for 4-bit weights on CUDA when computing in bf16 with more (token, expert) pairs than
      experts; eager otherwise (decode-sized batches dequantize only the chosen experts).

    The module names (`gate_up`, `down`) do not end in `_proj`, so PEFT targets such as `"down_proj"` keep meaning
    the dense and shared-expert MLPs; LoRA on the routed experts targets `"experts"` (peft_experts.py), on this
    module and on the bf16 one alike, so adapters move between the two.
    """

    dequantize_chunk_bytes = 1 << 30

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
        self._stacked = {}  # "gate_up" / "down" -> Stacked4bitExperts, built on the first grouped_mm forward

    def expert_gate_up(self, expert: int, x_nD: torch.Tensor) -> torch.Tensor:
        return self.gate_up[expert](x_nD)

    def expert_down(self, expert: int, h_nI: torch.Tensor) -> torch.Tensor:
        return self.down[expert](h_nI)

    def forward(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor) -> torch.Tensor:
        """x_TD [T, D], topk_idx_TK [T, K], topk_weight_TK [T, K] float32 -> float32 [T, D]."""
        if self.use_grouped_mm(x_TD, topk_idx_TK):
            return self.forward_grouped_mm(x_TD, topk_idx_TK, topk_weight_TK)

        def expert(e, x_nD):
            gate, up = self.gate_up[e](x_nD).chunk(2, dim=-1)
            return self.down[e](self.act_fn(gate) * up)

        return expert_loop(x_TD, topk_idx_TK, topk_weight_TK, self.num_experts, expert)

    def is_4bit(self) -> bool:
        return isinstance(self.gate_up[0], _bitsandbytes().nn.Linear4bit)

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the 4-bit linears multiply in for input `x`: autocast's, else their `compute_dtype`."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return self.gate_up[0].compute_dtype or x.dtype

    def use_grouped_mm(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor) -> bool:
        """Whether `moe_implementation` (see the class docstring) picks the grouped path for this input."""
        implementation = self.config.moe_implementation
        if not self.is_4bit() or implementation not in ("auto", "grouped_mm"):
            return False
        if _grouped_mm is None:
            if implementation == "auto":
                return False
            raise RuntimeError(f"moe_implementation='grouped_mm' needs torch.nn.functional.grouped_mm (torch >= "
                               f"2.8); this is torch {torch.__version__}")
        if implementation == "grouped_mm":
            return True
        return (x_TD.is_cuda and self.compute_dtype(x_TD) == torch.bfloat16
                and topk_idx_TK.numel() > self.num_experts)

    def unstack(self) -> None:
        """Drop the stacked buffers (rebuilt on the next grouped forward): call after giving experts new weights,
        so that the old buffers are freed once no expert views them."""
        self._stacked.clear()

    def _apply(self, fn, recurse=True):
        self.unstack()  # a device move gives every expert a new weight
        return super()._apply(fn, recurse)

    def stacked(self, which: str) -> Stacked4bitExperts:
        """The `Stacked4bitExperts` of "gate_up" or "down", (re)built when missing or stale."""
        linears = self.gate_up if which == "gate_up" else self.down
        stacked = self._stacked.get(which)
        if stacked is None or not stacked.is_current(linears):
            self._stacked.pop(which, None)
            stacked = self._stacked[which] = Stacked4bitExperts(linears)
        return stacked

    def forward_grouped_mm(self, x_TD, topk_idx_TK, topk_weight_TK, gate_up_delta=None, down_delta=None):
        """The grouped path of `forward`. `gate_up_delta(x_PD, offsets_E)` -> [P, 2I] and `down_delta(h_PI,
        offsets_E)` -> [P, D], if given, are added to the projections of the sorted rows (LoRA, peft_experts.py);
        `offsets_E` holds the int32 group ends of the P rows sorted by expert."""
        order_P, token_P, offsets_E = sort_by_expert(topk_idx_TK, self.num_experts)
        dtype = self.compute_dtype(x_TD)
        gate_up, down = self.stacked("gate_up"), self.stacked("down")
        per_chunk = [max(1, self.dequantize_chunk_bytes // (math.prod(w.shape) * dtype.itemsize)) for w in (gate_up, down)]
        ends = offsets_E.tolist() if min(per_chunk) < self.num_experts else None  # host sync: chunk row bounds
        gate_up_chunks, down_chunks = (self._chunks(n, ends) for n in per_chunk)

        x_PD = x_TD[token_P].to(dtype)
        gate_up_P2I = _Frozen4bitGroupedMM.apply(x_PD, offsets_E, gate_up, gate_up_chunks, dtype)
        if gate_up_delta is not None:
            gate_up_P2I = gate_up_P2I + gate_up_delta(x_PD, offsets_E).to(dtype)
        gate_PI, up_PI = gate_up_P2I.chunk(2, dim=-1)
        h_PI = self.act_fn(gate_PI) * up_PI
        y_PD = _Frozen4bitGroupedMM.apply(h_PI, offsets_E, down, down_chunks, dtype)
        if down_delta is not None:
            y_PD = y_PD + down_delta(h_PI, offsets_E).to(dtype)
        return combine_sorted_outputs(self, y_PD, order_P, token_P, topk_weight_TK)

    def _chunks(self, per_chunk: int, ends: list | None):
        if per_chunk >= self.num_experts:
            return None
        bounds = [(start, min(start + per_chunk, self.num_experts)) for start in range(0, self.num_experts, per_chunk)]
        return [(start, stop, ends[start - 1] if start else 0, ends[stop - 1]) for start, stop in bounds]


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
    "Stacked4bitExperts",
    "bitsandbytes_config",
    "dequantized_weight",
    "expected_4bit_footprint",
    "is_bitsandbytes_model",
    "is_quantized_linear",
    "quantize_weight",
    "quantized_linear",
]
