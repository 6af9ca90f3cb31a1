"""PEFT LoRA for DeepSeek-V3, the routed experts included: per-expert adapters applied only to routed tokens.

PEFT's own way to adapt fused expert tensors (`LoraConfig(target_parameters=["mlp.experts.gate_up_proj", ...])`)
adds `B @ A` to the whole `[E, 2I, D]` stack at every forward and keeps that merged copy for backward: a layer's
full expert weights per MoE layer, whatever the batch. `LoraExperts` instead gives every expert its own low-rank
pair and runs it inside the expert loop on that expert's tokens only:

    gate_up_e(x) = W_gate_up[e] x + s * B_gate_up[e] (A_gate_up[e] x)       for the tokens routed to e
    down_e(h)    = W_down[e] h    + s * B_down[e] (A_down[e] h)

so activation memory is O(routed tokens x (D + 3I + 2r)) and no [E, ...] weight-sized tensor is created. It wraps
`DeepseekV3Experts` (bf16/fp32 fused weights) and `DeepseekV3QuantizedExperts` (bitsandbytes 4-bit/8-bit: QLoRA)
alike, with the same parameter names, so an adapter trained on the 4-bit model loads onto the bf16 one.

PEFT integration is its custom-module extension point (`LoraConfig._register_custom_module`); that registration is
not saved in `adapter_config.json`, hence the helpers:

    from modeling_deepseek_v3.peft_experts import lora_config, load_lora_adapter
    model = get_peft_model(model, lora_config("all", r=16))    # attention + dense/shared MLPs + routed experts
    model.save_pretrained("adapter")
    model = load_lora_adapter(base_model, "adapter")            # PeftModel.from_pretrained with the registration
    merged = model.merge_and_unload()                           # fused weights updated in place; saves per expert

Shape suffixes: T tokens, D hidden, I expert width, E experts, K experts per token, r LoRA rank, n tokens of one
expert.
"""

import functools
import math

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from .modeling_deepseek_v3 import DeepseekV3Experts, DeepseekV3PreTrainedModel, _grouped_mm, expert_loop
from .quantization import DeepseekV3QuantizedExperts, dequantized_weight, quantize_weight

ATTENTION_TARGETS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")  # dense layers and shared experts (not the routed experts)
EXPERT_TARGETS = ("experts",)  # the routed experts of every MoE layer: LoraExperts
TARGET_PRESETS = {
    "attention": ATTENTION_TARGETS,
    "attention+mlp": ATTENTION_TARGETS + MLP_TARGETS,
    "all": ATTENTION_TARGETS + MLP_TARGETS + EXPERT_TARGETS,
}


