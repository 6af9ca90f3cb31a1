"""DeepSeek-V3 (arXiv 2412.19437): Multi-head Latent Attention, DeepSeekMoE and Multi-Token Prediction.

Read top to bottom: norm -> rotary/YaRN -> MLA -> MLP -> router -> experts -> MoE -> decoder layer -> MTP layer
-> PreTrainedModel -> Model -> ForCausalLM.

Shape suffixes and names (torchtitan style):
    B batch, T query tokens, S key tokens (past + new), D hidden_size, H attention heads,
    N qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim, L kv_lora_rank (the latent c_kv),
    E routed experts, K experts per token, I expert width, G expert groups.

Paper names: c_kv (normalized KV latent, what the cache stores), k_pe (the one rotated key head shared by all
heads), q_nope/q_pe, W_UK/W_UV (the key and value halves of kv_b_proj), h' and eh_proj (MTP input projection).
"""

import collections
import contextlib
import math
import os
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, StaticLayer
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .checkpoint_layout import MTP_SHARED_COPY_PATTERN, mtp_shared_copies, register_official_layout
from .configuration_deepseek_v3 import DeepseekV3Config, yarn_get_mscale
from .decode_kernels import (
    GREEDY_MAX_ROWS,
    MAX_GEMV_TOKENS,
    absorb_query,
    absorbed_decode_attention,
    add_rms_norm,
    argmax_rows,
    decode_kernels_available,
    decode_prologue,
    greedy_pick_,
    latent_norm_rope,
    linear_pair,
    moe_combine,
    noaux_topk,
    rms_norm,
    rotate_pairs_,
    router_scores,
    silu_gate_up,
)
from .moe_kernels import combine_sorted_pairs, expert_down, expert_gate_up_act, triton_moe_available
from .training_kernels import rms_norm_training, rotate_pairs_training, silu_mul_training
from .official_checkpoint import fp8_quantization_config, load_fp8_checkpoint

register_official_layout()

# Newer transformers 5.x (5.24 on) name the cache `cache` in forward arguments and output fields; 5.17 names it
# `past_key_values`. The public forwards accept both names and the outputs use the installed version's field.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _the_cache(past_key_values: Cache | None, cache: Cache | None) -> Cache | None:
    """The one cache passed as `past_key_values` (transformers 5.17) or `cache` (newer)."""
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("pass the KV cache once, as `cache` or as `past_key_values`, not two different caches")
    return cache if cache is not None else past_key_values


# `torch.nn.functional.grouped_mm` (public from torch 2.10) or its private predecessor (torch 2.8-2.9).
_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _use_decode_kernels(config: DeepseekV3Config | None, module: nn.Module, x: torch.Tensor) -> bool:
    """Whether `module` takes its `config.decode_kernels` fast path on `x`: CUDA inference only (eval mode, no
    autograd: the Triton kernels have no backward), not under autocast (the kernels compute in the tensors' own
    dtypes) and not while torch.compile traces (Inductor fuses the eager ops itself)."""
    return bool(
        config is not None
        and config.decode_kernels
        and not module.training
        and not torch.is_grad_enabled()
        and decode_kernels_available(x)
        and not torch.is_autocast_enabled(x.device.type)
        and not torch.compiler.is_compiling()
    )


def _use_training_kernels(config: DeepseekV3Config | None, x: torch.Tensor) -> bool:
    """Whether the `config.training_kernels` path applies to `x`: CUDA with autograd on, not while torch.compile
    traces (Inductor fuses the eager ops itself)."""
    return bool(
        config is not None
        and config.training_kernels
        and torch.is_grad_enabled()
        and decode_kernels_available(x)
        and not torch.compiler.is_compiling()
    )


def _use_fused_kernels(config: DeepseekV3Config | None, module: nn.Module, x: torch.Tensor) -> bool:
    """Whether the Triton kernels that serve inference and training alike (the gated activation, the combine of the
    grouped experts, the RoPE of q_pe and k_pe) apply to `x`: under `config.training_kernels` with autograd on, else
    under `config.decode_kernels` (CUDA inference)."""
    if torch.is_grad_enabled():
        return _use_training_kernels(config, x)
    return _use_decode_kernels(config, module, x)


def _plain_weight(linear: nn.Module, x: torch.Tensor) -> bool:
    """A bias-free plain nn.Linear whose weight sits with `x` in its dtype: the kernels read `weight` directly, which
    would skip a PEFT adapter, a quantized linear's packed weight or an offloaded (meta) weight."""
    return (
        type(linear) is nn.Linear
        and linear.bias is None
        and linear.weight.device == x.device
        and linear.weight.dtype == x.dtype
    )


def _decode_linear(linear: nn.Module, x: torch.Tensor, kernels: bool) -> torch.Tensor:
    """`linear(x)`; with `kernels` (see `_use_decode_kernels`), a few tokens through a plain weight run the Triton
    matrix-vector kernel (float32 accumulation, like cuBLAS; measured faster than its GEMV at decode shapes)."""
    if kernels and x.numel() <= MAX_GEMV_TOKENS * x.shape[-1] and _plain_weight(linear, x):
        return linear_pair(x, linear.weight, None)
    return linear(x)


class DeepseekV3RMSNorm(nn.Module):
    """RMSNorm computed in float32, scaled by `weight` in the input dtype. With a `config` whose `decode_kernels`
    is on, CUDA inference runs one Triton kernel (`decode_kernels.rms_norm`, same math) instead of eight; with
    `training_kernels` on, CUDA training runs one forward and one backward kernel (`training_kernels.py`)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, config: DeepseekV3Config | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.config = config

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if _use_decode_kernels(self.config, self, hidden_states) and self.weight.device == hidden_states.device:
            return rms_norm(hidden_states, self.weight, self.variance_epsilon)
        if _use_training_kernels(self.config, hidden_states) and _plain_norm(self, hidden_states):
            return rms_norm_training(hidden_states, self.weight, self.variance_epsilon)
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def _plain_norm(norm: nn.Module, x: torch.Tensor) -> bool:
    """A `DeepseekV3RMSNorm` whose weight sits with `x` in its dtype (the fused kernels read it directly)."""
    return (
        type(norm) is DeepseekV3RMSNorm
        and norm.weight.device == x.device
        and norm.weight.dtype == x.dtype
        and x.stride(-1) == 1
    )


# ----------------------------------------------------------------------------------------------------------------
# Rotary embedding with YaRN (REFERENCE.md section 3)
# ----------------------------------------------------------------------------------------------------------------


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, original_max_position: int) -> float:
    # The RoPE dimension whose wavelength fits `num_rotations` times into the original context.
    return dim * math.log(original_max_position / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def compute_rope_inv_freq(config: DeepseekV3Config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [R/2] of the decoupled RoPE (YaRN-interpolated when configured) and the cos/sin factor.

    YaRN as in the official `precompute_freqs_cis`: dimensions below `low = floor(d(beta_fast))` keep their
    frequency, dimensions above `high = ceil(d(beta_slow))` are divided by `factor`, with a linear ramp between.
    The returned factor is `mscale(factor, mscale) / mscale(factor, mscale_all_dim)` (1.0 for V3).
    """
    dim = config.qk_rope_head_dim
    base = config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))
    yarn = config.yarn_parameters
    if yarn is None:
        return inv_freq, 1.0
    factor = yarn["factor"]
    original_max_position = yarn["original_max_position_embeddings"]
    beta_fast = yarn.get("beta_fast") or 32
    beta_slow = yarn.get("beta_slow") or 1
    low = max(math.floor(_yarn_correction_dim(beta_fast, dim, base, original_max_position)), 0)
    high = min(math.ceil(_yarn_correction_dim(beta_slow, dim, base, original_max_position)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    smooth = 1 - ramp
    inv_freq = inv_freq / factor * (1 - smooth) + inv_freq * smooth
    attention_factor = yarn_get_mscale(factor, yarn.get("mscale") or 1.0) / yarn_get_mscale(
        factor, yarn.get("mscale_all_dim") or 1.0
    )
    if yarn.get("attention_factor") is not None:
        attention_factor = yarn["attention_factor"]
    return inv_freq, attention_factor


class DeepseekV3RotaryEmbedding(nn.Module):
    """Maps positions [B, T] to float32 (cos, sin) [B, T, R/2] for the interleaved-pair rotation."""

    def __init__(self, config: DeepseekV3Config):
        super().__init__()
        self.config = config
        inv_freq, self.attention_scaling = compute_rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Angles in float32 even under autocast: bf16 positions * frequencies lose whole turns at long context.
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            freqs_BTr = position_ids[..., None].float() * self.inv_freq.float().to(position_ids.device)
            return freqs_BTr.cos() * self.attention_scaling, freqs_BTr.sin() * self.attention_scaling


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[2i], x[2i+1]) of the last dim of `x` [..., T, R] by the angles of `cos`/`sin`
    [..., T, R/2], exactly as the official complex multiply does on the unpermuted official weights.
    Computed in float32, returned in the dtype of `x`."""
    x_pairs = x.float().unflatten(-1, (-1, 2))
    x_even, x_odd = x_pairs[..., 0], x_pairs[..., 1]
    rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Multi-head Latent Attention
# ----------------------------------------------------------------------------------------------------------------


def build_attention_bias(
    attention_mask: torch.Tensor | None,
    cache_position: torch.Tensor,
    kv_length: int,
    dtype: torch.dtype,
    keys_are_exact: bool = True,
) -> torch.Tensor | None:
    """Additive attention bias [B or 1, 1, T, S] (0 where allowed, the dtype's minimum elsewhere).

    Args:
        attention_mask: None, a 2D padding mask [B, S'] (1 = real token, S' <= S: a static cache is longer than
            the tokens seen so far, and positions past them are excluded by causality anyway), or a ready 4D mask
            (boolean, True = attend, or additive).
        cache_position: [T] absolute position of each query token.
        kv_length: S, the key length the attention will see.
        keys_are_exact: the S keys are exactly the tokens seen so far (a dynamic cache). A static cache is longer,
            and its unwritten slots must be masked even for a single new token.
    Returns None when nothing needs masking (one new token, exact keys, no padding mask). The minimum instead of
    -inf keeps fully masked rows (left-padding positions) finite.
    """
    min_value = torch.finfo(dtype).min
    if attention_mask is not None and attention_mask.dim() == 4:
        if attention_mask.dtype == torch.bool:
            return torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device).masked_fill(
                ~attention_mask, min_value
            )
        return attention_mask.to(dtype)
    if attention_mask is None and cache_position.shape[0] == 1 and keys_are_exact:
        return None
    key_position_S = torch.arange(kv_length, device=cache_position.device)
    allowed_TS = key_position_S[None, :] <= cache_position[:, None]
    allowed_BTS = allowed_TS[None]
    if attention_mask is not None:
        # The mask arrives on the inputs' device; under a device_map the positions may live on another GPU.
        padding_BS = attention_mask.to(device=cache_position.device, dtype=torch.bool)
        if padding_BS.shape[-1] < kv_length:
            padding_BS = F.pad(padding_BS, (0, kv_length - padding_BS.shape[-1]), value=True)
        allowed_BTS = allowed_BTS & padding_BS[:, None, :kv_length]
    bias_BTS = torch.zeros(allowed_BTS.shape, dtype=dtype, device=cache_position.device)
    return bias_BTS.masked_fill(~allowed_BTS, min_value)[:, None]


def _attended_keys(attention_bias: torch.Tensor | None, T: int) -> int | None:
    """How many cache slots the attention reads: a prompt's bias covers only the written slots of a static cache
    (`DeepseekV3Model.forward`), "causal only" (no bias, T > 1) means a prompt written from slot 0, so T; None
    for all (a decode step keeps the static cache's full, fixed length: graph-capturable)."""
    if attention_bias is not None:
        return attention_bias.shape[-1]
    return T if T > 1 else None


def _writable_static_layer(cache: Cache | None, layer_idx: int, x: torch.Tensor) -> StaticLayer | None:
    """The transformers `StaticLayer` of `layer_idx` when the decode kernels may write a step's latent straight into
    its tensors (what `StaticLayer.update` does with two index copies), else None: an initialized plain static layer
    in x's dtype and device, of a cache whose `update` is the base one (no offloading, no override)."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers) or getattr(cache, "offloading", False):
        return None
    if type(cache).update is not Cache.update:
        return None
    layer = layers[layer_idx]
    if type(layer) is not StaticLayer or not layer.is_initialized:
        return None
    if layer.keys.dtype != x.dtype or layer.keys.device != x.device or layer.keys.shape[1] != 1:
        return None
    return layer


def causal_bias(T: int, S: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Additive causal bias [1, 1, T, S] for the last T of S positions (the eager kernels' form of `is_causal`)."""
    return build_attention_bias(None, torch.arange(S - T, S, device=device), S, dtype)


class DeepseekV3Attention(nn.Module):
    """Multi-head Latent Attention with decoupled RoPE (REFERENCE.md section 3).

    Keys and values of all heads come from one normalized latent `c_kv` [L] per token plus one rotated key head
    `k_pe` [R]; the cache holds exactly those two. Two equivalent ways to attend (`config.attention_form`):

    - naive: decompress `kv_b_proj(c_kv)` into per-head k_nope [N] and v [V] for every key, attend with head
      dim N + R (SDPA or eager). Cheap for a prompt, whose keys are all new.
    - absorbed: fold `W_UK` into the query (`q_lat = q_nope @ W_UK`, [L] per head) and `W_UV` into the output
      (`o = o_lat @ W_UV^T`), and attend on the latent cache directly as multi-query attention with key
      [c_kv | k_pe] and value c_kv. Decode reads L + R values per cached token instead of H * (N + V), and the
      cache is never re-expanded.
    """

    def __init__(self, config: DeepseekV3Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.v_head_dim = config.v_head_dim
        self.scaling = config.softmax_scale
        self.attention_dropout = config.attention_dropout

        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, self.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = DeepseekV3RMSNorm(self.q_lora_rank, eps=config.rms_norm_eps, config=config)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            config.hidden_size, self.kv_lora_rank + self.qk_rope_head_dim, bias=config.attention_bias
        )
        self.kv_a_layernorm = DeepseekV3RMSNorm(self.kv_lora_rank, eps=config.rms_norm_eps, config=config)
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, config.hidden_size, bias=config.attention_bias)

    def forward(
        self,
        hidden_states: "torch.Tensor | PendingMoEOutput",
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_bias: torch.Tensor | None,
        past_key_values: Cache | None = None,
        use_absorbed: bool = False,
        input_norm: tuple[torch.Tensor, float] | None = None,
    ) -> torch.Tensor:
        """hidden_states [B, T, D], position_embeddings (cos, sin) [B, T, R/2], attention_bias [B|1, 1, T, S], or
        None: no masking for one new token, causal only for a prompt (T > 1, no past). Appends this step's
        (c_kv, k_pe) to `past_key_values`. Returns [B, T, D]. `input_norm = (weight, eps)`: hidden_states are
        the decoder layer's input before its RMSNorm, which the decode kernels apply inside the a-projection
        kernel; only where `fuses_input_norm` holds. With `input_norm`, hidden_states may be the previous MoE layer's
        `PendingMoEOutput`, summed in the same kernel (see `DeepseekV3DecoderLayer`)."""
        B, T, _ = hidden_states.shape
        H, N, R, L = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
        cos_BTr, sin_BTr = position_embeddings
        if input_norm is not None or self._takes_latent_kernels(hidden_states):
            return self._forward_kernels(hidden_states, position_embeddings, attention_bias, past_key_values,
                                         use_absorbed, input_norm)
        kernels = _use_decode_kernels(self.config, self, hidden_states)

        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        latent_BTk = self.kv_a_proj_with_mqa(hidden_states)
        q_BHTk = q.view(B, T, H, N + R).transpose(1, 2)
        q_nope_BHTn, q_pe_BHTr = torch.split(q_BHTk, [N, R], dim=-1)
        c_kv_BTl, k_pe_BTr = torch.split(latent_BTk, [L, R], dim=-1)
        c_kv_BTl = self.kv_a_layernorm(c_kv_BTl)
        if _use_fused_kernels(self.config, self, hidden_states):
            # Both rotations in one launch each way (training_kernels under autograd, else decode_kernels: a prompt's
            # ~18 small kernels a layer are one); q_pe as [B*T, H, R] (a view of q_b_proj's output).
            # (position_ids [1, T] give angles [1, T, R/2] for every row of the batch.)
            cos_Tr, sin_Tr = (angle.expand(B, T, -1).reshape(B * T, -1) for angle in (cos_BTr, sin_BTr))
            q_pe_THr, k_pe_Tr = rotate_pairs_training(
                q.reshape(B * T, H, N + R)[..., N:], k_pe_BTr.reshape(B * T, R), cos_Tr, sin_Tr
            )
            q_pe_BHTr, k_pe_BTr = q_pe_THr.view(B, T, H, R).transpose(1, 2), k_pe_Tr.view(B, T, R)
        else:
            q_pe_BHTr = apply_rotary_interleaved(q_pe_BHTr, cos_BTr[:, None], sin_BTr[:, None])
            k_pe_BTr = apply_rotary_interleaved(k_pe_BTr, cos_BTr, sin_BTr)

        # The cache stores the latent as a single "key head" [B, 1, S, L] and k_pe as a single "value head"
        # [B, 1, S, R]: any transformers Cache (dynamic, static, offloaded) then holds L + R values per token.
        c_kv_B1Sl, k_pe_B1Sr = c_kv_BTl[:, None], k_pe_BTr[:, None]
        if past_key_values is not None:
            c_kv_B1Sl, k_pe_B1Sr = past_key_values.update(c_kv_B1Sl, k_pe_B1Sr, self.layer_idx)
        keys = _attended_keys(attention_bias, T)
        if keys is not None and keys < c_kv_B1Sl.shape[2]:
            c_kv_B1Sl, k_pe_B1Sr = c_kv_B1Sl[:, :, :keys], k_pe_B1Sr[:, :, :keys]

        if kernels and self._absorbs_one_token(use_absorbed, T, attention_bias):
            # decode_kernels at batch sizes past the matrix-vector kernels: the one-token attention still applies.
            attn_BTo = self._attend_one_token_kernels(
                q, cos_BTr.expand(B, T, -1).reshape(B, -1), sin_BTr.expand(B, T, -1).reshape(B, -1), c_kv_B1Sl[:, 0],
                k_pe_B1Sr[:, 0], attention_bias
            )
            return _decode_linear(self.o_proj, attn_BTo, kernels)
        if use_absorbed and self._can_absorb():
            attn_BHTv = self._attend_absorbed(q_nope_BHTn, q_pe_BHTr, c_kv_B1Sl[:, 0], k_pe_B1Sr[:, 0], attention_bias)
        else:
            attn_BHTv = self._attend_naive(q_nope_BHTn, q_pe_BHTr, c_kv_B1Sl[:, 0], k_pe_B1Sr, attention_bias)
        return _decode_linear(self.o_proj, attn_BHTv.transpose(1, 2).reshape(B, T, H * self.v_head_dim), kernels)

    def _absorbs_one_token(self, use_absorbed: bool, T: int, attention_bias: torch.Tensor | None) -> bool:
        """The decode_kernels one-token attention applies: absorbed form, one new token, a per-sequence bias."""
        return (
            use_absorbed and self._can_absorb() and T == 1
            and (attention_bias is None or attention_bias.shape[1] == 1)
        )

    def _attend_one_token_kernels(self, q, cos_Br, sin_Br, c_kv_BSl, k_pe_BSr, attention_bias, advance_length=None,
                                  latent=None):
        """q [B, 1, H * (N + R)] (q_b_proj's output, q_pe not yet rotated), angles [B, R/2] -> [B, 1, H * V]: the
        absorbed query (`q_nope @ W_UK`, RoPE of q_pe) in one launch, attention over the latent cache (split +
        combine) and W_UV in one or two more. `advance_length`: see `absorbed_decode_attention`; `latent`: the new
        token's latent row, written to the cache by the absorbed query's launch (see `absorb_query`)."""
        B = q.shape[0]
        H, N, R, L = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
        w_kv_b = self.kv_b_proj.weight
        q_HBk = absorb_query(q.view(B, H, N + R), w_kv_b, cos_Br, sin_Br, N, latent=latent)  # [q_lat | rotated q_pe]
        bias_BS = attention_bias[:, 0, 0] if attention_bias is not None else None
        return absorbed_decode_attention(
            q_HBk[..., :L], q_HBk[..., L:], c_kv_BSl, k_pe_BSr, bias_BS, self.scaling, w_kv_b, N,
            advance_length=advance_length,
        ).view(B, 1, H * self.v_head_dim)

    def fuses_input_norm(self, hidden_states: torch.Tensor, norm: nn.Module) -> bool:
        """Whether `forward` takes the decode kernels' path on hidden_states and can apply the decoder layer's
        input RMSNorm `norm` inside its first kernel (pass `input_norm=(norm.weight, norm.variance_epsilon)` with
        the un-normalized input; hooks on `norm` itself are then not called)."""
        return self._takes_latent_kernels(hidden_states) and _plain_norm(norm, hidden_states)

    def _forward_kernels(self, hidden_states, position_embeddings, attention_bias, past_key_values, use_absorbed,
                         input_norm=None):
        """`forward` for a few tokens with `decode_kernels` (decode_kernels.py), ~9 launches instead of ~30: q_a_proj
        and kv_a_proj_with_mqa in one pass over both weights (with the layer's input RMSNorm `input_norm` =
        (weight, eps) applied inside it, when given); both latent norms and the RoPE of k_pe in one kernel
        that writes c_kv and k_pe straight into a static cache's slots; with the absorbed form and one new token,
        `_attend_one_token_kernels` (on a static cache, q_a_layernorm runs inside q_b_proj's pass and the
        absorbed query's launch writes the latent row instead). Same math as the eager path above, which stays the
        reference (test_gpu.py holds them equal)."""
        B, T, _ = hidden_states.shape
        H, N, R = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim
        cos_Tr, sin_Tr = (angle.expand(B, T, -1).reshape(B * T, -1) for angle in position_embeddings)
        if isinstance(hidden_states, PendingMoEOutput):  # the previous MoE layer's sum inside the same pass
            projected_BTk = hidden_states.normed_products(self.q_a_proj.weight, self.kv_a_proj_with_mqa.weight,
                                                          input_norm)
        else:
            projected_BTk = linear_pair(hidden_states, self.q_a_proj.weight, self.kv_a_proj_with_mqa.weight,
                                        norm=input_norm)
        norms = (self.q_a_layernorm.weight, self.kv_a_layernorm.weight, self.kv_a_layernorm.variance_epsilon)
        layer = _writable_static_layer(past_key_values, self.layer_idx, projected_BTk)
        absorbed = self._absorbs_one_token(use_absorbed, T, attention_bias)
        q = latent = None
        if layer is not None:
            c_kv_BSl, k_pe_BSr = layer.keys[:, 0], layer.values[:, 0]
            cache = (c_kv_BSl, k_pe_BSr, layer.cumulative_length)
            if absorbed and self._writes_latent_in_absorb(projected_BTk):
                # q_a_layernorm inside q_b_proj's pass; the new latent row written to the cache by absorb_query.
                Q = self.q_lora_rank
                q = linear_pair(projected_BTk[..., :Q], self.q_b_proj.weight, None,
                                norm=(self.q_a_layernorm.weight, self.q_a_layernorm.variance_epsilon))
                latent = (projected_BTk[:, 0, Q:], self.kv_a_layernorm.weight, self.kv_a_layernorm.variance_epsilon,
                          cache)
            else:
                q_a_BTq, _, _ = latent_norm_rope(projected_BTk, *norms, cos_Tr, sin_Tr, cache=cache)
            if not absorbed:  # (the absorbed attention's combine advances it, saving a launch)
                layer.cumulative_length.add_(T)  # what StaticLayer.update does after its copies
        else:
            q_a_BTq, c_kv_BTl, k_pe_BTr = latent_norm_rope(projected_BTk, *norms, cos_Tr, sin_Tr)
            c_kv_B1Sl, k_pe_B1Sr = c_kv_BTl[:, None], k_pe_BTr[:, None]
            if past_key_values is not None:
                c_kv_B1Sl, k_pe_B1Sr = past_key_values.update(c_kv_B1Sl, k_pe_B1Sr, self.layer_idx)
            c_kv_BSl, k_pe_BSr = c_kv_B1Sl[:, 0], k_pe_B1Sr[:, 0]
        keys = _attended_keys(attention_bias, T)
        if keys is not None and keys < c_kv_BSl.shape[1]:
            c_kv_BSl, k_pe_BSr = c_kv_BSl[:, :keys], k_pe_BSr[:, :keys]
        if q is None:
            q = _decode_linear(self.q_b_proj, q_a_BTq, True)  # [B, T, H * (N + R)]

        if absorbed:
            attn_BTo = self._attend_one_token_kernels(
                q, cos_Tr, sin_Tr, c_kv_BSl, k_pe_BSr, attention_bias,
                advance_length=layer.cumulative_length if layer is not None else None, latent=latent,
            )
        else:
            rotate_pairs_(q.view(B * T, H, N + R)[..., N:], None, cos_Tr, sin_Tr)  # in place
            q_nope_BHTn, q_pe_BHTr = torch.split(q.view(B, T, H, N + R).transpose(1, 2), [N, R], dim=-1)
            if use_absorbed and self._can_absorb():
                attn_BHTv = self._attend_absorbed(q_nope_BHTn, q_pe_BHTr, c_kv_BSl, k_pe_BSr, attention_bias)
            else:
                attn_BHTv = self._attend_naive(q_nope_BHTn, q_pe_BHTr, c_kv_BSl, k_pe_BSr[:, None], attention_bias)
            attn_BTo = attn_BHTv.transpose(1, 2).reshape(B, T, H * self.v_head_dim)
        return _decode_linear(self.o_proj, attn_BTo, True)

    def _writes_latent_in_absorb(self, projected_BTk: torch.Tensor) -> bool:
        """Whether the one-token absorbed step on a static cache skips `latent_norm_rope`: q_b_proj (a plain
        weight) applies q_a_layernorm inside its pass and `absorb_query` writes the new latent row to the cache
        (one launch less a layer)."""
        return _plain_weight(self.q_b_proj, projected_BTk)

    def _can_absorb(self) -> bool:
        """The absorbed form reads `kv_b_proj.weight` as W_UK/W_UV, so it needs a plain nn.Linear with a real weight.
        A PEFT LoRA wrapper (whose adapter a raw weight read would skip), a quantized linear (packed weight) or a
        layer accelerate offloads (weight on `meta` until the module is called) attend in the naive form, which
        calls kv_b_proj."""
        return type(self.kv_b_proj) is nn.Linear and self.kv_b_proj.weight.device.type != "meta"

    def _takes_latent_kernels(self, x: torch.Tensor) -> bool:
        """Whether `forward` runs `_forward_kernels` on x [B, T, D]: decode kernels on (`_use_decode_kernels`), at
        most MAX_GEMV_TOKENS tokens, and plain modules only (it reads the a-projections' and the latent norms'
        weights directly)."""
        B, T, _ = x.shape
        return (
            _use_decode_kernels(self.config, self, x)
            and B * T <= MAX_GEMV_TOKENS
            and self.q_lora_rank is not None
            and _plain_weight(self.q_a_proj, x)
            and _plain_weight(self.kv_a_proj_with_mqa, x)
            and _plain_norm(self.q_a_layernorm, x)
            and _plain_norm(self.kv_a_layernorm, x)
            and self.q_a_layernorm.variance_epsilon == self.kv_a_layernorm.variance_epsilon
        )

    def _attend_naive(self, q_nope_BHTn, q_pe_BHTr, c_kv_BSl, k_pe_B1Sr, attention_bias):
        B, H, T, _ = q_nope_BHTn.shape
        S = c_kv_BSl.shape[1]
        kv_BHSk = self.kv_b_proj(c_kv_BSl).view(B, S, H, self.qk_nope_head_dim + self.v_head_dim).transpose(1, 2)
        k_nope_BHSn, value_BHSv = torch.split(kv_BHSk, [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        key_BHSk = torch.cat((k_nope_BHSn, k_pe_B1Sr.expand(B, H, S, -1)), dim=-1)
        query_BHTk = torch.cat((q_nope_BHTn, q_pe_BHTr), dim=-1)
        dropout = self.attention_dropout if self.training else 0.0
        causal = attention_bias is None and T > 1  # the caller's "causal only" (a prompt: S == T)
        if self.config._attn_implementation == "sdpa":
            return F.scaled_dot_product_attention(
                query_BHTk, key_BHSk, value_BHSv, attn_mask=attention_bias, dropout_p=dropout, scale=self.scaling,
                is_causal=causal,
            )
        if causal:
            attention_bias = causal_bias(T, S, query_BHTk.dtype, query_BHTk.device)
        scores_BHTS = torch.matmul(query_BHTk, key_BHSk.transpose(-1, -2)) * self.scaling
        return torch.matmul(self._softmax(scores_BHTS, attention_bias, dropout, value_BHSv.dtype), value_BHSv)

    def _attend_absorbed(self, q_nope_BHTn, q_pe_BHTr, c_kv_BSl, k_pe_BSr, attention_bias):
        B, H, T, _ = q_nope_BHTn.shape
        N, L = self.qk_nope_head_dim, self.kv_lora_rank
        if attention_bias is None and T > 1:
            attention_bias = causal_bias(T, c_kv_BSl.shape[1], q_nope_BHTn.dtype, q_nope_BHTn.device)
        w_kv_b_HkL = self.kv_b_proj.weight.view(H, N + self.v_head_dim, L)
        w_uk_HNL, w_uv_HVL = w_kv_b_HkL[:, :N], w_kv_b_HkL[:, N:]
        q_lat_BHTl = torch.einsum("bhtn,hnl->bhtl", q_nope_BHTn, w_uk_HNL)
        # Heads folded into the query rows: one batched GEMM per sequence against the shared latent, with no
        # per-head copy of the cache (multi-query attention over H * T rows).
        q_lat_Bql = q_lat_BHTl.reshape(B, H * T, L)
        q_pe_Bqr = q_pe_BHTr.reshape(B, H * T, -1)
        scores_BqS = torch.bmm(q_lat_Bql, c_kv_BSl.transpose(1, 2)) + torch.bmm(q_pe_Bqr, k_pe_BSr.transpose(1, 2))
        scores_BHTS = scores_BqS.view(B, H, T, -1) * self.scaling
        dropout = self.attention_dropout if self.training else 0.0
        probs_BHTS = self._softmax(scores_BHTS, attention_bias, dropout, c_kv_BSl.dtype)
        o_lat_BHTl = torch.bmm(probs_BHTS.reshape(B, H * T, -1), c_kv_BSl).view(B, H, T, L)
        return torch.einsum("bhtl,hvl->bhtv", o_lat_BHTl, w_uv_HVL)

    def _softmax(self, scores_BHTS, attention_bias, dropout, dtype):
        # Softmax in float32 (the bias holds the dtype's minimum), probabilities back in the compute dtype.
        scores_BHTS = scores_BHTS.float()
        if attention_bias is not None:
            scores_BHTS = scores_BHTS + attention_bias.float()
        probs_BHTS = torch.softmax(scores_BHTS, dim=-1)
        return F.dropout(probs_BHTS, p=dropout, training=self.training).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Feed-forward: dense MLP, router, routed experts, DeepSeekMoE (REFERENCE.md section 4)
# ----------------------------------------------------------------------------------------------------------------


# Inference over more tokens than this (a long prompt's prefill) runs the feed-forward blocks chunk by chunk: every
# token is computed independently there, and the intermediates of a 32k-token prompt (the dense MLP's [T, 10944],
# the MoE's expert-sorted copies, gate/up activations and float32 combine) would otherwise take several GB.
INFERENCE_CHUNK_TOKENS = 8192


def _inference_chunks(module: nn.Module, n_tokens: int) -> int | None:
    """The chunk size for `n_tokens` tokens through `module`, or None to run them at once (training, autograd,
    or few tokens)."""
    chunk = getattr(module, "inference_chunk_tokens", INFERENCE_CHUNK_TOKENS)
    if module.training or torch.is_grad_enabled() or n_tokens <= chunk:
        return None
    return chunk


def _gated_activation(module: nn.Module, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`module.act_fn(gate) * up`; for SiLU where `_use_fused_kernels` applies, one Triton kernel each way
    (`training_kernels.silu_mul_training`, same roundings)."""
    config = module.config
    if config.hidden_act == "silu" and gate.dtype == up.dtype and _use_fused_kernels(config, module, gate):
        return silu_mul_training(gate, up)
    return module.act_fn(gate) * up


class DeepseekV3MLP(nn.Module):
    """Gated MLP `down(act(gate(x)) * up(x))`: the dense layers and the shared experts. With `decode_kernels`, a
    few tokens in CUDA inference run gate, up and SiLU as one Triton pass (`decode_kernels.silu_gate_up`) and
    down as a Triton matrix-vector product."""

    def __init__(self, config: DeepseekV3Config, intermediate_size: int | None = None):
        super().__init__()
        self.config = config
        intermediate_size = config.intermediate_size if intermediate_size is None else intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunk = _inference_chunks(self, x.numel() // x.shape[-1])
        if chunk is not None:
            x_TD = x.reshape(-1, x.shape[-1])
            out_TD = x_TD.new_empty(x_TD.shape[0], self.down_proj.out_features)
            for start in range(0, x_TD.shape[0], chunk):
                out_TD[start : start + chunk] = self._forward(x_TD[start : start + chunk])
            return out_TD.view(*x.shape[:-1], -1)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = _use_decode_kernels(self.config, self, x) and x.numel() <= MAX_GEMV_TOKENS * x.shape[-1]
        if kernels and self.config.hidden_act == "silu" and _plain_weight(self.gate_proj, x) and _plain_weight(
            self.up_proj, x
        ):
            return _decode_linear(self.down_proj, silu_gate_up(x, self.gate_proj.weight, self.up_proj.weight), True)
        return self.down_proj(_gated_activation(self, self.gate_proj(x), self.up_proj(x)))


class DeepseekV3TopkRouter(nn.Module):
    """Expert selection. For `noaux_tc` (V3):

    1. `s = sigmoid(x @ W_gate^T)`, in float32: top-k decisions flip on rounding differences.
    2. Selection uses `s + e_score_correction_bias` (the auxiliary-loss-free balancing bias: it only selects,
       it never weights).
    3. Group-limited: a group's score is the sum of its top-2 biased scores; the `topk_group` best groups stay.
    4. Top-K over the remaining experts by biased score.
    5. Weights: the unbiased `s` of the chosen experts, normalized to sum 1, times `routed_scaling_factor`.
    """

    def __init__(self, config: DeepseekV3Config, layer_idx: int | None = None):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.top_k = config.num_experts_per_tok
        self.n_routed_experts = config.n_routed_experts
        self.n_group = config.n_group or 1
        self.topk_group = config.topk_group or self.n_group
        self.weight = nn.Parameter(torch.empty(self.n_routed_experts, config.hidden_size))
        if config.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        # Tokens routed to each expert since the last `update_expert_bias()`: counted in training forwards (and
        # under `tracking_expert_load()`), with a scatter-add that needs no host sync.
        self.register_buffer("expert_load", torch.zeros(self.n_routed_experts, dtype=torch.float32), persistent=False)
        self.track_load = False

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` casts every floating buffer. The token counts (bf16 counts exactly only up to
        # 256) and the balancing bias (it decides top-k by differences far below bf16 resolution) stay float32.
        super()._apply(fn, recurse)
        for name in ("expert_load", "e_score_correction_bias"):
            buffer = self._buffers.get(name)
            if buffer is not None and buffer.dtype != torch.float32:
                self._buffers[name] = buffer.float()
        return self

    def forward(
        self, x_TD: torch.Tensor, token_mask_T: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_TD [T, D] -> (topk_idx [T, K] int64, topk_weight [T, K] float32, scores [T, E] float32).

        `token_mask_T` (1 = real token, 0 = padding) keeps padding out of the expert-load counts; every token is
        routed either way."""
        if self._use_fused_selection(x_TD):
            return self._forward_kernels(x_TD)
        # float32 even under bf16 autocast, which would otherwise run this linear in bf16.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight.float())
        if self.config.scoring_func == "sigmoid":
            scores_TE = logits_TE.sigmoid()
        else:
            scores_TE = logits_TE.softmax(dim=-1)

        choice_TE = scores_TE
        if self.e_score_correction_bias is not None:
            choice_TE = scores_TE + self.e_score_correction_bias.float()
        if self.config.topk_method != "greedy" and self.n_group > 1:
            T = x_TD.shape[0]
            choice_TGe = choice_TE.view(T, self.n_group, -1)
            if self.config.topk_method == "noaux_tc":
                group_scores_TG = choice_TGe.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores_TG = choice_TGe.amax(dim=-1)
            group_idx = group_scores_TG.topk(self.topk_group, dim=-1, sorted=False).indices
            keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, group_idx, True)
            choice_TE = choice_TGe.masked_fill(~keep_TG[..., None], float("-inf")).view(T, -1)
        topk_idx_TK = choice_TE.topk(self.top_k, dim=-1, sorted=False).indices
        if self.training or self.track_load:
            with torch.no_grad():
                if token_mask_T is None:
                    routed = torch.ones(topk_idx_TK.numel(), device=topk_idx_TK.device)
                else:
                    routed = token_mask_T.to(device=topk_idx_TK.device, dtype=torch.float32).repeat_interleave(self.top_k)
                self.expert_load.scatter_add_(0, topk_idx_TK.reshape(-1), routed)

        topk_weight_TK = scores_TE.gather(1, topk_idx_TK)
        if self.config.norm_topk_prob and self.top_k > 1:
            topk_weight_TK = topk_weight_TK / (topk_weight_TK.sum(dim=-1, keepdim=True) + 1e-20)
        topk_weight_TK = topk_weight_TK * self.config.routed_scaling_factor
        return topk_idx_TK, topk_weight_TK, scores_TE

    def _use_fused_selection(self, x_TD: torch.Tensor) -> bool:
        # The kernels implement V3's sigmoid + noaux_tc routing; load counting stays on the eager path.
        return (
            self.config.scoring_func == "sigmoid"
            and self.config.topk_method == "noaux_tc"
            and not self.track_load
            and _use_decode_kernels(self.config, self, x_TD)
            and self.weight.device == x_TD.device
        )

    def _forward_kernels(self, x_TD):
        # `decode_kernels`: the float32 logits and sigmoid in one matrix-vector pass over the bf16 weight (no float32
        # copy of it per step; cuBLAS beyond a few tokens), then group-limited top-k and weights in one launch.
        if x_TD.shape[0] <= MAX_GEMV_TOKENS:
            scores_TE = router_scores(x_TD, self.weight)
        else:
            with torch.autocast(device_type=x_TD.device.type, enabled=False):
                scores_TE = F.linear(x_TD.float(), self.weight.float()).sigmoid()
        return (*self._select_kernels(scores_TE), scores_TE)

    def _select_kernels(self, scores_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return noaux_topk(
            scores_TE, self.e_score_correction_bias, self.n_group, self.topk_group, self.top_k,
            self.config.norm_topk_prob and self.top_k > 1, self.config.routed_scaling_factor,
        )

    def route_after_add_norm(
        self, delta_TD: torch.Tensor, residual_TD: torch.Tensor, norm: "DeepseekV3RMSNorm"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """decode_kernels (`_use_fused_selection`, at most MAX_GEMV_TOKENS tokens): the decoder layer's residual add
        and post-attention norm inside the router's pass, -> (topk_idx, topk_weight, residual + delta,
        norm(residual + delta)), each [T, ...]; the routing of `forward(norm(residual + delta))`."""
        scores_TE, total_TD, normed_TD = router_scores(
            delta_TD, self.weight, add_norm=(residual_TD, norm.weight, norm.variance_epsilon)
        )
        return (*self._select_kernels(scores_TE), total_TD, normed_TD)


def _accelerate_init_device():
    """The target device of an active accelerate `init_empty_weights()` / `init_on_device()`, else None.

    Without `include_buffers=True` those patch `register_parameter` to move each parameter after torch created it,
    so a fused expert tensor would first be allocated on the host: 30 GB a layer for the 671B model, which fails
    where memory is not overcommitted. The experts allocate on the target device directly instead.
    """
    register = nn.Module.register_parameter
    if getattr(register, "__name__", "") != "register_empty_parameter":
        return None
    for cell in getattr(register, "__closure__", None) or ():
        if isinstance(cell.cell_contents, torch.device):
            return cell.cell_contents
    return None


def expert_loop(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor, num_experts: int,
                expert_fn) -> torch.Tensor:
    """`sum_k w_k * expert_{idx_k}(x)` for every token, calling `expert_fn(e, x_nD) -> y_nD` once per expert that
    received tokens, on those tokens only. Returns float32 [T, D] (combined in float32, as the fused experts do).

    Memory is O(routed tokens): nothing of the size of all experts' weights is created. The reference path of
    the fused, quantized and LoRA experts; one host sync on the per-expert counts is accepted here."""
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


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype `F.linear` computes in for input `x`: autocast's where it is on for x's device, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class DeepseekV3Experts(nn.Module):
    """The routed experts of one MoE layer, fused: `gate_up_proj` [E, 2I, D] (gate rows first) and `down_proj`
    [E, D, I]. Same names and shapes as transformers' built-in; on disk they are per-expert 2D weights
    (checkpoint_layout.py).

    `config.moe_implementation` picks the compute: "eager" (loop over the experts that received tokens, the
    reference), "grouped_mm" (tokens sorted by expert, one grouped GEMM per projection), or "auto" (grouped_mm on
    CUDA in bf16 or under bf16 autocast, where the kernel exists and is fast; eager otherwise). No token is ever
    dropped.
    """

    def __init__(self, config: DeepseekV3Config):
        super().__init__()
        self.config = config
        self.num_experts = config.n_routed_experts
        device = _accelerate_init_device()
        self.gate_up_proj = nn.Parameter(
            torch.empty(self.num_experts, 2 * config.moe_intermediate_size, config.hidden_size, device=device)
        )
        self.down_proj = nn.Parameter(
            torch.empty(self.num_experts, config.hidden_size, config.moe_intermediate_size, device=device)
        )
        self.act_fn = ACT2FN[config.hidden_act]
        self.register_load_state_dict_pre_hook(_fuse_official_expert_keys)

    def forward(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor) -> torch.Tensor:
        """x_TD [T, D], topk_idx_TK [T, K], topk_weight_TK [T, K] float32 -> float32 [T, D], the weighted sum of
        each token's experts (combined in float32)."""
        implementation = self.implementation(x_TD, topk_idx_TK.numel())
        if implementation == "gather":
            return self._forward_gather(x_TD, topk_idx_TK, topk_weight_TK)
        if implementation == "triton":
            return self._forward_triton(x_TD, topk_idx_TK, topk_weight_TK)
        if implementation == "grouped_mm":
            if _grouped_mm is None:
                raise RuntimeError(
                    f"moe_implementation='grouped_mm' needs torch.nn.functional.grouped_mm (torch >= 2.8); "
                    f"this is torch {torch.__version__}"
                )
            return self._forward_grouped_mm(x_TD, topk_idx_TK, topk_weight_TK)
        return self._forward_eager(x_TD, topk_idx_TK, topk_weight_TK)

    def implementation(self, x_TD: torch.Tensor, n_pairs: int) -> str:
        """The compute `forward` uses for x_TD's tokens and their `n_pairs` (token, expert) pairs:
        `config.moe_implementation` with "auto" resolved."""
        implementation = self.config.moe_implementation
        if implementation == "auto":
            if n_pairs <= self.num_experts:  # decode-sized: read only the chosen experts
                use_triton = triton_moe_available(x_TD) and self.config.hidden_act == "silu"
                implementation = "triton" if use_triton else "gather"
            elif _grouped_mm is not None and x_TD.is_cuda and _matmul_dtype(x_TD) == torch.bfloat16:
                implementation = "grouped_mm"
            else:
                implementation = "eager"
        if implementation == "eager" and x_TD.is_cuda and torch.cuda.is_current_stream_capturing():
            implementation = "gather"  # the eager loop syncs on the per-expert counts: not capturable
        return implementation

    def _forward_eager(self, x_TD, topk_idx_TK, topk_weight_TK):
        def expert(e, x_nD):
            gate, up = F.linear(x_nD, self.gate_up_proj[e]).chunk(2, dim=-1)
            return F.linear(self.act_fn(gate) * up, self.down_proj[e])

        return expert_loop(x_TD, topk_idx_TK, topk_weight_TK, self.num_experts, expert)

    def _forward_gather(self, x_TD, topk_idx_TK, topk_weight_TK):
        # One (token, expert) pair per row: gather the pair's expert weights and run batched matrix-vector
        # products. Reads only the chosen experts (T * K of them), with no host sync: the decode-sized path.
        T, K = topk_idx_TK.shape
        flat_expert = topk_idx_TK.reshape(-1)
        x_PD = x_TD.repeat_interleave(K, dim=0)
        gate_up_P2i = torch.bmm(self.gate_up_proj[flat_expert], x_PD[:, :, None]).squeeze(-1)
        gate, up = gate_up_P2i.chunk(2, dim=-1)
        y_PD = torch.bmm(self.down_proj[flat_expert], (self.act_fn(gate) * up)[:, :, None]).squeeze(-1)
        weighted = y_PD.float() * topk_weight_TK.reshape(-1, 1)
        return weighted.view(T, K, -1).sum(dim=1)

    def _forward_triton(self, x_TD, topk_idx_TK, topk_weight_TK):
        # moe_kernels.py: the chosen experts' weights indexed in place, each read once (SiLU fused).
        if not triton_moe_available(x_TD) or self.config.hidden_act != "silu":
            raise RuntimeError("moe_implementation='triton' needs a CUDA tensor, triton and hidden_act='silu'")
        T, K = topk_idx_TK.shape
        y_PD = self._triton_pairs(x_TD, topk_idx_TK)
        return (y_PD * topk_weight_TK.reshape(-1, 1)).view(T, K, -1).sum(dim=1)

    def _triton_pairs(self, x_TD, topk_idx_TK, shared_experts: nn.Module | None = None):
        # Each (token, slot) pair's expert output, float32 [T * K, D], token-major (the combine is the caller's);
        # with `shared_experts` (a plain DeepseekV3MLP of S expert widths), their S float32 parts per token after.
        flat_expert = topk_idx_TK.reshape(-1)
        shared_gate = shared_up = shared_down = None
        if shared_experts is not None:
            shared_gate, shared_up = shared_experts.gate_proj.weight, shared_experts.up_proj.weight
            shared_down = shared_experts.down_proj.weight
        h_PI = expert_gate_up_act(x_TD.contiguous(), self.gate_up_proj, flat_expert, topk_idx_TK.shape[1],
                                  shared_gate=shared_gate, shared_up=shared_up)
        return expert_down(h_PI, self.down_proj, flat_expert, shared_down=shared_down)

    def _forward_grouped_mm(self, x_TD, topk_idx_TK, topk_weight_TK):
        order, token, offsets = sort_by_expert(topk_idx_TK, self.num_experts)
        # Under bf16 autocast (float32 master weights, as the Trainer's --bf16 runs) the grouped GEMMs run in bf16,
        # as F.linear would; the kernel takes one dtype.
        dtype = _matmul_dtype(x_TD)
        x_sorted = x_TD[token].to(dtype)
        gate_up = _grouped_mm(x_sorted, self.gate_up_proj.to(dtype).transpose(1, 2), offs=offsets)
        gate, up = gate_up.chunk(2, dim=-1)
        y = _grouped_mm(_gated_activation(self, gate, up), self.down_proj.to(dtype).transpose(1, 2), offs=offsets)
        return combine_sorted_outputs(self, y, order, token, topk_weight_TK)


def sort_by_expert(topk_idx_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The T*K (token, expert) pairs sorted by expert, for grouped GEMMs: (order_P, the pairs' flat indices in
    expert order; token_P, each sorted pair's token; offsets_E, int32 group ends). The offsets come from a
    scatter-add on the device (bincount syncs on CUDA)."""
    flat_expert = topk_idx_TK.reshape(-1)
    order_P = torch.argsort(flat_expert, stable=True)
    counts_E = torch.zeros(num_experts, dtype=torch.int32, device=flat_expert.device)
    counts_E.scatter_add_(0, flat_expert, torch.ones_like(flat_expert, dtype=torch.int32))
    return order_P, order_P // topk_idx_TK.shape[1], torch.cumsum(counts_E, dim=0, dtype=torch.int32)


def combine_sorted_outputs(module: nn.Module, y_PD: torch.Tensor, order_P: torch.Tensor, token_P: torch.Tensor,
                           topk_weight_TK: torch.Tensor) -> torch.Tensor:
    """float32 [T, D]: each token's K expert outputs, `y_PD` [T*K, D] in the expert order of `sort_by_expert`
    (order_P, token_P), weighted by `topk_weight_TK` [T, K] and summed in float32. Where `_use_fused_kernels`
    applies to `module`, one Triton kernel each way (`moe_kernels.combine_sorted_pairs`: each token reads its rows
    in place); else `_WeightedCombine`, the reference (a float32 copy of the weighted rows and a scatter-add)."""
    T, K = topk_weight_TK.shape
    if torch.compiler.is_compiling():
        # The plain expression under torch.compile: Inductor plans what backward keeps. Traced, the custom backward
        # below led Inductor to lay out the down projection's weight-gradient operand with the token dimension
        # contiguous, which the grouped GEMM refuses unless every expert's token count is a multiple of 8 (a
        # device-side assert in training, torch 2.11).
        w_P = topk_weight_TK.reshape(-1)[order_P]
        out_TD = torch.zeros(T, y_PD.shape[-1], dtype=torch.float32, device=y_PD.device)
        return out_TD.index_add_(0, token_P, y_PD.float() * w_P.float()[:, None])
    if _use_fused_kernels(module.config, module, y_PD):
        # position_TK[t, k]: the sorted row of pair t * K + k (the inverse of the sort's permutation).
        position_P = torch.empty_like(order_P).scatter_(0, order_P, torch.arange(order_P.numel(), device=order_P.device))
        return combine_sorted_pairs(y_PD, position_P.view(T, K), topk_weight_TK)
    return _WeightedCombine.apply(y_PD, topk_weight_TK.reshape(-1)[order_P], token_P, T)


class _WeightedCombine(torch.autograd.Function):
    """`out_TD[t] += w_P[p] * y_PD[p]` for every (token, expert) pair p of token t, in float32.

    The same as `zeros(T, D).index_add_(0, token_P, y_PD.float() * w_P[:, None])`, but autograd would keep the
    float32 copy of `y` for the weight's gradient (4 bytes per routed element: 2 GB at 4k tokens in 8 V3-Lite
    layers); this keeps `y` in its own dtype and upcasts again in backward. The products multiply `y` by a
    float32 operand, so type promotion computes them in float32 without a float32 copy of `y` (400 MB per 8k-token
    inference chunk of V3-Lite)."""

    @staticmethod
    def forward(ctx, y_PD, w_P, token_P, T):
        ctx.save_for_backward(y_PD, w_P, token_P)
        out_TD = torch.zeros(T, y_PD.shape[-1], dtype=torch.float32, device=y_PD.device)
        return out_TD.index_add_(0, token_P, y_PD * w_P.float()[:, None])

    @staticmethod
    def backward(ctx, grad_TD):
        y_PD, w_P, token_P = ctx.saved_tensors
        grad_PD = grad_TD.float()[token_P]
        grad_y = (grad_PD * w_P.float()[:, None]).to(y_PD.dtype) if ctx.needs_input_grad[0] else None
        grad_w = (grad_PD * y_PD).sum(dim=-1).to(w_P.dtype) if ctx.needs_input_grad[1] else None
        return grad_y, grad_w, None, None


def _fuse_official_expert_keys(module, state_dict, prefix, *args):
    """`load_state_dict` pre-hook: accept the official per-expert keys (`{prefix}{e}.gate_proj.weight`, ...), as in
    a checkpoint written by `save_pretrained` (tools such as Trainer's resume load those with `load_state_dict`).

    With every expert of the layer present they become the fused tensors; a shard holding only some of them (a
    sharded `strict=False` load) is copied into the matching slices in place."""
    n, rows = module.num_experts, module.gate_up_proj.shape[1] // 2
    names = [f"{prefix}{e}.{proj}.weight" for e in range(n) for proj in ("gate_proj", "up_proj", "down_proj")]
    present = [name for name in names if name in state_dict]
    if not present:
        return
    if len(present) == len(names):
        state_dict[f"{prefix}gate_up_proj"] = torch.stack(
            [torch.cat([state_dict.pop(f"{prefix}{e}.gate_proj.weight"), state_dict.pop(f"{prefix}{e}.up_proj.weight")])
             for e in range(n)]
        )
        state_dict[f"{prefix}down_proj"] = torch.stack([state_dict.pop(f"{prefix}{e}.down_proj.weight") for e in range(n)])
        return
    with torch.no_grad():
        for name in present:
            expert, proj = name[len(prefix) :].split(".")[:2]
            value = state_dict.pop(name)
            if proj == "down_proj":
                module.down_proj[int(expert)].copy_(value)
            else:
                half = 0 if proj == "gate_proj" else 1
                module.gate_up_proj[int(expert), half * rows : (half + 1) * rows].copy_(value)


def sequence_balance_loss(
    scores_BTE: torch.Tensor,
    topk_idx_BTK: torch.Tensor,
    alpha: float,
    per_sequence: bool,
    token_mask_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    """Complementary sequence-wise balance loss `alpha * sum_i f_i * P_i` (paper eq. 17-20).

    `f_i = E / (K * T) * #(tokens of the sequence routed to i)`, `P_i = mean_t s'_{i,t}` with the affinities
    normalized per token (`s' = s / sum_j s_j`). Averaged over sequences; with `per_sequence=False` the whole
    batch counts as one sequence. Only P carries a gradient. With `token_mask_BT` (1 = real token) padding is
    left out: T is each sequence's count of real tokens, and sequences without any are not averaged in.
    """
    B, T, E = scores_BTE.shape
    mask_BT = (torch.ones(B, T, device=scores_BTE.device, dtype=scores_BTE.dtype) if token_mask_BT is None
               else token_mask_BT.to(device=scores_BTE.device, dtype=scores_BTE.dtype))
    if not per_sequence:
        scores_BTE = scores_BTE.reshape(1, -1, E)
        topk_idx_BTK = topk_idx_BTK.reshape(1, -1, topk_idx_BTK.shape[-1])
        mask_BT = mask_BT.reshape(1, -1)
    B, T, _ = scores_BTE.shape
    K = topk_idx_BTK.shape[-1]
    tokens_B = mask_BT.sum(dim=1)
    p_BE = ((scores_BTE / scores_BTE.sum(dim=-1, keepdim=True)) * mask_BT[..., None]).sum(dim=1)
    counts_BE = torch.zeros(B, E, device=scores_BTE.device, dtype=scores_BTE.dtype)
    counts_BE.scatter_add_(1, topk_idx_BTK.reshape(B, T * K), mask_BT.repeat_interleave(K, dim=1))
    # f_i * P_i with f = E / (K * T_b) * count and P = sum / T_b.
    per_sequence_B = (counts_BE * p_BE).sum(dim=-1) * E / K / tokens_B.clamp(min=1) ** 2
    has_tokens_B = (tokens_B > 0).to(per_sequence_B.dtype)
    return alpha * (per_sequence_B * has_tokens_B).sum() / has_tokens_B.sum().clamp(min=1)


class PendingMoEOutput:
    """A MoE layer's decode-step output left in its parts, for the next decoder layer's first kernel to sum: the
    experts' float32 outputs y_PD [T * (K + S), D] (K routed pairs, then S shared parts per token), the routing
    weights [T, K] and the residual stream [B, T, D]. `moe_combine(y_PD, weight_TK, None, residual, S)` is the
    output; `linear_pair(..., combine=)` computes it inside the q_a/kv_a pass with the layer's input norm (one
    launch less a MoE layer), and after the last layer `moe_combine(..., norm=)` applies the final norm with it.
    Only `DeepseekV3Model`'s layer loop makes one, for a reader that takes it (`_passes_moe_parts`);
    `materialize()` sums it for any other."""

    def __init__(self, y_PD: torch.Tensor, weight_TK: torch.Tensor, residual: torch.Tensor, shared_parts: int):
        self.y_PD, self.weight_TK, self.residual, self.shared_parts = y_PD, weight_TK, residual, shared_parts
        self.summed = None  # the output [B, T, D], once a kernel has summed it

    @property
    def shape(self) -> torch.Size:
        return self.residual.shape

    def materialize(self) -> torch.Tensor:
        if self.summed is None:
            D = self.residual.shape[-1]
            self.summed = moe_combine(self.y_PD, self.weight_TK, None, self.residual.reshape(-1, D),
                                      self.shared_parts).view(self.residual.shape)
        return self.summed

    def normed(self, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
        """`rms_norm(output)` in one launch (the model's final norm after its last layer; the output is not kept)."""
        D = self.residual.shape[-1]
        return moe_combine(self.y_PD, self.weight_TK, None, self.residual.reshape(-1, D), self.shared_parts,
                           norm=norm).view(self.residual.shape)

    def normed_products(self, w1: torch.Tensor, w2: torch.Tensor | None, norm: tuple[torch.Tensor, float]):
        """`linear_pair(rms_norm(output), w1, w2)` in one launch that also writes the output (`summed`)."""
        products, self.summed = linear_pair(self.y_PD, w1, w2, norm=norm, residual=self.residual,
                                            combine=(self.weight_TK, self.shared_parts))
        return products


class DeepseekV3MoE(nn.Module):
    """DeepSeekMoE: `y = x_shared + sum_k g_k * expert_k(x)` over the K routed experts of each token."""

    def __init__(self, config: DeepseekV3Config, layer_idx: int | None = None):
        super().__init__()
        self.config = config
        self.gate = DeepseekV3TopkRouter(config, layer_idx)
        self.experts = DeepseekV3Experts(config)
        self.shared_experts = (
            DeepseekV3MLP(config, intermediate_size=config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )

    def forward(
        self, hidden_states: torch.Tensor, token_mask_BT: torch.Tensor | None = None,
        residual: torch.Tensor | None = None, post_attention_norm: nn.Module | None = None,
        defer_combine: bool = False,
    ) -> tuple[torch.Tensor | PendingMoEOutput, torch.Tensor | None]:
        """hidden_states [B, T, D], token_mask_BT [B, T] (1 = real token; padding is routed but not counted in the
        expert load nor in the balance loss), residual [B, T, D] or None (added to the output: the decoder layer's
        residual stream, summed inside the combine kernel at decode sizes) -> (output [B, T, D], sequence balance
        loss or None outside training).

        With `post_attention_norm` (only where `routes_after_add_norm`), hidden_states is the attention's output and
        residual the stream before it: the input is `post_attention_norm(residual + hidden_states)` and the output
        adds `residual + hidden_states`, both computed inside the router's pass. `defer_combine`: on the decode
        kernels' path with the shared experts inside the experts' kernels (or none), the output is returned as a
        `PendingMoEOutput` (the caller's next kernel sums it)."""
        B, T, D = hidden_states.shape
        x_TD = hidden_states.reshape(-1, D)
        token_mask_T = token_mask_BT.reshape(-1) if token_mask_BT is not None else None
        if post_attention_norm is not None and not (
            residual is not None and self.routes_after_add_norm(residual, hidden_states, post_attention_norm)
        ):
            raise ValueError("DeepseekV3MoE: post_attention_norm is for the decode kernels' path only (see "
                             "routes_after_add_norm); add and normalize before calling the MoE instead")
        if residual is not None and self._decode_combine(x_TD):
            # decode_kernels: router (2 launches), routed and shared experts (2: the shared experts' S parts of
            # expert width ride along as S more pairs per token; 2 more launches where their weights are not
            # plain), then the weighted sum, the shared output and the residual in one combine.
            if post_attention_norm is not None:
                topk_idx, topk_weight, residual, x_TD = self.gate.route_after_add_norm(
                    x_TD, residual.reshape(-1, D), post_attention_norm
                )
                hidden_states = x_TD.view(B, T, D)
            else:
                topk_idx, topk_weight, _ = self.gate(x_TD, token_mask_T)
            if self.shared_experts is None or self._shared_in_expert_kernels(x_TD):
                y_PD = self.experts._triton_pairs(x_TD, topk_idx, self.shared_experts)
                parts = self.config.n_shared_experts if self.shared_experts is not None else 0
                if defer_combine:
                    return PendingMoEOutput(y_PD, topk_weight, residual.reshape(B, T, D), parts), None
                return moe_combine(y_PD, topk_weight, None, residual.reshape(-1, D), parts).view(B, T, D), None
            y_PD = self.experts._triton_pairs(x_TD, topk_idx)
            shared = self.shared_experts(hidden_states).reshape(-1, D) if self.shared_experts is not None else None
            return moe_combine(y_PD, topk_weight, shared, residual.reshape(-1, D)).view(B, T, D), None
        out, aux_loss = self._forward(hidden_states, x_TD, token_mask_BT, token_mask_T)
        return (out if residual is None else residual + out), aux_loss

    def routes_after_add_norm(self, residual: torch.Tensor, delta: torch.Tensor, norm: nn.Module) -> bool:
        """Whether `forward(delta, ..., residual=residual, post_attention_norm=norm)` can run the decoder layer's
        residual add and post-attention norm inside the router's pass (decode kernels, a few tokens, V3's routing,
        a plain norm, residual and delta alike)."""
        x_TD = delta.reshape(-1, delta.shape[-1])
        return bool(
            self._decode_combine(x_TD)
            and self.gate._use_fused_selection(x_TD)
            and _plain_norm(norm, delta)
            and residual.shape == delta.shape
            and residual.dtype == delta.dtype
            and residual.stride(-1) == 1
        )

    def _shared_in_expert_kernels(self, x_TD: torch.Tensor) -> bool:
        """The shared experts can run inside the routed experts' kernels: plain SiLU MLP weights in the experts'
        dtype, n_shared_experts parts of the routed experts' width."""
        shared = self.shared_experts
        return bool(
            type(shared) is DeepseekV3MLP
            and self.config.hidden_act == "silu"
            and all(_plain_weight(lin, x_TD) for lin in (shared.gate_proj, shared.up_proj, shared.down_proj))
            and shared.gate_proj.weight.dtype == self.experts.gate_up_proj.dtype
            and shared.gate_proj.out_features == self.config.n_shared_experts * self.config.moe_intermediate_size
            and all(lin.weight.is_contiguous() for lin in (shared.gate_proj, shared.up_proj, shared.down_proj))
        )

    def _decode_combine(self, x_TD: torch.Tensor) -> bool:
        return (
            _use_decode_kernels(self.config, self, x_TD)
            and x_TD.shape[0] <= MAX_GEMV_TOKENS
            and type(self.experts) is DeepseekV3Experts
            and self.experts.implementation(x_TD, x_TD.shape[0] * self.gate.top_k) == "triton"
        )

    def _forward(self, hidden_states, x_TD, token_mask_BT, token_mask_T):
        B, T, D = hidden_states.shape
        chunk = _inference_chunks(self, B * T)
        if chunk is not None:
            # Tokens are routed independently: chunk by chunk gives each token the same experts and weights.
            out_TD = torch.empty_like(x_TD)
            for start in range(0, B * T, chunk):
                part = slice(start, start + chunk)
                topk_idx, topk_weight, _ = self.gate(x_TD[part], token_mask_T[part] if token_mask_T is not None else None)
                out_TD[part] = self.experts(x_TD[part], topk_idx, topk_weight)
            out = out_TD.view(B, T, D)
        else:
            topk_idx, topk_weight, scores = self.gate(x_TD, token_mask_T)
            out = self.experts(x_TD, topk_idx, topk_weight).to(hidden_states.dtype).view(B, T, D)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        aux_loss = None
        if self.training and self.config.aux_loss_alpha > 0:
            aux_loss = sequence_balance_loss(
                scores.view(B, T, -1), topk_idx.view(B, T, -1), self.config.aux_loss_alpha, self.config.seq_aux,
                token_mask_BT,
            )
        return out, aux_loss


# ----------------------------------------------------------------------------------------------------------------
# Decoder layer and Multi-Token Prediction layer
# ----------------------------------------------------------------------------------------------------------------


class DeepseekV3DecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: `h = x + MLA(norm(x))`, `out = h + FFN(norm(h))`, FFN dense or DeepSeekMoE."""

    def __init__(self, config: DeepseekV3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = DeepseekV3Attention(config, layer_idx)
        self.mlp = DeepseekV3MoE(config, layer_idx) if config.is_moe_layer(layer_idx) else DeepseekV3MLP(config)
        self.input_layernorm = DeepseekV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps, config=config)
        self.post_attention_layernorm = DeepseekV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps, config=config)

    def forward(
        self,
        hidden_states: torch.Tensor | PendingMoEOutput,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_bias: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_absorbed: bool = False,
        token_mask: torch.Tensor | None = None,
        defer_moe_combine: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor | PendingMoEOutput, torch.Tensor | None]:
        """[B, T, D] -> ([B, T, D], balance loss of this layer or None). `token_mask` [B, T] (1 = real token) keeps
        padding out of the MoE's load counts and balance loss. On the decode kernels' path, the input may be the
        previous MoE layer's `PendingMoEOutput` (summed inside this layer's first kernel where
        `takes_pending_input` holds), and with `defer_moe_combine` this MoE layer's output may be one."""
        norm = self.input_layernorm
        if isinstance(hidden_states, PendingMoEOutput):
            if self.takes_pending_input(hidden_states.residual):
                # decode kernels: the previous layer's MoE sum and this layer's input norm inside the first kernel
                pending = hidden_states
                hidden_states = self.self_attn(pending, position_embeddings, attention_bias, past_key_values,
                                               use_absorbed, input_norm=(norm.weight, norm.variance_epsilon))
                return self._feed_forward(pending.summed, hidden_states, token_mask, defer_moe_combine)
            hidden_states = hidden_states.materialize()
        residual = hidden_states
        if self.self_attn.fuses_input_norm(hidden_states, norm):  # decode kernels: the norm inside the first one
            hidden_states = self.self_attn(hidden_states, position_embeddings, attention_bias, past_key_values,
                                           use_absorbed, input_norm=(norm.weight, norm.variance_epsilon))
        else:
            hidden_states = self.self_attn(
                norm(hidden_states), position_embeddings, attention_bias, past_key_values, use_absorbed
            )
        return self._feed_forward(residual, hidden_states, token_mask, defer_moe_combine)

    def takes_pending_input(self, x: torch.Tensor) -> bool:
        """Whether `forward` sums a `PendingMoEOutput` shaped as x (its residual) inside its first kernel: the
        attention takes the decode kernels' path with this layer's input norm inside (`fuses_input_norm`)."""
        return self.self_attn.fuses_input_norm(x, self.input_layernorm)

    def _feed_forward(self, residual, hidden_states, token_mask, defer_moe_combine):
        # The attention's output `hidden_states` added to the stream `residual`, then the post-attention norm and
        # the MLP or MoE, whose output is added as well.
        norm = self.post_attention_layernorm
        if isinstance(self.mlp, DeepseekV3MoE) and self.mlp.routes_after_add_norm(residual, hidden_states, norm):
            # decode_kernels: the residual add and the norm inside the router's pass.
            return self.mlp(hidden_states, token_mask, residual=residual, post_attention_norm=norm,
                            defer_combine=defer_moe_combine)
        if _use_decode_kernels(norm.config, norm, hidden_states) and _plain_norm(norm, hidden_states) and (
            hidden_states.numel() <= MAX_GEMV_TOKENS * hidden_states.shape[-1] and residual.stride(-1) == 1
        ):
            # decode_kernels: the residual add and the norm in one pass.
            residual, normed = add_rms_norm(residual, hidden_states, norm.weight, norm.variance_epsilon)
        else:
            residual = residual + hidden_states
            normed = norm(residual)
        if isinstance(self.mlp, DeepseekV3MoE):
            return self.mlp(normed, token_mask, residual=residual, defer_combine=defer_moe_combine)
        return residual + self.mlp(normed), None


class DeepseekV3MTPSharedHead(nn.Module):
    """The MTP output head: its own final norm; the projection is the main model's `lm_head` (shared)."""

    def __init__(self, config: DeepseekV3Config):
        super().__init__()
        self.norm = DeepseekV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps, config=config)


def _drop_mtp_shared_copies(module, state_dict, prefix, *args):
    """`load_state_dict` pre-hook: the checkpoint's copies of the shared embedding and head are not parameters."""
    for name in ("embed_tokens.weight", "shared_head.head.weight"):
        state_dict.pop(prefix + name, None)


class DeepseekV3MTPLayer(DeepseekV3DecoderLayer):
    """Multi-Token Prediction module k (paper section 2.2), stored as `model.layers.{num_hidden_layers + k}`.

    `h'_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)])` (embedding first, as the official weights are read
    by vLLM and SGLang), `h^k = TRM_k(h')`, logits `= lm_head(shared_head.norm(h^k))` predict `t_{i+k+1}`.
    The embedding and `lm_head` are the main model's; the checkpoint's stored copies are skipped on load and
    written back on save.
    """

    def __init__(self, config: DeepseekV3Config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.enorm = DeepseekV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps, config=config)
        self.hnorm = DeepseekV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps, config=config)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = DeepseekV3MTPSharedHead(config)
        self.register_load_state_dict_pre_hook(_drop_mtp_shared_copies)

    def forward(
        self,
        input_embeds: torch.Tensor,
        previous_hidden: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_bias: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_absorbed: bool = False,
        token_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """input_embeds [B, T, D] (embeddings of t_{i+k}), previous_hidden [B, T, D] (h^{k-1}_i) -> (h^k [B, T, D],
        balance loss or None). Apply `shared_head.norm` and `lm_head` for the logits."""
        h_prime = self.eh_proj(torch.cat((self.enorm(input_embeds), self.hnorm(previous_hidden)), dim=-1))
        return super().forward(h_prime, position_embeddings, attention_bias, past_key_values, use_absorbed, token_mask)


# ----------------------------------------------------------------------------------------------------------------
# Pretrained model, base model, causal LM
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class DeepseekV3ModelOutputWithPast(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus `aux_loss`: the summed sequence-wise balance loss of the MoE layers
    (training only, None otherwise)."""

    aux_loss: torch.FloatTensor | None = None


@dataclass
class DeepseekV3CausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` with the parts of `loss = lm_loss + mtp_loss + aux_loss` exposed.

    lm_loss: next-token cross-entropy of the main model. mtp_loss: `lambda / D * sum_k CE_k` of the MTP modules
    (None when they did not run). aux_loss: sequence-wise balance loss (training only). mtp_logits: one
    [B, T - k, vocab] tensor per MTP depth k, position i predicting token i + k + 1.
    """

    lm_loss: torch.FloatTensor | None = None
    mtp_loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    mtp_logits: tuple[torch.FloatTensor, ...] | None = None


class DeepseekV3PreTrainedModel(PreTrainedModel):
    config_class = DeepseekV3Config
    config: DeepseekV3Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeepseekV3DecoderLayer", "DeepseekV3MTPLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False
    # The balancing bias decides top-k by differences far below bf16 resolution.
    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]
    _keys_to_ignore_on_load_unexpected = [MTP_SHARED_COPY_PATTERN]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, DeepseekV3TopkRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.expert_load)
            if module.e_score_correction_bias is not None:
                init.zeros_(module.e_score_correction_bias)
        elif isinstance(module, DeepseekV3Experts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, DeepseekV3RotaryEmbedding):
            inv_freq, _ = compute_rope_inv_freq(module.config)
            init.copy_(module.inv_freq, inv_freq)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, plus the official FP8 release.

        A checkpoint whose config says `quantization_config.quant_method == "fp8"` (DeepSeek-V3, R1, V3-0324,
        V3.1 as published) is loaded by this package's streaming dequantizer (`official_checkpoint.py`): every
        FP8 weight becomes `fp8 * weight_scale_inv` on the 128x128 ceil grid, computed in float32 and rounded
        once to `dtype` (bfloat16 by default, or float32), one shard at a time, placed by `device_map` (None, a
        device, "auto"/"balanced"/"sequential" with `max_memory`, or a dict). The result is a plain model whose
        config no longer has a `quantization_config`.

        `quantization_config=BitsAndBytesConfig(load_in_4bit=True | load_in_8bit=True, ...)` takes the same
        streaming path, from the FP8 release or a BF16/FP32 official-layout folder: every linear and the routed
        experts are quantized on their device as they are read (quantization.py; transformers' own bitsandbytes
        path would leave the fused experts in bf16). Everything else goes to transformers unchanged.
        """
        from .quantization import bitsandbytes_config

        config = kwargs.get("config")
        if not isinstance(config, PretrainedConfig):  # a path or None: peek at config.json
            hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
            config = cls.config_class.from_pretrained(config or pretrained_model_name_or_path, **hub_kwargs)
        quantization = kwargs.get("quantization_config")
        bitsandbytes = quantization is not None and bitsandbytes_config(quantization) is not None
        if not bitsandbytes and (fp8_quantization_config(config) is None or quantization is not None):
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        if model_args:
            raise TypeError("from_pretrained: positional model arguments are not supported for FP8 or bitsandbytes loads")
        return _load_streaming(cls, pretrained_model_name_or_path, config, dict(kwargs))

    def expert_routers(self) -> list:
        """The routers of every MoE layer (MTP layers included), in layer order."""
        return [m for m in self.modules() if isinstance(m, DeepseekV3TopkRouter)]

    @contextlib.contextmanager
    def tracking_expert_load(self):
        """Count routed tokens per expert in this block even outside training (for evaluation statistics)."""
        routers = self.expert_routers()
        previous = [router.track_load for router in routers]
        for router in routers:
            router.track_load = True
        try:
            yield self
        finally:
            for router, flag in zip(routers, previous):
                router.track_load = flag

    @torch.no_grad()
    def expert_load_statistics(self, reset: bool = False) -> dict:
        """Load balance of the tokens counted since the last reset: per layer `layer_{i}/max_over_mean_load`
        (busiest expert's token count over the mean) and `layer_{i}/bias_norm`, and overall `max_over_mean_load`
        (mean over layers), `max_over_mean_load_worst`, `bias_norm` and `tokens_routed`. Counts are summed over
        data-parallel ranks when torch.distributed is initialized."""
        routers = self.expert_routers()
        return self._load_statistics(routers, [_all_reduced(router.expert_load) for router in routers], reset)

    def _load_statistics(self, routers: list, loads: list, reset: bool, as_tensors: bool = False) -> dict:
        """The statistics of `expert_load_statistics` from `loads` (one per router), computed on the device in
        float64 (token totals stay exact past 2**24). `as_tensors`: 0-dim device tensors, no host sync; else
        Python floats (one sync)."""
        if not routers:
            nan = float("nan")
            return {"max_over_mean_load": nan, "max_over_mean_load_worst": nan, "bias_norm": 0.0, "tokens_routed": 0.0}
        device = loads[0].device
        load_LE = torch.stack([load.to(device, torch.float64) for load in loads])
        bias_L = torch.stack([
            router.e_score_correction_bias.to(device, torch.float64).norm()
            if router.e_score_correction_bias is not None else torch.zeros((), dtype=torch.float64, device=device)
            for router in routers
        ])
        total_L = load_LE.sum(dim=1)
        ratio_L = load_LE.amax(dim=1) / load_LE.mean(dim=1)  # NaN (0 / 0) where a layer counted no token
        counted_L = total_L > 0
        nan = torch.full((), float("nan"), dtype=torch.float64, device=device)
        stats = {}
        for router, ratio, bias_norm in zip(routers, ratio_L, bias_L):
            stats[f"layer_{router.layer_idx}/max_over_mean_load"] = ratio
            stats[f"layer_{router.layer_idx}/bias_norm"] = bias_norm
        stats["max_over_mean_load"] = ratio_L.nan_to_num(0.0).sum() / counted_L.sum()  # NaN when none counted
        worst = torch.where(counted_L, ratio_L, -torch.inf).amax()
        stats["max_over_mean_load_worst"] = torch.where(counted_L.any(), worst, nan)
        stats["bias_norm"] = bias_L.square().sum().sqrt()
        stats["tokens_routed"] = total_L.sum()
        if reset:
            for router in routers:
                router.expert_load.zero_()
        return stats if as_tensors else statistics_to_host(stats)

    @torch.no_grad()
    def update_expert_bias(self, as_tensors: bool = False) -> dict:
        """The auxiliary-loss-free balancing step (paper section 2.1.2), to call after every optimizer step.

        For every MoE layer, with `load_i` the tokens routed to expert i since the last call (all micro-batches of
        the step, summed over data-parallel ranks): `b_i += gamma * sign(mean(load) - load_i)`, gamma =
        `config.bias_update_speed` (0 keeps the bias and still reports). A layer that counted no token has
        `sign(0 - 0) = 0` everywhere and keeps its bias. Resets the counts and returns `expert_load_statistics()`
        of the step (measured before the update); `as_tensors=True` returns them as 0-dim device tensors, so that
        the update runs without a host sync (the Trainer callback reads them when it logs).
        """
        gamma = self.config.bias_update_speed
        routers = self.expert_routers()
        loads = [_all_reduced(router.expert_load) for router in routers]  # one all-reduce per layer and step
        for router, load in zip(routers, loads):
            if gamma and router.e_score_correction_bias is not None:
                router.e_score_correction_bias.add_(torch.sign(load.mean() - load), alpha=gamma)
        return self._load_statistics(routers, loads, reset=True, as_tensors=as_tensors)

    def save_pretrained(self, save_directory, *args, state_dict: dict | None = None, **kwargs):
        """`PreTrainedModel.save_pretrained` in the official layout: per-expert keys (reverted by transformers'
        conversion machinery) plus the MTP layers' copies of the shared embedding and head."""
        if getattr(self, "is_loaded_in_4bit", False) or getattr(self, "is_loaded_in_8bit", False):
            raise NotImplementedError(
                "save_pretrained: a bitsandbytes-quantized DeepseekV3 model has no official-layout form; save the "
                "LoRA adapter (PeftModel.save_pretrained), or load the checkpoint without quantization_config, "
                "apply the adapter, merge_and_unload() and save that"
            )
        if state_dict is None and self.config.num_nextn_predict_layers > 0:
            state_dict = mtp_shared_copies(self, self.state_dict())
        return super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)


def statistics_to_host(stats: dict) -> dict:
    """A dict of 0-dim tensors (on one device) or numbers as Python floats, with one host sync."""
    tensors = {key: value for key, value in stats.items() if torch.is_tensor(value)}
    if not tensors:
        return dict(stats)
    values = torch.stack([value.to(torch.float64) for value in tensors.values()]).tolist()
    return {**stats, **dict(zip(tensors, values))}


def _all_reduced(load: torch.Tensor) -> torch.Tensor:
    """`load` summed over the ranks of the default process group (itself when not distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        load = load.clone()
        torch.distributed.all_reduce(load)
    return load


_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
_IGNORED_FP8_KWARGS = ("low_cpu_mem_usage", "trust_remote_code", "use_safetensors", "code_revision", "adapter_kwargs")


def _load_streaming(model_class, name_or_path, config, kwargs):
    """The FP8 and bitsandbytes branch of `from_pretrained`: resolve the folder and keyword arguments, then
    stream-load."""
    kwargs.pop("config", None)
    quantizer = None
    if kwargs.get("quantization_config") is not None:
        from .quantization import BitsAndBytesQuantizer, bitsandbytes_config

        quantizer = BitsAndBytesQuantizer(bitsandbytes_config(kwargs.pop("quantization_config")))
    dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
    if dtype in (None, "auto"):
        dtype = torch.bfloat16
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if dtype not in (torch.bfloat16, torch.float32, torch.float16):
        raise ValueError(f"from_pretrained(dtype=...): expected bfloat16, float32 or float16 for an FP8 checkpoint, found {dtype}")
    device_map = kwargs.pop("device_map", None)
    if device_map is None and quantizer is not None and torch.cuda.is_available():
        device_map = {"": torch.cuda.current_device()}  # as transformers places a bitsandbytes model
    max_memory = kwargs.pop("max_memory", None)
    attn_implementation = kwargs.pop("attn_implementation", None)
    hub_kwargs = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
    for key in _IGNORED_FP8_KWARGS + tuple(k for k in kwargs if k.startswith("_")):
        kwargs.pop(key, None)
    for key, value in kwargs.items():
        if not hasattr(config, key):
            raise TypeError(f"from_pretrained: unexpected keyword argument {key!r} (FP8 checkpoint)")
        setattr(config, key, value)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    folder = str(name_or_path)
    if not os.path.isdir(folder):
        from huggingface_hub import snapshot_download

        subfolder = hub_kwargs.pop("subfolder", None)
        allow = ["*.json", "*.safetensors", "*.py", "*token*", "*.model", "*.txt"]
        folder = snapshot_download(folder, allow_patterns=allow, **hub_kwargs)
        if subfolder:
            folder = os.path.join(folder, subfolder)
    elif hub_kwargs.get("subfolder"):
        folder = os.path.join(folder, hub_kwargs["subfolder"])
    return load_fp8_checkpoint(model_class, folder, config, dtype, device_map, max_memory, quantizer)


class DeepseekV3Model(DeepseekV3PreTrainedModel):
    """Embedding, `num_hidden_layers` decoder layers and the final norm. `layers` also holds the MTP modules at
    indices `num_hidden_layers ...` (their official keys); the forward runs only the main layers."""

    def __init__(self, config: DeepseekV3Config):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [DeepseekV3DecoderLayer(config, i) for i in range(config.num_hidden_layers)]
            + [
                DeepseekV3MTPLayer(config, config.num_hidden_layers + k)
                for k in range(config.num_nextn_predict_layers)
            ]
        )
        self.norm = DeepseekV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps, config=config)
        self.rotary_emb = DeepseekV3RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @property
    def mtp_layers(self) -> list[DeepseekV3MTPLayer]:
        return list(self.layers[self.config.num_hidden_layers :])

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> DeepseekV3ModelOutputWithPast:
        """Run the main decoder stack.

        Args:
            input_ids / inputs_embeds: [B, T] token ids or [B, T, D] embeddings (exactly one of them).
            attention_mask: [B, S] padding mask over past + new tokens (1 = token), or a 4D mask.
            position_ids: [B, T]; by default counted from the padding mask (left padding starts at 0) or from the
                cache length.
            past_key_values / cache: a transformers `Cache` (either name: transformers 5.17 passes the first, newer
                versions the second); layer i stores c_kv [B, 1, S, L] and k_pe [B, 1, S, R].
        Returns `last_hidden_state` [B, T, D] (after the final norm), the cache (field `CACHE_FIELD`) and the
        balance loss.
        """
        past_key_values = _the_cache(past_key_values, cache)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("DeepseekV3Model.forward: pass exactly one of input_ids or inputs_embeds")
        prologue = self._decode_prologue(input_ids, attention_mask, position_ids, past_key_values, use_cache)
        if prologue is not None:
            inputs_embeds = prologue[0]
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if not use_cache:
            past_key_values = None

        B, T, _ = inputs_embeds.shape
        # A static cache reports its length as a device tensor: everything below stays on the device (no host
        # sync), so the decode step can be captured in a CUDA graph.
        past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        if T > 1 and torch.is_tensor(past_seen):
            past_seen = int(past_seen)  # a prompt on a static cache: one host sync (decode steps keep the tensor)
        # (the prologue's bias and positions need no cache positions: two launches less)
        cache_position = None if prologue is not None else torch.arange(T, device=inputs_embeds.device) + past_seen
        kv_length = past_key_values.get_mask_sizes(T, 0)[0] if past_key_values is not None else T
        if T > 1:
            kv_length = min(kv_length, past_seen + T)  # a prompt attends only to the written slots of a static cache
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, cache_position, B)
        # A static cache reports its length as a tensor (no host sync) and is longer than the tokens seen.
        keys_are_exact = isinstance(past_seen, int) and kv_length == past_seen + T
        # A prompt with no past and no padding needs only causality: no [T, S] bias is built (O(T^2) memory at
        # long context), SDPA runs its causal kernels, and the attention reads only the first T keys of a static
        # cache (the rest are unwritten). One host sync per prompt (`.all()`), none in decode.
        causal_only = (
            T > 1 and past_seen == 0
            and (attention_mask is None or (attention_mask.dim() == 2 and bool(attention_mask.all())))
        )
        if prologue is not None:
            attention_bias, position_embeddings = prologue[2], prologue[1]
        else:
            attention_bias = None if causal_only else build_attention_bias(
                attention_mask, cache_position, kv_length, inputs_embeds.dtype, keys_are_exact
            )
            position_embeddings = self.rotary_emb(position_ids)
        form = self.config.attention_form
        has_past = T == 1 or (isinstance(past_seen, int) and past_seen > 0)
        use_absorbed = form == "absorbed" or (form == "auto" and past_key_values is not None and has_past)

        # The new tokens' padding mask (a view): padding is left out of the expert load and the balance loss.
        token_mask = attention_mask[:, -T:] if attention_mask is not None and attention_mask.dim() == 2 else None
        hidden_states = inputs_embeds
        aux_loss = None
        layers = self.layers[: self.config.num_hidden_layers]
        for i, layer in enumerate(layers):
            hidden_states, layer_aux = layer(
                hidden_states,
                position_embeddings,
                attention_bias,
                past_key_values=past_key_values,
                use_absorbed=use_absorbed,
                token_mask=token_mask,
                defer_moe_combine=_passes_moe_parts(layer, layers[i + 1] if i + 1 < len(layers) else self.norm,
                                                    hidden_states),
            )
            if layer_aux is not None:
                aux_loss = layer_aux if aux_loss is None else aux_loss + layer_aux
        if isinstance(hidden_states, PendingMoEOutput):  # decode kernels: the last MoE sum inside the final norm
            last_hidden_state = hidden_states.normed((self.norm.weight, self.norm.variance_epsilon))
        else:
            last_hidden_state = self.norm(hidden_states)
        return DeepseekV3ModelOutputWithPast(
            last_hidden_state=last_hidden_state, aux_loss=aux_loss, **{CACHE_FIELD: past_key_values}
        )

    def _decode_prologue(self, input_ids, attention_mask, position_ids, cache, use_cache):
        """decode_kernels, one new token per row on an initialized static cache, with a 2D padding mask over its
        slots and the positions given (as `DecodeGraph` runs the step): (embeddings, (cos, sin), bias) from one
        launch (`decode_prologue`), equal to the embedding, `rotary_emb` and `build_attention_bias` below; else
        None."""
        embed = self.embed_tokens
        if not (
            input_ids is not None and input_ids.dim() == 2 and input_ids.shape[1] == 1
            and _use_decode_kernels(self.config, self, input_ids)
            and use_cache is not False and isinstance(cache, Cache) and getattr(cache, "is_compileable", False)
            and torch.is_tensor(cache.get_seq_length())
            and attention_mask is not None and attention_mask.dim() == 2
            and attention_mask.shape == (input_ids.shape[0], cache.get_mask_sizes(1, 0)[0])
            and position_ids is not None and position_ids.shape == input_ids.shape
            and type(embed) is nn.Embedding and embed.max_norm is None and embed.weight.device == input_ids.device
            and self.rotary_emb.inv_freq.device == input_ids.device
        ):
            return None
        return decode_prologue(
            input_ids.long().contiguous(), embed.weight, position_ids.long().contiguous(), self.rotary_emb.inv_freq,
            self.rotary_emb.attention_scaling, attention_mask, cache.get_seq_length(),
        )


def _passes_moe_parts(layer: nn.Module, reader: nn.Module, x: "torch.Tensor | PendingMoEOutput") -> bool:
    """Whether `layer` may hand its MoE output as a `PendingMoEOutput` (x: the layer's input, of the output's shape)
    to `reader`, the next decoder layer (which sums it inside its first kernel) or the model's final norm (which
    applies itself in the sum's launch): a decode step (a few tokens) through plain modules with no hooks (a hook
    would see the parts, not the output)."""
    x = x.residual if isinstance(x, PendingMoEOutput) else x
    if not (
        x.numel() <= MAX_GEMV_TOKENS * x.shape[-1]
        and type(layer) is DeepseekV3DecoderLayer
        and isinstance(layer.mlp, DeepseekV3MoE)
        and type(reader) in (DeepseekV3DecoderLayer, DeepseekV3RMSNorm)
    ):
        return False
    modules = (layer, layer.mlp, reader) + ((reader.self_attn,) if type(reader) is DeepseekV3DecoderLayer else ())
    if any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") for m in modules):
        return False
    if type(reader) is DeepseekV3RMSNorm:
        return _use_decode_kernels(reader.config, reader, x) and _plain_norm(reader, x)
    return reader.takes_pending_input(x)


def positions_from_mask(attention_mask: torch.Tensor | None, cache_position: torch.Tensor, batch_size: int):
    """Position ids [B, T]: the count of real tokens before each token for a 2D padding mask over past + new
    tokens (the transformers convention: so a left-padded sequence gets the positions it would have alone), else
    the cache positions."""
    T = cache_position.shape[0]
    if attention_mask is None or attention_mask.dim() != 2:
        return cache_position[None].expand(batch_size, T)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions[:, -T:]


class DeepseekV3ForCausalLM(DeepseekV3PreTrainedModel, GenerationMixin):
    """DeepSeek-V3 with the LM head, the MTP training objective and `generate()`."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeepseekV3Config):
        super().__init__(config)
        self.model = DeepseekV3Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, **kwargs):
        """`generate()` with a static cache asks the model for its mask: the 2D padding mask is all the forward
        needs (it builds the latent-attention bias itself)."""
        return attention_mask

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        **kwargs,
    ) -> DeepseekV3CausalLMOutputWithPast:
        """Logits [B, T, vocab] (or the last `logits_to_keep` positions) and, with `labels` [B, T] (-100 = ignore;
        shifted inside as in every transformers causal LM), `loss = lm_loss + mtp_loss + aux_loss`.

        The MTP modules run when labels are given, `num_nextn_predict_layers > 0` and `mtp_loss_weight > 0`: depth
        k sees h^{k-1} at positions i < T - k and the embedding of token i + k, and is scored on token i + k + 1.
        The cache comes as `past_key_values` or `cache` and is returned in the field named by `CACHE_FIELD`.
        """
        past_key_values = _the_cache(past_key_values, cache)
        if labels is None and inputs_embeds is None and self._can_replay_decode(
            input_ids, attention_mask, past_key_values, use_cache
        ):
            graph = self._decode_graph(past_key_values, input_ids.shape[0])
            logits = graph.replay(input_ids, attention_mask, position_ids)
            return DeepseekV3CausalLMOutputWithPast(logits=logits, **{CACHE_FIELD: past_key_values})
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = lm_loss = mtp_loss = mtp_logits = None
        aux_loss = outputs.aux_loss
        if labels is not None:
            lm_loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            loss = lm_loss
            # Under gradient accumulation the Trainer passes the token count of the whole step and does not
            # divide by the number of micro-batches: every term is weighted by this micro-batch's share of tokens.
            num_items = kwargs.get("num_items_in_batch")
            if self.config.num_nextn_predict_layers > 0 and self.config.mtp_loss_weight > 0:
                mtp_loss, mtp_logits, mtp_aux = self._mtp_loss(
                    input_ids, inputs_embeds, attention_mask, position_ids, hidden_states, labels, num_items
                )
                if mtp_loss is not None:
                    loss = loss + mtp_loss
                if mtp_aux is not None:
                    aux_loss = mtp_aux if aux_loss is None else aux_loss + mtp_aux
            if aux_loss is not None:
                if num_items is not None:
                    aux_loss = aux_loss * (labels[:, 1:] != -100).sum() / num_items
                loss = loss + aux_loss
        return DeepseekV3CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            lm_loss=lm_loss,
            mtp_loss=mtp_loss,
            aux_loss=aux_loss,
            mtp_logits=mtp_logits,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )

    def _decode_graph_serves(self, input_ids: torch.Tensor | None) -> bool:
        """The captured decode graph can run this model's inference on `input_ids`: `config.cuda_graph_decode`,
        no grad, eval mode, a CUDA device (`DecodeGraph.serves`), and the whole model on that one device (a graph is
        captured on one device's stream: a `device_map` split over GPUs or with offloading runs the eager step)."""
        return bool(
            self.config.cuda_graph_decode
            and input_ids is not None
            and DecodeGraph.serves(input_ids)
            and len(set((getattr(self, "hf_device_map", None) or {"": 0}).values())) == 1
            and not self.training
            and not torch.is_grad_enabled()
        )

    def _can_replay_decode(self, input_ids, attention_mask, past_key_values, use_cache) -> bool:
        """Whether this call is a decode step the CUDA-graph path serves: `_decode_graph_serves`, one new token
        per row, a 2D padding mask, an initialized static cache (fixed-size tensors, length kept on the device)."""
        return bool(
            self._decode_graph_serves(input_ids)
            and use_cache is not False
            and input_ids.shape[1] == 1
            and attention_mask is not None
            and attention_mask.dim() == 2
            and isinstance(past_key_values, Cache)
            and getattr(past_key_values, "is_compileable", False)
            and all(getattr(layer, "is_initialized", False) for layer in past_key_values.layers)
            and not (input_ids.is_cuda and torch.cuda.is_current_stream_capturing())
        )

    def _sample(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                streamer=None, **model_kwargs):
        """generate()'s greedy and multinomial-sampling loop: where the captured decode graph serves the steps
        (`_can_sample_on_graph`), `sample_on_decode_graph` runs them without a host sync per token; otherwise
        transformers' own loop runs."""
        if self._can_sample_on_graph(input_ids, stopping_criteria, generation_config, synced_gpus, streamer,
                                     model_kwargs):
            return sample_on_decode_graph(
                self, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs
            )
        return super()._sample(
            input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=synced_gpus,
            streamer=streamer, **model_kwargs,
        )

    def _can_sample_on_graph(self, input_ids, stopping_criteria, generation_config, synced_gpus, streamer,
                             model_kwargs) -> bool:
        """The decode graph can run generate()'s loop: `_decode_graph_serves`, generate()'s own static cache (the
        steps run past the end write its slots only), a 2D padding mask over the prompt (and its 2D positions, if
        given), a length limit, and nothing that needs the host every token or more than the sequences back
        (streamer, `return_dict_in_generate`, `synced_gpus`, assisted decoding) nor model inputs the graph does not
        take (token_type_ids, ...)."""
        own = self.__dict__.get("_generate_static_cache")
        cache = _the_cache(model_kwargs.get("past_key_values"), model_kwargs.get("cache"))
        mask = model_kwargs.get("attention_mask")
        return bool(
            self._decode_graph_serves(input_ids)
            and not synced_gpus
            and streamer is None
            and not generation_config.return_dict_in_generate
            and not getattr(generation_config, "is_assistant", False)
            and generation_config.num_beams == 1
            and model_kwargs.get("use_cache") is not False
            and own is not None
            and cache is own[1]
            and mask is not None
            and mask.shape == input_ids.shape
            and getattr(model_kwargs.get("position_ids"), "shape", input_ids.shape) == input_ids.shape
            and stopping_criteria.max_length is not None
            and set(model_kwargs) <= GRAPH_SAMPLING_KWARGS
        )

    def _valid_auto_compile_criteria(self, model_kwargs, generation_config) -> bool:
        # generate() would torch.compile the forward for any static cache on CUDA (a minute of warm-up); the
        # captured decode graph serves those steps instead.
        if self.config.cuda_graph_decode:
            return False
        return super()._valid_auto_compile_criteria(model_kwargs, generation_config)

    def _prepare_static_cache(self, cache_implementation, batch_size, max_cache_len, prefill_chunk_size, model_kwargs):
        # generate() makes a fresh static cache per call; the captured decode graph is tied to the cache's
        # tensors, so reuse the previous call's cache (reset in place) when it has the same size.
        key = (cache_implementation, batch_size, max(max_cache_len, getattr(self, "_previous_max_cache_length", -1)),
               prefill_chunk_size)
        previous = self.__dict__.get("_generate_static_cache")
        if self.config.cuda_graph_decode and previous is not None and previous[0] == key:
            previous[1].reset()
            return previous[1]
        cache = super()._prepare_static_cache(
            cache_implementation, batch_size, max_cache_len, prefill_chunk_size, model_kwargs
        )
        self.__dict__["_generate_static_cache"] = (key, cache)
        return cache

    def _decode_graph(self, cache: Cache, batch_size: int, greedy_eos: tuple[int, ...] | None = None) -> "DecodeGraph":
        """The captured decode step for this static cache and batch size (captured on first use); `greedy_eos`:
        the step also picks the next token greedily, these ids ending a row (see DecodeGraph)."""
        graphs = self.__dict__.setdefault("_decode_graphs", {})
        for stale in [k for k, g in graphs.items() if g.cache_ref() is None]:
            del graphs[stale]  # its cache is gone: free the graph's memory pool and the cache tensors it holds
        # The graph records the kernels chosen at capture: a switch of `decode_kernels` needs its own capture.
        key = (id(cache), batch_size, self.config.decode_kernels, greedy_eos)
        graph = graphs.get(key)
        if graph is None or graph.cache_ref() is not cache:
            if len(graphs) >= 4:  # generate() reuses its static cache; do not accumulate stale graphs
                graphs.clear()
            graph = graphs[key] = DecodeGraph(self, cache, batch_size, greedy_eos=greedy_eos)
        return graph

    def _mtp_loss(self, input_ids, inputs_embeds, attention_mask, position_ids, hidden_states, labels, num_items=None):
        """`lambda / D * sum_k CE_k` over the MTP depths (paper eq. 21-25), their logits and balance losses."""
        config = self.config
        B, T, _ = hidden_states.shape
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, torch.arange(T, device=hidden_states.device), B)
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("DeepseekV3ForCausalLM: the MTP loss needs a 2D padding mask (or None) as attention_mask")
        depth_losses, depth_logits, aux_loss = [], [], None
        previous_hidden = hidden_states
        for k, layer in enumerate(self.model.mtp_layers, start=1):
            t_k = T - k
            if t_k < 2:
                break
            mask_k = attention_mask[:, :t_k] if attention_mask is not None else None
            cache_position = torch.arange(t_k, device=hidden_states.device)
            previous_hidden, layer_aux = layer(
                inputs_embeds[:, k:],
                previous_hidden[:, :t_k],
                self.model.rotary_emb(position_ids[:, :t_k]),
                build_attention_bias(mask_k, cache_position, t_k, hidden_states.dtype),
                # Position i is real when both its hidden state (i) and its input token (i + k) are.
                token_mask=mask_k * attention_mask[:, k:] if attention_mask is not None else None,
            )
            logits_k = self.lm_head(layer.shared_head.norm(previous_hidden))
            # labels[:, k:] shifted by one inside the loss: position i is scored on token i + k + 1.
            depth_losses.append(
                self.loss_function(
                    logits=logits_k, labels=labels[:, k:], vocab_size=config.vocab_size, num_items_in_batch=num_items
                )
            )
            depth_logits.append(logits_k)
            if layer_aux is not None:
                aux_loss = layer_aux if aux_loss is None else aux_loss + layer_aux
        if not depth_losses:
            return None, None, None
        mtp_loss = config.mtp_loss_weight / config.num_nextn_predict_layers * torch.stack(depth_losses).sum()
        return mtp_loss, tuple(depth_logits), aux_loss


# What generate() may hand its decoding loop that `sample_on_decode_graph` handles (anything else: transformers' loop).
GRAPH_SAMPLING_KWARGS = {
    "attention_mask", "position_ids", "use_cache", "cache", "past_key_values", "cache_position", "logits_to_keep",
    "inputs_embeds", "output_attentions", "output_hidden_states", "return_dict",
}
# Steps the host may run ahead of the stop flag it reads (more steps past the end; fewer: the GPU waits for the host).
STOP_CHECK_LAG = 2


def sample_on_decode_graph(model, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs):
    """generate()'s sampling loop, run on the decode graph: transformers' `_sample` step for step (the prefill, the
    logits processors, argmax or multinomial, finished rows padded, the stopping criteria, in that order), but
    without its host sync per token. transformers reads `unfinished.max() == 0` on the host after every token, so
    the GPU idles while the host prepares the next step. Here each step's stop flag is copied to pinned memory as
    the GPU produces it and read STOP_CHECK_LAG steps later, by which time it is done: the host stays ahead of the
    GPU. The steps run past the end are dropped; they only wrote generate()'s own static cache past the end, and
    the next call resets it.

    Plain greedy decoding (no logits processor; stopping on the length limit and end-of-sequence ids only) picks
    its tokens inside the graph: a step is then one replay, with none of the ~15 small kernels (and their launch
    gaps) that the processors, argmax, padding and criteria cost between replays. Everything else picks them with
    transformers' own processor and criteria objects, between the replays.

    input_ids [B, S0] (the prompt) -> sequences [B, S] (prompt + generated tokens, as `_sample` returns them)."""
    B, prompt_length = input_ids.shape
    max_length = stopping_criteria.max_length
    cache = _the_cache(model_kwargs.get("past_key_values"), model_kwargs.get("cache"))
    greedy_eos = _greedy_in_graph(logits_processor, stopping_criteria, generation_config)
    outputs = model._prefill(input_ids, generation_config, model_kwargs, is_first_iteration=True)
    logits_BV = outputs.logits[:, -1]
    del outputs
    pad_token_id = generation_config._pad_token_tensor
    if pad_token_id is not None:
        pad_token_id = pad_token_id.to(input_ids.device)
    has_eos_stopping_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    sequences = input_ids.new_zeros(B, max_length)
    sequences[:, :prompt_length] = input_ids
    unfinished_B = torch.ones(B, dtype=torch.long, device=input_ids.device)
    flags = LaggedStopFlags(max_length, input_ids.device)
    graph, length = None, prompt_length
    while flags.stop_length is None:
        scores_BV = logits_processor(sequences[:, :length], logits_BV.to(copy=True, dtype=torch.float32))
        if generation_config.do_sample:
            tokens_B = torch.multinomial(F.softmax(scores_BV, dim=-1), num_samples=1).squeeze(1)
        else:
            tokens_B = torch.argmax(scores_BV, dim=-1)
        if has_eos_stopping_criteria:
            tokens_B = tokens_B * unfinished_B + pad_token_id * (1 - unfinished_B)
        sequences[:, length] = tokens_B
        length += 1
        unfinished_B = unfinished_B & ~stopping_criteria(sequences[:, :length], None)
        flags.push(length, unfinished_B.max() == 0, last=length >= max_length)
        if flags.stop_length is not None:
            break
        if graph is None:
            graph = model._decode_graph(cache, B, greedy_eos=greedy_eos)
            graph.start(model_kwargs["attention_mask"], model_kwargs.get("position_ids"))
        if greedy_eos is not None:
            # The first token came from the prefill's logits; the graph picks the rest.
            graph.start_greedy(sequences[:, :length], unfinished_B, pad_token_id)
            while flags.stop_length is None:
                graph._run()  # reads the token at column length - 1, writes the next at column `length`
                length += 1
                if not greedy_eos:  # only the length limit stops it: no flag to read
                    flags.stop_length = max_length if length >= max_length else None
                elif graph.logs_stop:  # the step wrote its flag to pinned memory itself
                    flags.push(length, None, last=length >= max_length, written=graph.stop_log)
                else:
                    flags.push(length, graph.stopped, last=length >= max_length)
            sequences = graph.tokens
            break
        logits_BV = graph.advance(tokens_B, length - 1)[:, -1]
    return sequences[:, : flags.stop_length].clone()


def _greedy_in_graph(logits_processor, stopping_criteria, generation_config) -> tuple[int, ...] | None:
    """The end-of-sequence ids (() for none) when the decode graph can pick generate()'s tokens itself: greedy,
    no logits processor, and no stopping criterion but the length limit and end-of-sequence ids; else None."""
    from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

    if generation_config.do_sample or len(logits_processor) > 0:
        return None
    if not all(type(criteria) in (MaxLengthCriteria, EosTokenCriteria) for criteria in stopping_criteria):
        return None
    eos = [criteria.eos_token_id for criteria in stopping_criteria if type(criteria) is EosTokenCriteria]
    if eos and generation_config._pad_token_tensor is None:
        return None
    return tuple(int(i) for ids in eos for i in torch.as_tensor(ids).reshape(-1).tolist())


class LaggedStopFlags:
    """generate()'s stop decision read late: `push` copies a step's flag (all rows finished) to pinned memory
    without waiting, and reads the flags of the steps more than STOP_CHECK_LAG behind (all of them at the last
    step). `stop_length` is the sequence length at the first step whose flag is set (or the last step's)."""

    def __init__(self, max_length: int, device: torch.device):
        self.on_cuda = device.type == "cuda"
        self.host = torch.zeros(max_length + 1, dtype=torch.bool, pin_memory=self.on_cuda)
        self.pending = collections.deque()  # (length, event, the flags' buffer) of the flags not read yet
        self.stop_length = None

    def push(self, length: int, stopped: torch.Tensor | None, last: bool, written: torch.Tensor | None = None):
        """The flag of the step that made the sequence `length` long: `stopped` (a 0-dim device bool), or with
        `written`, the pinned buffer the step itself writes it into at [length] (`DecodeGraph.stop_log`)."""
        if written is None:
            written = self.host
            written[length].copy_(stopped, non_blocking=True)
        event = None
        if self.on_cuda:
            event = torch.cuda.Event()
            event.record()
        self.pending.append((length, event, written))
        while self.stop_length is None and self.pending and (last or len(self.pending) > STOP_CHECK_LAG):
            flag_length, event, flags = self.pending.popleft()
            if event is not None:
                event.synchronize()
            if flags[flag_length]:
                self.stop_length = flag_length
        if self.stop_length is None and last:
            self.stop_length = length


def restore_cache_tensors(cache: Cache, tensors: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Put each static cache layer's contents back into the tensors a captured graph addresses (`tensors`, one
    (keys, values) pair per layer), where something replaced them: beam search's `reorder_cache` assigns
    `index_select` copies, which the graph would never see (it would keep writing and reading the old ones)."""
    for layer, (keys, values) in zip(cache.layers, tensors):
        if layer.keys is not keys:
            keys.copy_(layer.keys)
            layer.keys = keys
        if layer.values is not values:
            values.copy_(layer.values)
            layer.values = values


class DecodeGraph:
    """One decode step (batch B, one new token per row) on a static cache, captured as a CUDA graph.

    The eager step costs ~30 kernel launches and their Python per layer; replaying the graph costs one launch.
    Inputs are copied into fixed buffers: the token ids [B, 1] and the padding mask padded to the cache length
    [B, S] (zeros past the tokens seen, so the mask of every step has the same shape). Inside the graph the new
    token's position is `mask.sum(-1) - 1`, the cache writes at its device-side length, and the attention bias
    comes from the mask and that length: no host sync, no shape that changes between steps. The eager forward
    stays the reference (`config.cuda_graph_decode=False`), and a GPU test holds the two equal.
    """

    captures = 0  # graphs captured in this process (a reused generate() cache must not add any)

    @staticmethod
    def serves(x: torch.Tensor) -> bool:
        """Whether decode steps on `x`'s device are captured (CUDA) rather than run eagerly."""
        return x.is_cuda

    def __init__(self, model: "DeepseekV3ForCausalLM", cache: Cache, batch_size: int, capture: bool | None = None,
                 greedy_eos: tuple[int, ...] | None = None):
        self.model = model
        self.cache_ref = weakref.ref(cache)
        self.mask_length = cache.get_mask_sizes(1, 0)[0]
        device = model.lm_head.weight.device
        self.input_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.mask = torch.zeros(batch_size, self.mask_length, dtype=torch.long, device=device)
        # The graph reads and writes these tensors by address: held here so that they outlive a beam search's
        # `reorder_cache` (which replaces them in the cache); `_decode_graph` drops the graph once the cache is gone.
        self.cache_tensors = [(layer.keys, layer.values) for layer in cache.layers]
        self.greedy = greedy_eos is not None
        if self.greedy:  # see `_pick_greedy`
            self.tokens = torch.zeros(batch_size, self.mask_length + 1, dtype=torch.long, device=device)
            self.column = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
            self.unfinished = torch.ones(batch_size, dtype=torch.long, device=device)
            self.pad = torch.zeros((), dtype=torch.long, device=device)
            self.eos = torch.tensor(greedy_eos, dtype=torch.long, device=device) if greedy_eos else None
            self.stopped = torch.zeros((), dtype=torch.bool, device=device)
            # `stopped` again at each step's sequence length, written by the decode kernels' greedy pick straight into
            # pinned memory (generate() reads it with no copy); `logs_stop` once a step has written it.
            self.stop_log = torch.zeros(self.mask_length + 2, dtype=torch.bool, pin_memory=device.type == "cuda")
            self.logs_stop = False
        self.graph = None
        if capture is None:
            capture = self.input_ids.is_cuda
        if capture:  # capture=False runs the same step on the same buffers eagerly (the reference, and the CPU)
            self._capture(cache)

    def _capture(self, cache):
        DecodeGraph.captures += 1
        device = self.input_ids.device
        lengths = [layer.cumulative_length.clone() for layer in cache.layers]
        # Warm up on a side stream (allocations and lazy initialization happen outside the capture), then capture.
        # A warm-up step writes the next cache slot and advances the device-side length: the length is restored
        # after each one, so they all write the slot the first real step writes again (the cache may have only
        # that slot left: generate() sizes it to the last token).
        self.mask[:, 0] = 1
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(cache)
                for layer, length in zip(cache.layers, lengths):
                    layer.cumulative_length.copy_(length)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records the step; nothing runs, the length stays as restored
            self.logits = self._step(cache)
        self.graph = graph

    def _step(self, cache):
        hidden = self.model.model(
            input_ids=self.input_ids, attention_mask=self.mask, position_ids=self.position_ids, past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        logits = self.model.lm_head(hidden)
        if self.greedy:
            self._pick_greedy(logits)
        return logits

    def _pick_greedy(self, logits_B1V: torch.Tensor) -> None:
        """generate()'s greedy step on the device, as transformers' `_sample` without processors: the argmax of
        the float32 logits, finished rows padded, the token appended (at `column + 1`) and fed as the next input
        (mask column set, position + 1), the rows that produced an end-of-sequence id finished, and `stopped` set
        once all rows are."""
        logits_BV = logits_B1V[:, -1]
        kernels = _use_decode_kernels(self.model.config, self.model, logits_BV) and logits_BV.stride(-1) == 1
        if kernels and logits_BV.shape[0] <= GREEDY_MAX_ROWS:
            # decode_kernels: the argmax's two passes, the second doing the bookkeeping below (about eight small
            # torch kernels less a step)
            eos = (self.eos, self.unfinished, self.pad, self.stopped, self.stop_log) if self.eos is not None else None
            greedy_pick_(logits_BV, self.tokens, self.column, self.mask, self.position_ids, self.input_ids, eos)
            self.logs_stop = eos is not None
            return
        if kernels:
            next_B = argmax_rows(logits_BV)  # decode_kernels: two passes instead of torch's one slow reduction
        else:
            next_B = logits_BV.argmax(dim=-1)  # bf16 and float32 compare alike: no float32 copy
        if self.eos is not None:
            next_B = next_B * self.unfinished + self.pad * (1 - self.unfinished)
            ended_B = (next_B[:, None] == self.eos[None, :]).any(dim=-1)
            self.unfinished.copy_(self.unfinished & ~ended_B)
            self.stopped.copy_(self.unfinished.max() == 0)
        self.column += 1
        self.tokens.scatter_(1, self.column, next_B[:, None])
        # Past the cache (the token at the length limit, never fed): the last column, which nothing reads again.
        self.mask.scatter_(1, self.column.clamp(max=self.mask_length - 1), 1)
        self.position_ids += 1
        self.input_ids.copy_(next_B[:, None])

    def start_greedy(self, sequences_BS: torch.Tensor, unfinished_B: torch.Tensor, pad_token_id) -> None:
        """After `start`: the sequences so far [B, S] (prompt + the first generated token, which is fed next at
        column S - 1), the rows not finished [B], the padding id of finished rows (a tensor or None)."""
        length = sequences_BS.shape[1]
        self.tokens[:, :length].copy_(sequences_BS)
        self.column.fill_(length - 1)
        self._feed(sequences_BS[:, -1], length - 1)
        self.unfinished.copy_(unfinished_B)
        self.stopped.fill_(False)
        if pad_token_id is not None:
            self.pad.copy_(pad_token_id)

    def _run(self) -> torch.Tensor:
        """One step on the buffers as they are -> logits [B, 1, V] (with a graph: its output buffer, overwritten by
        the next step)."""
        if self.graph is None:
            return self._step(self.cache_ref())
        self.graph.replay()
        return self.logits

    def start(self, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> None:
        """Prepare `advance` after a prefill: attention_mask [B, S0] is the padding mask of the S0 tokens already
        in the cache (S0 < cache length), position_ids [B, S0] their positions (default: counted from the mask,
        as `replay`)."""
        restore_cache_tensors(self.cache_ref(), self.cache_tensors)
        self.mask.zero_()
        self.mask[:, : attention_mask.shape[1]].copy_(attention_mask)
        if position_ids is None:
            self.position_ids.copy_(attention_mask.sum(dim=-1, keepdim=True) - 1)
        else:
            self.position_ids.copy_(position_ids[:, -1:])

    def _feed(self, tokens_B: torch.Tensor, column: int) -> None:
        """The next step's input: one new token per row (tokens_B [B]), a real token at mask column `column` (the
        next free one), its position one past the row's previous token."""
        self.input_ids.copy_(tokens_B[:, None])
        self.mask[:, column] = 1
        self.position_ids += 1

    def advance(self, tokens_B: torch.Tensor, column: int) -> torch.Tensor:
        """`_feed` these tokens and run the step -> logits [B, 1, V], valid until the next step. Three small copies
        and the replay: no host sync, nothing that `generate()`'s own loop prepares per token."""
        self._feed(tokens_B, column)
        return self._run()

    def replay(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None):
        """input_ids [B, 1], attention_mask [B, S'] over past + new tokens (S' <= cache length), position_ids
        [B, 1] (default: the count of real tokens before the new one, as generate() computes them) -> logits
        [B, 1, V] (a fresh tensor; the graph's output buffer is reused by the next step)."""
        length = attention_mask.shape[1]
        if length > self.mask_length:
            raise ValueError(f"attention_mask: {length} positions exceed the static cache length {self.mask_length}")
        restore_cache_tensors(self.cache_ref(), self.cache_tensors)
        self.input_ids.copy_(input_ids)
        self.mask[:, length:].zero_()
        self.mask[:, :length].copy_(attention_mask)
        if position_ids is None:
            position_ids = attention_mask.sum(dim=-1, keepdim=True) - 1
        self.position_ids.copy_(position_ids[:, -1:])
        return self._run().clone()


__all__ = [
    "DeepseekV3CausalLMOutputWithPast",
    "DeepseekV3ForCausalLM",
    "DeepseekV3Model",
    "DeepseekV3ModelOutputWithPast",
    "DeepseekV3PreTrainedModel",
]