class LoraExperts(nn.Module, LoraLayer):
    """LoRA on the routed experts of one MoE layer: per adapter, per expert, a rank-r pair on the fused gate/up
    projection (`lora_gate_up_A` [E, r, D], `lora_gate_up_B` [E, 2I, r]) and on the down projection
    (`lora_down_A` [E, r, I], `lora_down_B` [E, D, r]), applied to the tokens routed to each expert only.

    Same forward contract as the wrapped experts: (x_TD [T, D], topk_idx_TK [T, K], topk_weight_TK [T, K]) ->
    float32 [T, D]. With B = 0 (the default initialization) it returns exactly what the eager loop of the base
    experts returns. Adapters are float32 (PEFT's default); inputs are cast to their dtype and the update back to
    the base output's dtype. Merging adds `s * B[e] @ A[e]` into each expert's weight, one expert at a time
    (bitsandbytes weights are dequantized, updated and requantized). DoRA and other variants are not supported.

    Where 4-bit experts take their grouped path (`DeepseekV3QuantizedExperts`, `moe_implementation`), the adapters
    run there too, as grouped GEMMs on the same expert-sorted rows; elsewhere inside the eager loop.
    """

    adapter_layer_names = ("lora_gate_up_A", "lora_gate_up_B", "lora_down_A", "lora_down_B")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 8,
                 lora_alpha: int = 8, **kwargs):
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self.lora_gate_up_A = nn.ParameterDict()
        self.lora_gate_up_B = nn.ParameterDict()
        self.lora_down_A = nn.ParameterDict()
        self.lora_down_B = nn.ParameterDict()
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module):
        return module.config.hidden_size, module.config.hidden_size

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs) -> None:
        if r <= 0:
            raise ValueError(f"LoraExperts: `r` should be a positive integer, found {r}")
        if config.use_dora or config.lora_bias:
            raise ValueError("LoraExperts: DoRA and lora_bias are not supported on the routed experts")
        base = self.get_base_layer()
        E, D, I = base.num_experts, base.config.hidden_size, base.config.moe_intermediate_size
        device = next(base.parameters()).device
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if config.use_rslora else lora_alpha / r
        self.use_rslora[adapter_name] = config.use_rslora
        self.use_dora[adapter_name] = False
        self.lora_bias[adapter_name] = False
        dropout = nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_dropout.update(nn.ModuleDict({adapter_name: dropout}))

        def new(*shape):
            return nn.Parameter(torch.empty(*shape, dtype=torch.float32, device=device))

        self.lora_gate_up_A[adapter_name] = new(E, r, D)
        self.lora_gate_up_B[adapter_name] = new(E, 2 * I, r)
        self.lora_down_A[adapter_name] = new(E, r, I)
        self.lora_down_B[adapter_name] = new(E, D, r)
        self.reset_expert_lora_parameters(adapter_name, config.init_lora_weights)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @torch.no_grad()
    def reset_expert_lora_parameters(self, adapter_name: str, init_lora_weights) -> None:
        """A: Kaiming-uniform per expert (as PEFT initializes `lora_A`), or normal(0, 1/r) for "gaussian"; B: zeros,
        so that a new adapter starts as the identity. `init_lora_weights=False` draws B like A (tests)."""
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"LoraExperts: init_lora_weights={init_lora_weights!r} is not supported "
                             f"(expected True, False or 'gaussian')")
        r = self.r[adapter_name]
        for name in ("lora_gate_up_A", "lora_down_A", "lora_gate_up_B", "lora_down_B"):
            weight = getattr(self, name)[adapter_name]
            if name.endswith("_B") and init_lora_weights is not False:
                weight.zero_()
                continue
            for expert_weight in weight:
                if init_lora_weights == "gaussian":
                    nn.init.normal_(expert_weight, std=1 / r)
                else:
                    nn.init.kaiming_uniform_(expert_weight, a=math.sqrt(5))

    def _active_lora(self) -> list:
        return [a for a in self.active_adapters if a in self.lora_gate_up_A]

    def forward(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor, *args, **kwargs):
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("LoraExperts: mixed adapter batches (adapter_names=...) are not supported")
        base = self.base_layer
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x_TD, topk_idx_TK, topk_weight_TK)
        active = self._active_lora()
        if self.merged or not active:
            return base(x_TD, topk_idx_TK, topk_weight_TK)
        if isinstance(base, DeepseekV3QuantizedExperts) and base.use_grouped_mm(x_TD, topk_idx_TK):
            return base.forward_grouped_mm(
                x_TD, topk_idx_TK, topk_weight_TK,
                gate_up_delta=functools.partial(self._grouped_lora, active, "lora_gate_up_A", "lora_gate_up_B"),
                down_delta=functools.partial(self._grouped_lora, active, "lora_down_A", "lora_down_B"))
        gate_up_proj, down_proj = _expert_projections(base)
        # unbind, not A[e]: the backward of one unbind stacks the experts' gradients once, where E separate index
        # operations would each materialize a zero gradient of the whole [E, r, D] parameter.
        factors = {
            a: [getattr(self, name)[a].unbind(0) for name in self.adapter_layer_names] for a in active
        }

        def lora(y_nO, x_nX, a, e, A_index):
            A = factors[a][A_index][e]
            B = factors[a][A_index + 1][e]
            x_nX = self.lora_dropout[a](x_nX.to(A.dtype))
            return y_nO + (F.linear(F.linear(x_nX, A), B) * self.scaling[a]).to(y_nO.dtype)

        def expert(e, x_nD):
            gate_up_n2i = gate_up_proj(e, x_nD)
            for a in active:
                gate_up_n2i = lora(gate_up_n2i, x_nD, a, e, 0)
            gate_nI, up_nI = gate_up_n2i.chunk(2, dim=-1)
            h_nI = base.act_fn(gate_nI) * up_nI
            y_nD = down_proj(e, h_nI)
            for a in active:
                y_nD = lora(y_nD, h_nI, a, e, 2)
            return y_nD

        return expert_loop(x_TD, topk_idx_TK, topk_weight_TK, base.num_experts, expert)

    def _grouped_lora(self, active, A_name, B_name, x_PX, offsets_E):
        # The eager loop's `s * B[e] (A[e] x)` for rows sorted by expert, as two grouped GEMMs in x's dtype (bf16
        # under autocast, as F.linear would compute); gradients reach A and B through the casts.
        delta_PO = None
        for a in active:
            A_ErX = getattr(self, A_name)[a].to(x_PX.dtype)
            B_EOr = getattr(self, B_name)[a].to(x_PX.dtype)
            # The grouped GEMM needs 16-byte aligned strides: zero rows of A / columns of B pad r (r=4 in bf16).
            pad = -A_ErX.shape[1] % (16 // x_PX.dtype.itemsize)
            if pad:
                A_ErX, B_EOr = F.pad(A_ErX, (0, 0, 0, pad)), F.pad(B_EOr, (0, pad))
            low_Pr = _grouped_mm(self.lora_dropout[a](x_PX), A_ErX.transpose(1, 2), offs=offsets_E)
            term_PO = _grouped_mm(low_Pr, B_EOr.transpose(1, 2), offs=offsets_E) * self.scaling[a]
            delta_PO = term_PO if delta_PO is None else delta_PO + term_PO
        return delta_PO

    def get_delta_weight(self, adapter: str, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`s * B @ A` of `adapter` for one expert: (gate_up [2I, D], down [D, I]), float32."""
        s = self.scaling[adapter]
        gate_up = s * self.lora_gate_up_B[adapter][expert] @ self.lora_gate_up_A[adapter][expert]
        down = s * self.lora_down_B[adapter][expert] @ self.lora_down_A[adapter][expert]
        return gate_up, down

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list | None = None) -> None:
        """Add the adapters' updates into the base experts' weights, one expert at a time. `safe_merge` checks
        the merged weights for NaN/inf before writing them."""
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter in self.lora_gate_up_A:
                self._add_to_base(adapter, sign=1.0, safe=safe_merge)
                self.merged_adapters.append(adapter)

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lora_gate_up_A:
                self._add_to_base(adapter, sign=-1.0, safe=False)

    def _add_to_base(self, adapter: str, sign: float, safe: bool) -> None:
        base = self.get_base_layer()
        for e in range(base.num_experts):
            for which, delta in zip(("gate_up", "down"), self.get_delta_weight(adapter, e)):
                _add_expert_delta(base, which, e, sign * delta, safe, adapter)
        if isinstance(base, DeepseekV3QuantizedExperts):
            base.unstack()  # every expert was requantized: the grouped path's old buffers are free


def _expert_projections(base):
    """(gate_up(e, x_nD) -> [n, 2I], down(e, h_nI) -> [n, D]) for fused or quantized experts."""
    if isinstance(base, DeepseekV3QuantizedExperts):
        return base.expert_gate_up, base.expert_down
    return (lambda e, x: F.linear(x, base.gate_up_proj[e])), (lambda e, h: F.linear(h, base.down_proj[e]))


def _add_expert_delta(base, which: str, expert: int, delta: torch.Tensor, safe: bool, adapter: str) -> None:
    if isinstance(base, DeepseekV3QuantizedExperts):
        module = (base.gate_up if which == "gate_up" else base.down)[expert]
        weight = dequantized_weight(module)
        merged = weight.float() + delta.to(weight.device)
        _check_finite(merged, safe, adapter)
        quantize_weight(module, merged.to(weight.dtype), weight.device)
        return
    fused = base.gate_up_proj if which == "gate_up" else base.down_proj
    merged = fused.data[expert].float() + delta.to(fused.device)
    _check_finite(merged, safe, adapter)
    fused.data[expert] = merged.to(fused.dtype)


def _check_finite(weight, safe, adapter):
    if safe and not torch.isfinite(weight).all():
        raise ValueError(f"LoraExperts: merging adapter {adapter!r} gives NaN or inf in an expert weight")


def _keep_target_names_for_this_model() -> None:
    """PEFT (0.18+, under transformers 5) rewrites the `target_modules` of every `deepseek_v3` model before it
    injects or loads an adapter: `gate_proj`/`up_proj`/`down_proj`/`gate` are taken for transformers-4 expert
    linears and become `target_parameters` on the fused expert tensors (keyed by model_type, so it hits this
    package's model too). Here that would drop the dense and shared-expert MLPs from the targets and put
    merged-stack LoRA on the routed experts. The rewrite is skipped for models of this package only; every other
    model (the built-in DeepSeek-V3 included) keeps PEFT's behaviour. A no-op on PEFT versions without it.

    The same hook runs on every config PEFT injects into one of this package's models (`get_peft_model`,
    `PeftModel.from_pretrained`, `load_adapter`), so it also registers `LoraExperts` there (configs without
    `target_parameters`): once this module is imported, a plain `LoraConfig(target_modules=[..., "experts"])` and a
    plain `PeftModel.from_pretrained` work."""
    try:
        from peft.utils import transformers_weight_conversion as conversion
    except ImportError:
        return
    original = getattr(conversion, "convert_peft_config_for_transformers", None)
    if original is None or getattr(original, "keeps_deepseek_v3_targets", False):
        return

    @functools.wraps(original)
    def convert_peft_config_for_transformers(peft_config, *args, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        if isinstance(model, DeepseekV3PreTrainedModel):
            # Not with `target_parameters`: PEFT would dispatch those to the registered layer too.
            if isinstance(peft_config, LoraConfig) and not getattr(peft_config, "target_parameters", None):
                register_expert_lora(peft_config)
            return None
        return original(peft_config, *args, **kwargs)

    convert_peft_config_for_transformers.keeps_deepseek_v3_targets = True
    conversion.convert_peft_config_for_transformers = convert_peft_config_for_transformers


_keep_target_names_for_this_model()


def register_expert_lora(config: LoraConfig) -> LoraConfig:
    """Register `LoraExperts` for both experts modules on a `LoraConfig` (PEFT does not save this in
    `adapter_config.json`: call it on a config read back with `LoraConfig.from_pretrained` too). Returns `config`."""
    config._register_custom_module({DeepseekV3Experts: LoraExperts, DeepseekV3QuantizedExperts: LoraExperts})
    return config


def lora_config(preset: str = "all", r: int = 16, lora_alpha: int | None = None, lora_dropout: float = 0.0,
                **kwargs) -> LoraConfig:
    """A `LoraConfig` for a DeepSeek-V3 model with the expert LoRA registered.

    `preset` picks `target_modules` (`TARGET_PRESETS`): "attention" (the MLA projections `q_a_proj`, `q_b_proj`,
    `kv_a_proj_with_mqa`, `kv_b_proj`, `o_proj`, or `q_proj`), "attention+mlp" (plus `gate_proj`/`up_proj`/
    `down_proj` of the dense layers and shared experts), "all" (plus the routed experts: `LoraExperts`).
    `lora_alpha` defaults to 2r. Other keyword arguments go to `LoraConfig` (e.g. `target_modules` to override).
    """
    if preset not in TARGET_PRESETS:
        raise ValueError(f"lora_config: unknown preset {preset!r}, expected one of {sorted(TARGET_PRESETS)}")
    kwargs.setdefault("target_modules", list(TARGET_PRESETS[preset]))
    kwargs.setdefault("task_type", "CAUSAL_LM")
    config = LoraConfig(r=r, lora_alpha=2 * r if lora_alpha is None else lora_alpha, lora_dropout=lora_dropout,
                        **kwargs)
    return register_expert_lora(config)


def load_lora_adapter(model, adapter_path, adapter_name: str = "default", is_trainable: bool = False,
                      **kwargs) -> PeftModel:
    """`PeftModel.from_pretrained(model, adapter_path, ...)` with `LoraExperts` registered on the saved config.
    Works for adapters saved from the bf16 or the bitsandbytes model onto either."""
    config = register_expert_lora(LoraConfig.from_pretrained(adapter_path))
    return PeftModel.from_pretrained(model, adapter_path, adapter_name=adapter_name, is_trainable=is_trainable,
                                     config=config, **kwargs)


__all__ = [
    "ATTENTION_TARGETS",
    "EXPERT_TARGETS",
    "LoraExperts",
    "MLP_TARGETS",
    "TARGET_PRESETS",
    "load_lora_adapter",
    "lora_config",
    "register_expert_lora",
]
