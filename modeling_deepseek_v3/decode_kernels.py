"""Triton kernels for the small per-token work of a decode step (`config.decode_kernels`).

A batch-1 decode step moves ~5 GB of weights, yet in eager PyTorch it is ~2,000 small kernels: every RMSNorm is
eight (float32 round trip, pow, mean, rsqrt, two multiplies), every interleaved RoPE nine, the group-limited
router twenty, the absorbed attention a dozen reshapes, copies and softmax pieces. Replayed as a CUDA graph each
kernel still costs a few microseconds, which is what the step spends. These kernels do each of those stages in
one or two launches, with the same float32 math as the eager reference in `modeling_deepseek_v3.py`:

- `rms_norm`: RMSNorm of rows with a row stride (the q_a / c_kv slices of one projection output), float32
  statistics, the normalized value rounded to the input dtype before the weight multiply, as the reference does;
- `linear_pair`: `[x @ W1^T | x @ W2^T]` for a few rows in one launch, float32 accumulation: q_a_proj and
  kv_a_proj_with_mqa share their input, so one pass reads both weights without a concatenated copy of them
  (with one weight: the matrix-vector product of q_b_proj, o_proj and the MLPs' down_proj); with `norm`, the
  decoder layer's input RMSNorm inside the same pass, and with `combine`, the previous MoE layer's output summed
  there as well;
- `router_scores` / `noaux_topk`: the `noaux_tc` router: sigmoid of float32 logits, then bias-selected
  group-limited top-k and the normalized, scaled weights of the unbiased scores (one program per token);
- `silu_gate_up`: `silu(x @ W_gate^T) * (x @ W_up^T)` for a few rows in one pass (dense MLP, shared experts);
- `rotate_pairs_`: interleaved-pair RoPE of every head of `q_pe` and of `k_pe`, in place, in one launch;
- `absorbed_decode_attention`: multi-query attention of one new token per sequence over the latent cache
  (scores `q_lat . c_kv + q_pe . k_pe`, float32 softmax, values `c_kv`), split over the keys
  (flash-decoding) so that a long context spreads over the GPU, then one combine, and W_UV per head (with few
  splits the combine runs inside the W_UV launch); on a static cache it reads its first keys before the previous
  kernel ends;
- `latent_norm_rope`: after the fused a-projection, both latent RMSNorms and the RoPE of k_pe in one launch,
  writing c_kv and k_pe straight into a static cache's slots (its device-side length: no host sync);
- `absorb_query`: `q_nope @ W_UK` per head and the RoPE of q_pe, one launch (on a static cache, also the new
  token's latent row, so that a one-token step needs no `latent_norm_rope`: q_b_proj's `linear_pair` applies
  q_a's norm);
- `add_rms_norm`: the residual add and the next RMSNorm (in a MoE layer, `router_scores` does both inside its
  pass); `moe_combine`: the routed experts' weighted sum, the shared experts and the residual, with the eager
  path's roundings;
- `decode_prologue`: a one-token step's embedding rows, rotary angles and attention bias over a static cache, one
  launch;
- `argmax_rows`: the greedy token of a decode step (`DecodeGraph`), the argmax over the vocabulary in two passes;
  `greedy_pick_`: the same with generate()'s bookkeeping (padding of finished rows, end-of-sequence ids, the token
  appended, the next input) in the second pass.

A MoE decoder layer's decode step on a static cache is then 10 launches (attention 6 with its input norm: q_a/kv_a,
q_b, absorbed query, split, combine with W_UV, o_proj; MoE 4 with the post-attention add and norm in the router's
pass and the experts of `moe_kernels.py`; its output summed in the next layer's q_a/kv_a pass, or in
`moe_combine` after the last layer) instead of ~110, chained by programmatic dependent launch on Hopper
(`USE_PDL`). The tiles come from `benchmarks/tune_decode_kernels.py` and `benchmarks/ab_decode_step.py`;
`tests/test_decode_kernels.py` compiles every kernel for Hopper and runs the loop-free ones in Triton's interpreter
without a GPU (from Triton 3.9 on also the experts' kernels and `linear_pair` with the norm), `tests/test_gpu.py`
holds them equal to the eager path on a GPU.

Shapes: T tokens (rows), D input features, E experts, K experts per token, G expert groups, H heads, L latent
(kv_lora_rank), R rope dims, S cache slots.
"""

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None
try:  # programmatic dependent launch (Triton >= 3.5)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

# Matrix-vector products re-read the weight per token: beyond a few rows cuBLAS is the better kernel.
MAX_GEMV_TOKENS = 4
# Tiles (rows per program, columns per step, warps) of the matrix-vector kernels, from a sweep of rows {1, 2, 4, 8}
# x columns {512 .. 4096} x warps {4, 8} on one H200 at the V3-Lite decode shapes (`benchmarks/tune_decode_kernels.py
# --only gemv`): a whole row (up to 2,048 columns) per step, so that a program issues all its weight loads at once,
# and 8 rows per program where the output has enough rows to keep every SM busy (GEMV_WIDE_ROWS); one row per program
# below that. linear_pair: q_a + kv_a 3.1 us, q_b 3.1, o_proj 3.1 (against 3.8 / 4.2 / 3.6 with one row per
# program), the router (64 rows) 1.1; silu_gate_up (2,816 rows) 6.5 us against 7.8 for (1, 2048, 8).
GEMV_TILE = (8, 2048, 4)
NARROW_GEMV_TILE = (1, 2048, 4)
GEMV_WIDE_ROWS = 1024
GATE_UP_TILE = (2, 1024, 4)


def decode_kernels_available(x: torch.Tensor) -> bool:
    """Whether the kernels can run on `x` (CUDA tensor, triton importable)."""
    return triton is not None and x.is_cuda


# Programmatic dependent launch (Hopper and later): each kernel lets the next one launch as soon as it starts
# (`gdc_launch_dependents`), and waits for the previous kernel's results (`gdc_wait`) only where it first reads them,
# so the next kernel's programs are resident, and the matrix-vector kernels already load their weights, while the
# previous kernel drains. A decode step is hundreds of small kernels: this hides most of their launch gaps. Every
# store comes after the wait (the previous kernel may still read memory a later one writes). Off: USE_PDL = False
# (or DEEPSEEK_V3_PDL=0 in the environment).
USE_PDL = os.environ.get("DEEPSEEK_V3_PDL", "1") != "0"


@functools.lru_cache(maxsize=None)
def _pdl_supported(device_index: int) -> bool:
    return gdc_wait is not None and torch.cuda.get_device_capability(device_index)[0] >= 9


def _launch_options(x: torch.Tensor) -> dict:
    """The `PDL` constexpr and the `launch_pdl` launch option of a kernel launched on x's device."""
    pdl = USE_PDL and _pdl_supported(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return {"PDL": pdl, "launch_pdl": pdl}


if triton is not None:

    @triton.jit
    def _rms_norm_row(x, w_ptr, cols, mask, C, eps, dtype: tl.constexpr):
        # RMSNorm of one row as `DeepseekV3RMSNorm`: x in float32 (zeros past C), float32 statistics, the normalized
        # row rounded to the input dtype `dtype`, then times the weight in float32. Returns float32.
        h = (x * tl.rsqrt(tl.sum(x * x, axis=0) / C + eps)).to(dtype)
        return h.to(tl.float32) * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _rotate_pairs_row(src, dst, cos_row, sin_row, i, mask):
        # RoPE of the interleaved pairs (x[2i], x[2i+1]) read at `src`, written at `dst` (may be `src`) in its dtype,
        # by the float32 angles at cos_row/sin_row [i]: as `apply_rotary_interleaved`.
        cos = tl.load(cos_row + i, mask=mask, other=0.0)
        sin = tl.load(sin_row + i, mask=mask, other=0.0)
        x_even = tl.load(src + 2 * i, mask=mask, other=0.0).to(tl.float32)
        x_odd = tl.load(src + 2 * i + 1, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst + 2 * i, (x_even * cos - x_odd * sin).to(dst.dtype.element_ty), mask=mask)
        tl.store(dst + 2 * i + 1, (x_even * sin + x_odd * cos).to(dst.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, w_ptr, out_ptr, C, stride_x, stride_o, eps, BLOCK_C: tl.constexpr, PDL: tl.constexpr,
    ):
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_C)
        mask = cols < C
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        y = _rms_norm_row(x, w_ptr, cols, mask, C, eps, x_ptr.dtype.element_ty)
        tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _chunk_argmax_kernel(x_ptr, max_ptr, arg_ptr, V, stride_x, CHUNKS, BLOCK: tl.constexpr, PDL: tl.constexpr):
        # Program (row, chunk): the maximum of x[row, chunk * BLOCK : (chunk + 1) * BLOCK] (float32) and its first
        # index in the row.
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        cols = chunk * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        best = tl.argmax(x, axis=0, tie_break_left=True)
        tl.store(max_ptr + row * CHUNKS + chunk, tl.max(x, axis=0))
        tl.store(arg_ptr + row * CHUNKS + chunk, (chunk * BLOCK + best).to(tl.int64))

    @triton.jit
    def _argmax_of_chunks_kernel(max_ptr, arg_ptr, out_ptr, CHUNKS, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
        # Program row: the first chunk holding the row's maximum, and that chunk's first index of it.
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        chunks = tl.arange(0, BLOCK_C)
        maxima = tl.load(max_ptr + row * CHUNKS + chunks, mask=chunks < CHUNKS, other=-float("inf"))
        best = tl.argmax(maxima, axis=0, tie_break_left=True)
        tl.store(out_ptr + row, tl.load(arg_ptr + row * CHUNKS + best))

    @triton.jit
    def _decode_prologue_kernel(
        ids_ptr, embed_ptr, embeds_ptr, position_ptr, inv_freq_ptr, cos_ptr, sin_ptr, mask_ptr, length_ptr, bias_ptr,
        D, S, stride_e, stride_mb, scaling, min_value,
        HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        # Launched without PDL: it starts a forward, after everything before it on the stream (see
        # absorbed_decode_attention's early keys).
        b = tl.program_id(0).to(tl.int64)
        block = tl.program_id(1)
        if block == 0:
            cols = tl.arange(0, BLOCK_D)
            token = tl.load(ids_ptr + b)
            row = tl.load(embed_ptr + token * stride_e + cols, mask=cols < D, other=0.0)
            tl.store(embeds_ptr + b * D + cols, row, mask=cols < D)
            # The rotary angles in float32 (`DeepseekV3RotaryEmbedding`: position * inv_freq, cos and sin scaled).
            i = tl.arange(0, BLOCK_HALF)
            angle = tl.load(position_ptr + b).to(tl.float32) * tl.load(inv_freq_ptr + i, mask=i < HALF, other=0.0)
            tl.store(cos_ptr + b * HALF + i, tl.cos(angle) * scaling, mask=i < HALF)
            tl.store(sin_ptr + b * HALF + i, tl.sin(angle) * scaling, mask=i < HALF)
        else:
            # The bias over the cache slots (`build_attention_bias` of one new token at position `length`): 0 where
            # the slot is at or before the new token and the padding mask holds a token, the minimum elsewhere.
            slots = (block - 1) * BLOCK_S + tl.arange(0, BLOCK_S)
            inside = slots < S
            padding = tl.load(mask_ptr + b * stride_mb + slots, mask=inside, other=0)
            keep = (slots <= tl.load(length_ptr)) & (padding != 0)
            bias = tl.where(keep, 0.0, min_value)
            tl.store(bias_ptr + b * S + slots, bias.to(bias_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _greedy_pick_kernel(
        max_ptr, arg_ptr, tokens_ptr, column_ptr, mask_ptr, position_ptr, input_ptr, unfinished_ptr, pad_ptr,
        eos_ptr, stopped_ptr, log_ptr, B, CHUNKS, E, S, stride_tb, stride_mb,
        HAS_EOS: tl.constexpr, LOG: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
        BLOCK_E: tl.constexpr, PDL: tl.constexpr,
    ):
        # One program for all rows: `stopped` needs every row's state after this step.
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        rows = tl.arange(0, BLOCK_B)
        chunks = tl.arange(0, BLOCK_C)
        row_mask = rows < B
        maxima = tl.load(max_ptr + rows[:, None] * CHUNKS + chunks[None, :],
                         mask=row_mask[:, None] & (chunks[None, :] < CHUNKS), other=-float("inf"))
        best = tl.argmax(maxima, axis=1, tie_break_left=True)
        token = tl.load(arg_ptr + rows * CHUNKS + best, mask=row_mask, other=0)
        if HAS_EOS:  # finished rows take the padding id; a row that produced an end-of-sequence id finishes
            unfinished = tl.load(unfinished_ptr + rows, mask=row_mask, other=0)
            token = token * unfinished + tl.load(pad_ptr) * (1 - unfinished)
            ids = tl.arange(0, BLOCK_E)
            eos = tl.load(eos_ptr + ids, mask=ids < E, other=-1)
            ended = tl.max((token[:, None] == eos[None, :]).to(tl.int64), axis=1)
            unfinished = unfinished * (1 - ended)
            tl.store(unfinished_ptr + rows, unfinished, mask=row_mask)
            stopped = tl.max(unfinished, axis=0) == 0
            tl.store(stopped_ptr, stopped)
        column = tl.load(column_ptr + rows, mask=row_mask, other=0) + 1
        tl.store(column_ptr + rows, column, mask=row_mask)
        if HAS_EOS and LOG:  # the flag again at the sequence length after this step (the rows share the column)
            tl.store(log_ptr + tl.max(tl.where(row_mask, column, 0), axis=0) + 1, stopped)
        tl.store(tokens_ptr + rows * stride_tb + column, token, mask=row_mask)
        tl.store(mask_ptr + rows * stride_mb + tl.minimum(column, S - 1), 1, mask=row_mask)
        tl.store(position_ptr + rows, tl.load(position_ptr + rows, mask=row_mask, other=0) + 1, mask=row_mask)
        tl.store(input_ptr + rows, token, mask=row_mask)

    @triton.jit
    def _moe_sum(y_ptr, weight_ptr, shared_ptr, residual_ptr, token, T, cols, mask, stride_y, stride_s, stride_r,
                 dtype: tl.constexpr, K: tl.constexpr, HAS_SHARED: tl.constexpr, SHARED_PARTS: tl.constexpr,
                 BLOCK: tl.constexpr):
        # A MoE layer's output for one token at `cols` (`moe_combine`'s math): `residual + (routed + shared)` with
        # the eager roundings, as float32 holding values of `dtype`.
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in tl.static_range(K):  # in slot order, in float32, as the eager weighted sum
            w = tl.load(weight_ptr + token * K + k)
            acc += tl.load(y_ptr + (token * K + k) * stride_y + cols, mask=mask, other=0.0) * w
        # The eager rounding steps: routed sum -> activation dtype, + shared experts, + residual.
        out = acc.to(dtype).to(tl.float32)
        if HAS_SHARED:
            shared = tl.load(shared_ptr + token * stride_s + cols, mask=mask, other=0.0).to(tl.float32)
            out = (out + shared).to(dtype).to(tl.float32)
        if SHARED_PARTS > 0:  # the shared experts' output as float32 parts in y's rows T*K + t*S + s: their sum,
            shared = tl.zeros((BLOCK,), dtype=tl.float32)  # rounded once as the eager down projection's output
            for part in tl.static_range(SHARED_PARTS):
                row = T * K + token * SHARED_PARTS + part
                shared += tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0)
            shared = shared.to(dtype).to(tl.float32)
            out = (out + shared).to(dtype).to(tl.float32)
        residual = tl.load(residual_ptr + token * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        return (residual + out).to(dtype).to(tl.float32)

    @triton.jit
    def _linear_pair_kernel(
        x_ptr, w1_ptr, w2_ptr, norm_ptr, out_ptr, D, N1, N2,
        stride_xt, stride_w1, stride_w2, stride_ot, eps, residual_ptr, total_ptr, normed_ptr, stride_rt,
        combine_w_ptr, T,
        SIGMOID: tl.constexpr, NORM: tl.constexpr, ADD: tl.constexpr, COMBINE: tl.constexpr, K: tl.constexpr,
        SHARED_PARTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_X: tl.constexpr,
        PDL: tl.constexpr,
    ):
        # COMBINE (with NORM): the row is a MoE layer's output, summed here from its parts (`_moe_sum`: x_ptr is
        # the experts' float32 [T * (K + S), D], combine_w_ptr the routing weights [T, K], residual_ptr the stream).
        if PDL:
            gdc_launch_dependents()
        token = tl.program_id(0).to(tl.int64)
        block = tl.program_id(1)
        blocks1 = tl.cdiv(N1, BLOCK_N)
        second = block >= blocks1  # this program's rows belong to w2
        rows = tl.where(second, block - blocks1, block) * BLOCK_N + tl.arange(0, BLOCK_N)
        n = tl.where(second, N2, N1)
        col0 = tl.where(second, N1, 0)
        if second:
            w_ptr = w2_ptr
            stride_w = stride_w2
        else:
            w_ptr = w1_ptr
            stride_w = stride_w1
        row_mask = rows < n
        dtype = residual_ptr.dtype.element_ty  # the activations' (residual_ptr is x_ptr without ADD or COMBINE)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            # The weights first: they do not depend on the previous kernel (see USE_PDL).
            w = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_w + cols[None, :],
                        mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            if PDL:
                gdc_wait()
            if not COMBINE:
                x = tl.load(x_ptr + token * stride_xt + cols, mask=col_mask, other=0.0).to(tl.float32)
            if NORM:  # RMSNorm of the row first, as `rms_norm` rounds it (the whole row's statistics: recomputed per
                # step, a read of the row from L2; one step for a hidden size up to BLOCK_D)
                row = tl.arange(0, BLOCK_X)
                if COMBINE:
                    x_row = _moe_sum(x_ptr, combine_w_ptr, x_ptr, residual_ptr, token, T, row, row < D, stride_xt, 0,
                                     stride_rt, dtype, K, False, SHARED_PARTS, BLOCK_X)
                    if BLOCK_D == BLOCK_X:  # one step (D <= BLOCK_D): cols are the row
                        x = x_row
                    else:
                        x = _moe_sum(x_ptr, combine_w_ptr, x_ptr, residual_ptr, token, T, cols, col_mask, stride_xt,
                                     0, stride_rt, dtype, K, False, SHARED_PARTS, BLOCK_D)
                else:
                    x_row = tl.load(x_ptr + token * stride_xt + row, mask=row < D, other=0.0).to(tl.float32)
                if ADD:  # of residual + x, rounded to the dtype first (`add_rms_norm`)
                    r_row = tl.load(residual_ptr + token * stride_rt + row, mask=row < D, other=0.0).to(tl.float32)
                    x_row = (x_row + r_row).to(dtype).to(tl.float32)
                    r = tl.load(residual_ptr + token * stride_rt + cols, mask=col_mask, other=0.0).to(tl.float32)
                    x = (x + r).to(dtype).to(tl.float32)
                inv_rms = tl.rsqrt(tl.sum(x_row * x_row, axis=0) / D + eps)
                weight = tl.load(norm_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
                x = ((x * inv_rms).to(dtype).to(tl.float32) * weight).to(dtype).to(tl.float32)
                if ADD or COMBINE:
                    if (block == 0) & (start == 0):  # the token's first program writes the sum (and the normed row)
                        tl.store(total_ptr + token * D + row, x_row.to(dtype), mask=row < D)
                        if ADD:
                            weight_row = tl.load(norm_ptr + row, mask=row < D, other=0.0).to(tl.float32)
                            normed = ((x_row * inv_rms).to(dtype).to(tl.float32) * weight_row).to(dtype)
                            tl.store(normed_ptr + token * D + row, normed, mask=row < D)
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        if SIGMOID:
            acc = 1.0 / (1.0 + tl.exp(-acc))
        tl.store(out_ptr + token * stride_ot + col0 + rows, acc.to(out_ptr.dtype.element_ty), mask=row_mask)

    @triton.jit
    def _silu_gate_up_kernel(
        x_ptr, gate_ptr, up_ptr, out_ptr, D, N, stride_xt, stride_g, stride_u, stride_ot,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
    ):
        if PDL:
            gdc_launch_dependents()
        token = tl.program_id(0).to(tl.int64)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        acc_gate = tl.zeros((BLOCK_N,), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            mask = row_mask[:, None] & col_mask[None, :]
            gate = tl.load(gate_ptr + rows[:, None].to(tl.int64) * stride_g + cols[None, :], mask=mask, other=0.0)
            up = tl.load(up_ptr + rows[:, None].to(tl.int64) * stride_u + cols[None, :], mask=mask, other=0.0)
            if PDL:  # the weights are in flight; the input is the previous kernel's output
                gdc_wait()
            x = tl.load(x_ptr + token * stride_xt + cols, mask=col_mask, other=0.0).to(tl.float32)
            acc_gate += tl.sum(gate.to(tl.float32) * x[None, :], axis=1)
            acc_up += tl.sum(up.to(tl.float32) * x[None, :], axis=1)
        h = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up
        tl.store(out_ptr + token * stride_ot + rows, h.to(out_ptr.dtype.element_ty), mask=row_mask)

    @triton.jit
    def _noaux_topk_kernel(
        scores_ptr, bias_ptr, idx_ptr, weight_ptr, stride_s, scale,
        G: tl.constexpr, EG: tl.constexpr, TOPK_GROUP: tl.constexpr, K: tl.constexpr, NORMALIZE: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_EG: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
    ):
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        token = tl.program_id(0).to(tl.int64)
        group = tl.arange(0, BLOCK_G)
        member = tl.arange(0, BLOCK_EG)
        valid = (group[:, None] < G) & (member[None, :] < EG)
        expert = group[:, None] * EG + member[None, :]  # [G, EG] expert ids
        scores = tl.load(scores_ptr + token * stride_s + expert, mask=valid, other=0.0)
        # The bias only selects: `choice` ranks the experts, the unbiased `scores` weight them.
        choice = tl.where(valid, scores + tl.load(bias_ptr + expert, mask=valid, other=0.0), float("-inf"))
        if G > 1:
            # Group score: the sum of the group's two best biased scores; keep the TOPK_GROUP best groups.
            top1 = tl.max(choice, axis=1)
            first = tl.min(tl.where(choice == top1[:, None], member[None, :], BLOCK_EG), axis=1)
            top2 = tl.max(tl.where(member[None, :] == first[:, None], float("-inf"), choice), axis=1)
            group_score = tl.where(group < G, top1 + top2, float("-inf"))
            keep = group < 0
            for _ in tl.static_range(TOPK_GROUP):
                best = tl.max(group_score, axis=0)
                chosen = tl.min(tl.where(group_score == best, group, BLOCK_G), axis=0)
                keep = keep | (group == chosen)
                group_score = tl.where(group == chosen, float("-inf"), group_score)
            choice = tl.where(keep[:, None], choice, float("-inf"))
        slot = tl.arange(0, BLOCK_K)
        top_idx = tl.zeros((BLOCK_K,), dtype=tl.int64)
        top_weight = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k in tl.static_range(K):
            best = tl.max(tl.max(choice, axis=1), axis=0)
            chosen = tl.min(tl.min(tl.where(choice == best, expert, BLOCK_G * BLOCK_EG), axis=1), axis=0)
            weight = tl.sum(tl.sum(tl.where(expert == chosen, scores, 0.0), axis=1), axis=0)
            top_idx = tl.where(slot == k, chosen.to(tl.int64), top_idx)
            top_weight = tl.where(slot == k, weight, top_weight)
            choice = tl.where(expert == chosen, float("-inf"), choice)
        if NORMALIZE:
            top_weight = top_weight / (tl.sum(top_weight, axis=0) + 1e-20)
        top_weight = top_weight * scale
        tl.store(idx_ptr + token * K + slot, top_idx, mask=slot < K)
        tl.store(weight_ptr + token * K + slot, top_weight, mask=slot < K)

    @triton.jit
    def _rotate_pairs_kernel(
        q_ptr, k_ptr, cos_ptr, sin_ptr, H, stride_qt, stride_qh, stride_kt, stride_ct,
        HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, PDL: tl.constexpr,
    ):
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        if head < H:
            base = q_ptr + row * stride_qt + head * stride_qh
        else:
            base = k_ptr + row * stride_kt
        i = tl.arange(0, BLOCK_HALF)
        _rotate_pairs_row(base, base, cos_ptr + row * stride_ct, sin_ptr + row * stride_ct, i, i < HALF)

    @triton.jit
    def _attend_block(q_lat, q_pe, c_kv, k_pe, bias, key_mask, running_max, running_sum, acc, scale,
                      HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
        # One block of keys into the online softmax of every head: scores, float32 running max / sum, values c_kv.
        scores = tl.dot(q_lat, tl.trans(c_kv), input_precision=PRECISION)
        scores = tl.dot(q_pe, tl.trans(k_pe), acc=scores, input_precision=PRECISION) * scale
        if HAS_BIAS:
            scores += bias[None, :]
        scores = tl.where(key_mask[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        correction = tl.exp(running_max - new_max)
        p = tl.exp(scores - new_max[:, None])
        running_sum = running_sum * correction + tl.sum(p, axis=1)
        acc = acc * correction[:, None] + tl.dot(p.to(c_kv.dtype), c_kv, input_precision=PRECISION)
        return new_max, running_sum, acc

    @triton.jit
    def _key_block(c_kv_row, k_pe_row, block, S, stride_cs, stride_ks, lat, lat_mask, rope, rope_mask,
                   BLOCK_S: tl.constexpr):
        # One sequence's key block `block` of the latent cache (c_kv_row / k_pe_row: its first slot) -> the slots,
        # their mask (< S), c_kv [BLOCK_S, L] and k_pe [BLOCK_S, R] (zeros past S).
        key = block * BLOCK_S + tl.arange(0, BLOCK_S)
        key_mask = key < S
        c_kv = tl.load(c_kv_row + key[:, None] * stride_cs + lat[None, :], mask=key_mask[:, None] & lat_mask[None, :],
                       other=0.0)
        k_pe = tl.load(k_pe_row + key[:, None] * stride_ks + rope[None, :],
                       mask=key_mask[:, None] & rope_mask[None, :], other=0.0)
        return key, key_mask, c_kv, k_pe

    @triton.jit
    def _absorbed_attention_split_kernel(
        q_lat_ptr, q_pe_ptr, c_kv_ptr, k_pe_ptr, bias_ptr, fresh_ptr, acc_ptr, max_ptr, sum_ptr,
        H, S, L, R, blocks_per_split, scale,
        stride_qlh, stride_qlb, stride_qph, stride_qpb,
        stride_cb, stride_cs, stride_kb, stride_ks, stride_bb,
        stride_ab, stride_ah, stride_as, stride_mb, stride_mh,
        HAS_BIAS: tl.constexpr, FRESH: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr,
    ):
        # FRESH: the step's earlier kernels wrote only the cache slot `fresh_ptr[0]` (a static cache's length,
        # itself last written by an earlier step). Then the split's first block of keys is read before the wait
        # (see USE_PDL), while the query's kernels run, and only the fresh slot's row after it.
        if PDL:
            gdc_launch_dependents()
            if not FRESH:
                gdc_wait()
        b = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        split = tl.program_id(2)
        head_mask = head < H
        lat = tl.arange(0, BLOCK_L)
        rope = tl.arange(0, BLOCK_R)
        lat_mask = lat < L
        rope_mask = rope < R
        first = split * blocks_per_split
        key, key_mask, c_kv, k_pe = _key_block(c_kv_ptr + b * stride_cb, k_pe_ptr + b * stride_kb, first, S,
                                               stride_cs, stride_ks, lat, lat_mask, rope, rope_mask, BLOCK_S)
        if FRESH:
            fresh = tl.load(fresh_ptr)
            if PDL:
                gdc_wait()
            here = (fresh >= first * BLOCK_S) & (fresh < first * BLOCK_S + BLOCK_S) & (fresh < S)
            c_new = tl.load(c_kv_ptr + b * stride_cb + fresh * stride_cs + lat, mask=lat < tl.where(here, L, 0),
                            other=0.0)
            k_new = tl.load(k_pe_ptr + b * stride_kb + fresh * stride_ks + rope, mask=rope < tl.where(here, R, 0),
                            other=0.0)
            c_kv = tl.where((key == fresh)[:, None], c_new[None, :], c_kv)
            k_pe = tl.where((key == fresh)[:, None], k_new[None, :], k_pe)
        q_lat = tl.load(q_lat_ptr + head[:, None] * stride_qlh + b * stride_qlb + lat[None, :],
                        mask=head_mask[:, None] & lat_mask[None, :], other=0.0)
        q_pe = tl.load(q_pe_ptr + head[:, None] * stride_qph + b * stride_qpb + rope[None, :],
                       mask=head_mask[:, None] & rope_mask[None, :], other=0.0)
        bias = tl.zeros((BLOCK_S,), dtype=tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + b * stride_bb + key, mask=key_mask, other=0.0).to(tl.float32)
        # A finite start: a split whose keys are all masked keeps weight exp(-inf) = 0 and no NaN.
        running_max = tl.full((BLOCK_H,), -1e30, dtype=tl.float32)
        running_sum = tl.zeros((BLOCK_H,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_H, BLOCK_L), dtype=tl.float32)
        running_max, running_sum, acc = _attend_block(q_lat, q_pe, c_kv, k_pe, bias, key_mask, running_max,
                                                      running_sum, acc, scale, HAS_BIAS, PRECISION)
        for block in range(first + 1, first + blocks_per_split):  # after the wait: the fresh slot may be here
            key, key_mask, c_kv, k_pe = _key_block(c_kv_ptr + b * stride_cb, k_pe_ptr + b * stride_kb, block, S,
                                                   stride_cs, stride_ks, lat, lat_mask, rope, rope_mask, BLOCK_S)
            if HAS_BIAS:
                bias = tl.load(bias_ptr + b * stride_bb + key, mask=key_mask, other=0.0).to(tl.float32)
            running_max, running_sum, acc = _attend_block(q_lat, q_pe, c_kv, k_pe, bias, key_mask, running_max,
                                                          running_sum, acc, scale, HAS_BIAS, PRECISION)
        tl.store(acc_ptr + b * stride_ab + head[:, None] * stride_ah + split * stride_as + lat[None, :], acc,
                 mask=head_mask[:, None] & lat_mask[None, :])
        tl.store(max_ptr + b * stride_mb + head * stride_mh + split, running_max, mask=head_mask)
        tl.store(sum_ptr + b * stride_mb + head * stride_mh + split, running_sum, mask=head_mask)

    @triton.jit
    def _advance_length(length_ptr):
        # The cache's new slot is written (an earlier kernel) and read (the split kernel): advance its length, once.
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0) & (tl.program_id(2) == 0):
            tl.store(length_ptr, tl.load(length_ptr) + 1)

    @triton.jit
    def _combine_splits(acc_row, max_row, sum_row, lat, L, SPLITS, stride_as, BLOCK_SPLITS: tl.constexpr):
        # One (sequence, head)'s SPLITS float32 partials of the split kernel (acc_row [SPLITS, L] at stride_as, their
        # running max / sum at max_row / sum_row) combined at the latent columns `lat` -> float32 o_lat.
        split = tl.arange(0, BLOCK_SPLITS)
        split_max = tl.load(max_row + split, mask=split < SPLITS, other=-1e30)
        split_sum = tl.load(sum_row + split, mask=split < SPLITS, other=0.0)
        weight = tl.exp(split_max - tl.max(split_max, axis=0))  # [SPLITS], 0 for the padding
        total = tl.sum(weight * split_sum, axis=0)
        acc = tl.load(acc_row + split[:, None] * stride_as + lat[None, :],
                      mask=(split[:, None] < SPLITS) & (lat[None, :] < L), other=0.0)
        return tl.sum(acc * weight[:, None], axis=0) / tl.where(total > 0, total, 1.0)

    @triton.jit
    def _absorbed_attention_combine_kernel(
        acc_ptr, max_ptr, sum_ptr, out_ptr, length_ptr, L, SPLITS,
        stride_ab, stride_ah, stride_as, stride_mb, stride_mh, stride_oh, stride_ob,
        ADVANCE: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_L: tl.constexpr, PDL: tl.constexpr,
    ):
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        if ADVANCE:
            _advance_length(length_ptr)
        b = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1).to(tl.int64)
        lat = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
        out = _combine_splits(acc_ptr + b * stride_ab + head * stride_ah, max_ptr + b * stride_mb + head * stride_mh,
                              sum_ptr + b * stride_mb + head * stride_mh, lat, L, SPLITS, stride_as, BLOCK_SPLITS)
        tl.store(out_ptr + head * stride_oh + b * stride_ob + lat, out.to(out_ptr.dtype.element_ty), mask=lat < L)

    @triton.jit
    def _add_rms_norm_kernel(
        x_ptr, d_ptr, w_ptr, sum_ptr, out_ptr, C, stride_x, stride_d, eps, BLOCK_C: tl.constexpr, PDL: tl.constexpr,
    ):
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_C)
        mask = cols < C
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(d_ptr + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)
        # The residual sum rounded to the activation dtype (as `residual + hidden_states`), then normalized.
        s = (x + d).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * C + cols, s, mask=mask)
        y = _rms_norm_row(s.to(tl.float32), w_ptr, cols, mask, C, eps, sum_ptr.dtype.element_ty)
        tl.store(out_ptr + row * C + cols, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _moe_combine_kernel(
        y_ptr, weight_ptr, shared_ptr, residual_ptr, out_ptr, T, D, stride_y, stride_s, stride_r, norm_ptr, eps,
        K: tl.constexpr, HAS_SHARED: tl.constexpr, SHARED_PARTS: tl.constexpr, NORM: tl.constexpr,
        BLOCK_D: tl.constexpr, PDL: tl.constexpr,
    ):
        # NORM: the RMSNorm of the output instead (one program holds the whole row), as `rms_norm` computes it.
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        token = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = cols < D
        dtype = residual_ptr.dtype.element_ty
        out = _moe_sum(y_ptr, weight_ptr, shared_ptr, residual_ptr, token, T, cols, mask, stride_y, stride_s, stride_r,
                       dtype, K, HAS_SHARED, SHARED_PARTS, BLOCK_D)
        if NORM:
            out = _rms_norm_row(out, norm_ptr, cols, mask, D, eps, dtype)
        tl.store(out_ptr + token * D + cols, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _latent_row(src, kv_norm_ptr, cos_row, sin_row, c_kv_dst, k_pe_dst, inside, L, eps,
                    HALF: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_HALF: tl.constexpr):
        # kv_a_layernorm of the c_kv row at src [0, L) to c_kv_dst and the RoPE of the k_pe row at src [L, L + 2 HALF)
        # to k_pe_dst; nothing is written unless `inside` (never past a full static cache).
        cols = tl.arange(0, BLOCK_L)
        mask = cols < L
        x = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
        y = _rms_norm_row(x, kv_norm_ptr, cols, mask, L, eps, src.dtype.element_ty)
        tl.store(c_kv_dst + cols, y.to(c_kv_dst.dtype.element_ty), mask=cols < tl.where(inside, L, 0))
        i = tl.arange(0, BLOCK_HALF)
        _rotate_pairs_row(src + L, k_pe_dst, cos_row, sin_row, i, i < tl.where(inside, HALF, 0))

    @triton.jit
    def _latent_norm_rope_kernel(
        proj_ptr, q_norm_ptr, kv_norm_ptr, cos_ptr, sin_ptr, length_ptr, q_out_ptr, c_kv_ptr, k_pe_ptr,
        T, Q, L, S, stride_p, stride_cb, stride_cs, stride_kb, stride_ks, stride_ct, eps,
        HAS_LENGTH: tl.constexpr, HALF: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_HALF: tl.constexpr, PDL: tl.constexpr,
    ):
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        src = proj_ptr + row * stride_p
        # (Triton merges the variables of both branches: each branch names its own.)
        if tl.program_id(1) == 0:
            # q_a_layernorm of the q_a slice [0, Q).
            q_cols = tl.arange(0, BLOCK_Q)
            q_mask = q_cols < Q
            q_a = tl.load(src + q_cols, mask=q_mask, other=0.0).to(tl.float32)
            q_y = _rms_norm_row(q_a, q_norm_ptr, q_cols, q_mask, Q, eps, proj_ptr.dtype.element_ty)
            tl.store(q_out_ptr + row * Q + q_cols, q_y.to(q_out_ptr.dtype.element_ty), mask=q_mask)
        else:
            # kv_a_layernorm of c_kv [Q, Q + L) and RoPE of k_pe [Q + L, Q + L + 2 * HALF), written at this token's
            # slot: `length` (a static cache's device-side length) + the token's index in its row.
            b = row // T
            slot = row % T
            if HAS_LENGTH:
                slot += tl.load(length_ptr)
            _latent_row(src + Q, kv_norm_ptr, cos_ptr + row * stride_ct, sin_ptr + row * stride_ct,
                        c_kv_ptr + b * stride_cb + slot * stride_cs, k_pe_ptr + b * stride_kb + slot * stride_ks,
                        slot < S, L, eps, HALF, BLOCK_L, BLOCK_HALF)

    @triton.jit
    def _absorb_query_kernel(
        q_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, N, L, stride_qb, stride_qh, stride_w, stride_c, stride_oh, stride_ob,
        latent_ptr, kv_norm_ptr, length_ptr, c_kv_ptr, k_pe_ptr, S, stride_lb, stride_cb, stride_cs, stride_kb,
        stride_ks, eps,
        ROWS_PER_HEAD: tl.constexpr, HALF: tl.constexpr, LATENT: tl.constexpr, BLOCK_LATENT: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_HALF: tl.constexpr, PDL: tl.constexpr,
    ):
        if PDL:
            gdc_launch_dependents()
        b = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1).to(tl.int64)
        block = tl.program_id(2)
        q_row = q_ptr + b * stride_qb + head * stride_qh
        out_row = out_ptr + head * stride_oh + b * stride_ob
        if block < tl.cdiv(L, BLOCK_L):
            # q_lat[l] = sum_n q_nope[n] * W_UK[head, n, l]   (W_UK: the first N rows of the head's kv_b_proj rows)
            n = tl.arange(0, BLOCK_N)
            lat = block * BLOCK_L + tl.arange(0, BLOCK_L)
            w = tl.load(w_ptr + (head * ROWS_PER_HEAD + n[:, None]) * stride_w + lat[None, :],
                        mask=(n[:, None] < N) & (lat[None, :] < L), other=0.0)
            if PDL:
                gdc_wait()
            q_nope = tl.load(q_row + n, mask=n < N, other=0.0).to(tl.float32)
            q_lat = tl.sum(w.to(tl.float32) * q_nope[:, None], axis=0)
            tl.store(out_row + lat, q_lat.to(out_ptr.dtype.element_ty), mask=lat < L)
        elif block == tl.cdiv(L, BLOCK_L):
            # The rotated q_pe after q_lat: interleaved pairs, as `apply_rotary_interleaved`.
            if PDL:
                gdc_wait()
            i = tl.arange(0, BLOCK_HALF)
            _rotate_pairs_row(q_row + N, out_row + L, cos_ptr + b * stride_c, sin_ptr + b * stride_c, i, i < HALF)
        elif LATENT:
            # (head 0's last program) The new token's latent row into the static cache at slot `length`, as
            # latent_norm_rope does: kv_a_layernorm of c_kv and the RoPE of k_pe.
            if head == 0:
                if PDL:
                    gdc_wait()
                slot = tl.load(length_ptr)
                _latent_row(latent_ptr + b * stride_lb, kv_norm_ptr, cos_ptr + b * stride_c, sin_ptr + b * stride_c,
                            c_kv_ptr + b * stride_cb + slot * stride_cs, k_pe_ptr + b * stride_kb + slot * stride_ks,
                            slot < S, L, eps, HALF, BLOCK_LATENT, BLOCK_HALF)

    @triton.jit
    def _head_values_kernel(
        o_lat_ptr, w_ptr, out_ptr, L, N, V, stride_oh, stride_ob, stride_w, stride_out,
        max_ptr, sum_ptr, length_ptr, SPLITS, stride_as, stride_mb, stride_mh,
        COMBINE: tl.constexpr, ADVANCE: tl.constexpr, ROWS_PER_HEAD: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
        BLOCK_V: tl.constexpr, BLOCK_L: tl.constexpr, PDL: tl.constexpr,
    ):
        if PDL:
            gdc_launch_dependents()
        # o[b, head * V + v] = sum_l W_UV[head, v, l] * o_lat[head, b, l]   (W_UV: rows N..N+V of the head's block)
        b = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1).to(tl.int64)
        v = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
        lat = tl.arange(0, BLOCK_L)
        w = tl.load(w_ptr + (head * ROWS_PER_HEAD + N + v[:, None]) * stride_w + lat[None, :],
                    mask=(v[:, None] < V) & (lat[None, :] < L), other=0.0)
        if PDL:
            gdc_wait()
        if COMBINE:
            # For few splits, the combine in this launch: each program combines its head's partials itself (o_lat_ptr
            # is the split kernel's acc), rounded to the values' dtype as _absorbed_attention_combine_kernel writes it.
            if ADVANCE:
                _advance_length(length_ptr)
            o_lat = _combine_splits(o_lat_ptr + b * stride_ob + head * stride_oh,
                                    max_ptr + b * stride_mb + head * stride_mh, sum_ptr + b * stride_mb + head * stride_mh,
                                    lat, L, SPLITS, stride_as, BLOCK_SPLITS)
            o_lat = o_lat.to(out_ptr.dtype.element_ty).to(tl.float32)
        else:
            o_lat = tl.load(o_lat_ptr + head * stride_oh + b * stride_ob + lat, mask=lat < L, other=0.0).to(tl.float32)
        out = tl.sum(w.to(tl.float32) * o_lat[None, :], axis=1)
        tl.store(out_ptr + b * stride_out + head * V + v, out.to(out_ptr.dtype.element_ty), mask=v < V)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of `x` [..., C] (last dim contiguous, any row stride) -> [..., C] contiguous, in
    the dtype `weight * x` promotes to, as `DeepseekV3RMSNorm`."""
    C = x.shape[-1]
    x_2d = x.reshape(-1, C)
    if x_2d.stride(-1) != 1:
        x_2d = x_2d.contiguous()
    out = torch.empty(x.shape, dtype=torch.result_type(weight, x), device=x.device)
    block = triton.next_power_of_2(C)
    _rms_norm_kernel[(x_2d.shape[0],)](
        x_2d, weight, out, C, x_2d.stride(0), C, eps, BLOCK_C=block,
        **_launch_options(x_2d), num_warps=min(16, max(1, block // 256)),
    )
    return out


def linear_pair(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor | None, sigmoid: bool = False,
                out_dtype: torch.dtype | None = None, tile: tuple[int, int, int] | None = None,
                norm: tuple[torch.Tensor, float] | None = None, residual: torch.Tensor | None = None,
                combine: tuple[torch.Tensor, int] | None = None):
    """`x` [..., D] (at most MAX_GEMV_TOKENS rows), `w1` [N1, D], `w2` [N2, D] or None (then `x @ w1^T` alone) ->
    `[x @ w1^T | x @ w2^T]` [..., N1 + N2], accumulated in float32 and rounded once to `out_dtype` (default x's
    dtype); `sigmoid` applies the logistic function in float32 first. Reads each weight once per token. `tile`:
    (rows per program, columns per step, warps), default GEMV_TILE from GEMV_WIDE_ROWS output rows on, else
    NARROW_GEMV_TILE. `norm = (weight [D], eps)`: the products are of `rms_norm(x, weight, eps)` (each program
    normalizes the rows itself: one launch less than `rms_norm` first, with its math and roundings; the row's sum
    of squares may be reduced in another order, which can move a normalized value by one bf16 rounding step).
    With `norm` and `residual` [..., D] (x's shape and dtype): the products are of `rms_norm(residual + x)`, and
    -> (products, residual + x, rms_norm(residual + x)), as `add_rms_norm` computes the last two (the first program
    of each row writes them): the decoder layer's residual add and post-attention norm inside the router's pass.

    With `norm`, `residual` [..., D] and `combine = (weight_TK [T, K] float32, S)`: x is a MoE layer's experts'
    output as `moe_combine` takes it (y [T * (K + S), D] float32, T the rows of residual), and the products are of
    `rms_norm(moe_combine(x, weight_TK, None, residual, S))`, summed inside the pass -> (products, that sum, which
    the first program of each row writes): the end of a MoE layer inside the next layer's first projection."""
    D = x.shape[-1]
    x_2d = x.reshape(-1, D)
    if x_2d.stride(-1) != 1:
        x_2d = x_2d.contiguous()
    n1, n2 = w1.shape[0], (w2.shape[0] if w2 is not None else 0)
    w2 = w1 if w2 is None else w2
    if w1.stride(-1) != 1 or w2.stride(-1) != 1:
        raise ValueError("linear_pair: weights need a contiguous last dim")
    norm_weight, eps = norm if norm is not None else (w1, 0.0)
    if norm is not None and (tuple(norm_weight.shape) != (D,) or not norm_weight.is_contiguous()):
        raise ValueError(f"linear_pair: the norm weight must be a contiguous [{D}]; found {tuple(norm_weight.shape)}")
    block_n, block_d, warps = tile or (GEMV_TILE if n1 + n2 >= GEMV_WIDE_ROWS else NARROW_GEMV_TILE)
    combine_w, K, S = x_2d, 1, 0
    if combine is not None:
        combine_w, S = combine
        T, K = combine_w.shape
        if (
            norm is None or residual is None or residual.shape[-1] != D or residual.numel() != T * D
            or residual.stride(-1) != 1 or x.dtype != torch.float32 or combine_w.dtype != torch.float32
            or x_2d.shape[0] != T * (K + S)
        ):
            raise ValueError(
                f"linear_pair: combine needs `norm`, a residual of T={T} rows [..., {D}] with a contiguous last dim, "
                f"float32 weights [T, K] and x the float32 [T * (K + S), {D}]; found residual "
                f"{None if residual is None else tuple(residual.shape)}, weights {tuple(combine_w.shape)} "
                f"{combine_w.dtype}, x {tuple(x.shape)} {x.dtype}, S={S}"
            )
        r_2d, combine_w = residual.reshape(-1, D), combine_w.contiguous()
        out = torch.empty(*residual.shape[:-1], n1 + n2, dtype=out_dtype or residual.dtype, device=x.device)
        total = normed = torch.empty(residual.shape, dtype=residual.dtype, device=x.device)
    elif residual is not None:
        r_2d = residual.reshape(-1, D)
        if norm is None or r_2d.shape != x_2d.shape or r_2d.dtype != x.dtype or r_2d.stride(-1) != 1:
            raise ValueError(f"linear_pair: residual needs `norm` and x's shape {tuple(x.shape)} and dtype {x.dtype} "
                             f"with a contiguous last dim; found {tuple(residual.shape)} {residual.dtype}")
        out = torch.empty(*x.shape[:-1], n1 + n2, dtype=out_dtype or x.dtype, device=x.device)
        total = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        normed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        out = torch.empty(*x.shape[:-1], n1 + n2, dtype=out_dtype or x.dtype, device=x.device)
        r_2d, total, normed = x_2d, out, out
    grid = (r_2d.shape[0], triton.cdiv(n1, block_n) + triton.cdiv(n2, block_n))
    _linear_pair_kernel[grid](
        x_2d, w1, w2, norm_weight, out, D, n1, n2, x_2d.stride(0), w1.stride(0), w2.stride(0), n1 + n2, float(eps),
        r_2d, total, normed, r_2d.stride(0), combine_w, r_2d.shape[0],
        SIGMOID=sigmoid, NORM=norm is not None, ADD=residual is not None and combine is None,
        COMBINE=combine is not None, K=K, SHARED_PARTS=S, BLOCK_N=block_n, BLOCK_D=block_d,
        BLOCK_X=triton.next_power_of_2(D) if norm is not None else 16, **_launch_options(x_2d), num_warps=warps,
    )
    if combine is not None:
        return out, total
    if residual is not None:
        return out, total, normed
    return out


ARGMAX_BLOCK = 2048  # values per program of the first pass (64 programs a row for a 129,280-value vocabulary)


def argmax_rows(x_BV: torch.Tensor) -> torch.Tensor:
    """x_BV [B, V] (last dim contiguous) -> [B] int64: each row's first index of its maximum, as `x.argmax(-1)`,
    in two launches (the maximum of every ARGMAX_BLOCK-wide chunk, then the first chunk holding the row's); torch's
    one-pass reduction over a 129,280-value row spends 34 us on an H200. Rows holding NaN: unspecified."""
    if x_BV.stride(-1) != 1:
        raise ValueError(f"argmax_rows: x needs a contiguous last dim; found strides {x_BV.stride()}")
    maxima, args = _chunk_argmax(x_BV)
    B, chunks = maxima.shape
    out = torch.empty(B, dtype=torch.int64, device=x_BV.device)
    _argmax_of_chunks_kernel[(B,)](maxima, args, out, chunks, BLOCK_C=triton.next_power_of_2(chunks),
                                   **_launch_options(x_BV), num_warps=1)
    return out


def _chunk_argmax(x_BV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first pass of `argmax_rows` / `greedy_pick_`: x_BV [B, V] (last dim contiguous) -> (the maximum of every
    ARGMAX_BLOCK-wide chunk [B, chunks] float32, its first index in the row [B, chunks] int64)."""
    B, V = x_BV.shape
    chunks = triton.cdiv(V, ARGMAX_BLOCK)
    maxima = torch.empty(B, chunks, dtype=torch.float32, device=x_BV.device)
    args = torch.empty(B, chunks, dtype=torch.int64, device=x_BV.device)
    _chunk_argmax_kernel[(B, chunks)](x_BV, maxima, args, V, x_BV.stride(0), chunks, BLOCK=ARGMAX_BLOCK,
                                      **_launch_options(x_BV), num_warps=4)
    return maxima, args


def decode_prologue(
    input_ids_B1: torch.Tensor, embed_weight: torch.Tensor, position_B1: torch.Tensor, inv_freq: torch.Tensor,
    scaling: float, mask_BS: torch.Tensor, length: torch.Tensor,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """What a one-token decode step on a static cache computes before its first layer, in one launch instead of
    ~16 small torch kernels (`DeepseekV3Model.forward`): the embedding rows, the rotary angles and the attention
    bias.

    input_ids_B1 / position_B1 [B, 1] int64 (contiguous), embed_weight [V, D] (last dim contiguous), inv_freq [R/2]
    float32, `scaling` the cos/sin factor, mask_BS [B, S] the padding mask over the cache slots (nonzero = token),
    length the static cache's device-side length (0-dim int64: the new token's slot) ->
    (embeddings [B, 1, D] in the weight's dtype, (cos, sin) [B, 1, R/2] float32, bias [B, 1, 1, S] in the weight's
    dtype: 0 where slot <= length and the mask holds a token, the dtype's minimum elsewhere)."""
    B = input_ids_B1.shape[0]
    D, HALF, S = embed_weight.shape[1], inv_freq.shape[0], mask_BS.shape[1]
    for name, t in (("input_ids", input_ids_B1), ("position_ids", position_B1)):
        if tuple(t.shape) != (B, 1) or not t.is_contiguous() or t.dtype != torch.int64:
            raise ValueError(f"decode_prologue: {name} must be a contiguous int64 [{B}, 1]; found {t.dtype} "
                             f"{tuple(t.shape)}")
    if embed_weight.stride(-1) != 1 or mask_BS.stride(-1) != 1 or mask_BS.shape[0] != B or length.numel() != 1:
        raise ValueError(f"decode_prologue: needs an embedding weight and a [{B}, S] mask with contiguous last dims "
                         f"and a one-element length; found mask {tuple(mask_BS.shape)}, length {tuple(length.shape)}")
    device, dtype = input_ids_B1.device, embed_weight.dtype
    embeds = torch.empty(B, 1, D, dtype=dtype, device=device)
    cos = torch.empty(B, 1, HALF, dtype=torch.float32, device=device)
    sin = torch.empty(B, 1, HALF, dtype=torch.float32, device=device)
    bias = torch.empty(B, 1, 1, S, dtype=dtype, device=device)
    block_s = 1024
    _decode_prologue_kernel[(B, 1 + triton.cdiv(S, block_s))](
        input_ids_B1, embed_weight, embeds, position_B1, inv_freq.float().contiguous(), cos, sin, mask_BS, length,
        bias, D, S, embed_weight.stride(0), mask_BS.stride(0), float(scaling), torch.finfo(dtype).min,
        HALF=HALF, BLOCK_D=triton.next_power_of_2(D), BLOCK_HALF=triton.next_power_of_2(HALF), BLOCK_S=block_s,
        num_warps=4,
    )
    return embeds, (cos, sin), bias


# Rows `greedy_pick_` serves in its one program (a [rows, chunks] tile of the first pass's maxima).
GREEDY_MAX_ROWS = 64


def greedy_pick_(logits_BV: torch.Tensor, tokens_BS: torch.Tensor, column_B1: torch.Tensor, mask_BS: torch.Tensor,
                 position_B1: torch.Tensor, input_B1: torch.Tensor, eos: tuple | None = None) -> None:
    """A greedy decode step's bookkeeping after the logits, in two launches (`argmax_rows`'s first pass, then one
    program for every row), in place on int64 tensors, as `DecodeGraph._pick_greedy`'s torch ops:

        token = logits.argmax(-1)                                  (first index of the maximum)
        with eos = (eos_ids [E], unfinished [B], pad 0-dim, stopped 0-dim bool[, log]):
            token = token * unfinished + pad * (1 - unfinished)
            unfinished &= token not in eos_ids;  stopped = unfinished.max() == 0
        column += 1;  tokens[b, column] = token;  mask[b, min(column, S - 1)] = 1;  position += 1;  input = token
        with a log (bool [S' + 1]):  log[column + 1] = stopped    (every row's column is the same)

    logits_BV [B, V] (last dim contiguous), tokens_BS [B, S'], column_B1 / position_B1 / input_B1 [B, 1]
    (contiguous), mask_BS [B, S]; B <= GREEDY_MAX_ROWS. The log may be pinned host memory (the GPU writes it
    directly: generate() reads each step's flag without a copy)."""
    B, V = logits_BV.shape
    if logits_BV.stride(-1) != 1 or B > GREEDY_MAX_ROWS:
        raise ValueError(f"greedy_pick_: logits need a contiguous last dim and at most {GREEDY_MAX_ROWS} rows; "
                         f"found shape {tuple(logits_BV.shape)}, strides {logits_BV.stride()}")
    for name, t in (("tokens", tokens_BS), ("column", column_B1), ("mask", mask_BS), ("position", position_B1),
                    ("input", input_B1)):
        if t.dtype != torch.int64 or t.shape[0] != B or t.stride(-1) != 1:
            raise ValueError(f"greedy_pick_: {name} must be int64 with {B} rows and a contiguous last dim; found "
                             f"{t.dtype}, shape {tuple(t.shape)}")
    for name, t in (("column", column_B1), ("position", position_B1), ("input", input_B1)):
        if t.numel() != B or not t.is_contiguous():
            raise ValueError(f"greedy_pick_: {name} must be a contiguous [{B}, 1]; found shape {tuple(t.shape)}")
    maxima, args = _chunk_argmax(logits_BV)
    chunks = maxima.shape[1]
    log = None
    if eos is not None:
        eos_ids, unfinished, pad, stopped, *log = eos
        log = log[0] if log else None
        E = eos_ids.numel()
        if log is not None and (log.dtype != torch.bool or log.dim() != 1 or log.numel() < tokens_BS.shape[1] + 1):
            raise ValueError(f"greedy_pick_: the stop log must be a bool [{tokens_BS.shape[1] + 1}] at least; found "
                             f"{log.dtype}, shape {tuple(log.shape)}")
    else:
        eos_ids = unfinished = pad = stopped = column_B1
        E = 0
    _greedy_pick_kernel[(1,)](
        maxima, args, tokens_BS, column_B1, mask_BS, position_B1, input_B1, unfinished, pad, eos_ids, stopped,
        log if log is not None else stopped, B, chunks, E, mask_BS.shape[1], tokens_BS.stride(0), mask_BS.stride(0),
        HAS_EOS=eos is not None, LOG=log is not None, BLOCK_B=triton.next_power_of_2(B),
        BLOCK_C=triton.next_power_of_2(chunks),
        BLOCK_E=triton.next_power_of_2(max(E, 1)), **_launch_options(logits_BV), num_warps=4,
    )


def silu_gate_up(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                 tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """`silu(x @ w_gate^T) * (x @ w_up^T)` for `x` [..., D] (at most MAX_GEMV_TOKENS rows), `w_gate`/`w_up` [N, D]
    -> [..., N] in x's dtype: both products accumulated in float32 and the activation applied before one rounding
    (the eager MLP rounds gate, up, silu and the product each to x's dtype)."""
    D, N = x.shape[-1], w_gate.shape[0]
    x_2d = x.reshape(-1, D)
    if x_2d.stride(-1) != 1:
        x_2d = x_2d.contiguous()
    if w_gate.stride(-1) != 1 or w_up.stride(-1) != 1:
        raise ValueError("silu_gate_up: weights need a contiguous last dim")
    out = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    block_n, block_d, warps = tile or GATE_UP_TILE
    _silu_gate_up_kernel[(x_2d.shape[0], triton.cdiv(N, block_n))](
        x_2d, w_gate, w_up, out, D, N, x_2d.stride(0), w_gate.stride(0), w_up.stride(0), N,
        BLOCK_N=block_n, BLOCK_D=block_d,
        **_launch_options(x_2d), num_warps=warps,
    )
    return out


# The router's tile: 2 of its 64 rows a program (32 programs, each normalizing the row: see `router_scores`); in the
# captured V3-Lite step on an H200, 0.008-0.010 ms a step ahead of one row a program (NARROW_GEMV_TILE).
ROUTER_TILE = (2, 2048, 4)


def router_scores(x_TD: torch.Tensor, weight_ED: torch.Tensor, add_norm: tuple | None = None):
    """sigmoid(x @ W^T) [T, E] in float32 (float32 accumulation of the exact products of the inputs).

    `add_norm = (residual_TD, norm_weight [D], eps)`: the scores of `rms_norm(residual + x)` instead, -> (scores,
    residual + x, rms_norm(residual + x)) (see `linear_pair`)."""
    if add_norm is None:
        return linear_pair(x_TD, weight_ED, None, sigmoid=True, out_dtype=torch.float32, tile=ROUTER_TILE)
    residual_TD, norm_weight, eps = add_norm
    return linear_pair(x_TD, weight_ED, None, sigmoid=True, out_dtype=torch.float32, tile=ROUTER_TILE,
                       norm=(norm_weight, eps), residual=residual_TD)


def noaux_topk(
    scores_TE: torch.Tensor, bias_E: torch.Tensor, n_group: int, topk_group: int, top_k: int, normalize: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`noaux_tc` selection: scores_TE [T, E] float32 (sigmoid), bias_E [E] float32 -> (topk_idx [T, K] int64,
    topk_weight [T, K] float32), the experts in descending order of biased score (ties: the lower id). Same
    selection as `DeepseekV3TopkRouter`'s eager path on inputs without ties."""
    T, E = scores_TE.shape
    scores_TE = scores_TE.contiguous()
    idx = torch.empty(T, top_k, dtype=torch.int64, device=scores_TE.device)
    weight = torch.empty(T, top_k, dtype=torch.float32, device=scores_TE.device)
    group_size = E // n_group
    _noaux_topk_kernel[(T,)](
        scores_TE, bias_E.contiguous(), idx, weight, scores_TE.stride(0), float(scale),
        G=n_group, EG=group_size, TOPK_GROUP=topk_group, K=top_k, NORMALIZE=normalize,
        BLOCK_G=triton.next_power_of_2(n_group), BLOCK_EG=triton.next_power_of_2(group_size),
        BLOCK_K=triton.next_power_of_2(top_k),
        **_launch_options(scores_TE), num_warps=1 if E <= 128 else 4,
    )
    return idx, weight


def rotate_pairs_(
    q_pe_THr: torch.Tensor, k_pe_Tr: torch.Tensor | None, cos_Tr: torch.Tensor, sin_Tr: torch.Tensor
) -> None:
    """In place: rotate the pairs (x[2i], x[2i+1]) of q_pe_THr [T, H, R] (any row/head strides, last dim
    contiguous) and of k_pe_Tr [T, R] (or None) by the float32 angles cos_Tr/sin_Tr [T, R/2], as
    `apply_rotary_interleaved`."""
    T, H, R = q_pe_THr.shape
    if q_pe_THr.stride(-1) != 1 or (k_pe_Tr is not None and k_pe_Tr.stride(-1) != 1):
        raise ValueError("rotate_pairs_: q_pe and k_pe need a contiguous last dim")
    cos_Tr, sin_Tr = cos_Tr.contiguous(), sin_Tr.contiguous()
    heads = H if k_pe_Tr is None else H + 1  # program H rotates k_pe
    k_pe_Tr = q_pe_THr if k_pe_Tr is None else k_pe_Tr
    _rotate_pairs_kernel[(T, heads)](
        q_pe_THr, k_pe_Tr, cos_Tr, sin_Tr, H, q_pe_THr.stride(0), q_pe_THr.stride(1), k_pe_Tr.stride(0), R // 2,
        HALF=R // 2, BLOCK_HALF=triton.next_power_of_2(R // 2),
        **_launch_options(q_pe_THr), num_warps=1,
    )


# The split-key attention: keys per block, warps, pipeline stages of the split kernel; programs to aim for (B * head
# blocks * splits) and the most splits (each writes a float32 partial [H, L] that the combine reads back); up to
# `fold_partials` partials a head (batch x splits), the combine runs inside the W_UV kernel instead of a launch of
# its own (each of its programs combines its head's partials, re-reading them: at batch 32 that cost 0.4 ms a
# step); `values_block`: W_UV rows per program; `early_keys`: on a static cache, the split kernel reads its first
# block of keys before the PDL wait. From a sweep on one H100 (benchmarks/tune_decode_kernels.py --only attention,
# V3-Lite, batch 1): 6.4-6.9 us a layer at 1k keys for every setting; at 32k keys 24.7 us with up to 256 splits
# against 28.3 us with 128. In the captured step on an H200 (benchmarks/ab_decode_step.py, 1k keys): the combine
# inside W_UV saves 0.018-0.026 ms a step, the early keys 0.036 (0.047 at 32k); fewer programs (16-32) or other key
# blocks were slower.
ATTENTION_CONFIG = {"block_s": 32, "warps": 4, "stages": 3, "programs": 264, "max_splits": 256, "fold_partials": 64,
                    "values_block": 8, "early_keys": True}


def absorbed_decode_attention(
    q_lat_HBl: torch.Tensor, q_pe_HBr: torch.Tensor, c_kv_BSl: torch.Tensor, k_pe_BSr: torch.Tensor,
    bias_BS: torch.Tensor | None, scale: float, w_kv_b: torch.Tensor | None = None, nope_dim: int = 0,
    advance_length: torch.Tensor | None = None, config: dict | None = None,
) -> torch.Tensor:
    """One query token per sequence over the latent cache (multi-query: every head reads the same keys).

    q_lat_HBl [H, B, L] and q_pe_HBr [H, B, R] (strided views, last dim contiguous), c_kv_BSl [B, S, L],
    k_pe_BSr [B, S, R], bias_BS [B or 1, S] additive or None -> o_lat [H, B, L] in q's dtype:
    `softmax(scale * (q_lat . c_kv + q_pe . k_pe) + bias) @ c_kv`, softmax in float32. A row whose keys are all
    masked (-inf) gives zeros.

    With `w_kv_b` (kv_b_proj's weight [H * (N + V), L], N = `nope_dim`) W_UV (rows N..N+V of each head's block) is
    applied to o_lat: -> o [B, H * V], the heads' values side by side as o_proj reads them (with few partials, the
    combine and W_UV are one launch).

    `advance_length` is a static cache layer's device-side length, 0-dim int64, for the step that wrote the new
    token at slot `length` (`latent_norm_rope` with this cache, or `absorb_query` with `latent`): it is advanced by
    one once the keys are read, inside the combine (what `StaticLayer.update` does after its copies, without a
    launch of its own). It also tells the split kernel that every other slot was written before this forward's
    kernels, so it reads its first keys while the previous kernels run (USE_PDL) and only the new slot after them:
    a forward begins with kernels launched without PDL (the embedding lookup), which start only once all earlier
    work on the stream is done."""
    H, B, L = q_lat_HBl.shape
    S, R = c_kv_BSl.shape[1], k_pe_BSr.shape[-1]
    config = {**ATTENTION_CONFIG, **(config or {})}
    block_h, block_s = 16, config["block_s"]
    head_blocks = triton.cdiv(H, block_h)
    key_blocks = triton.cdiv(S, block_s)
    splits = max(1, min(key_blocks, config["max_splits"], triton.cdiv(config["programs"], B * head_blocks)))
    blocks_per_split = triton.cdiv(key_blocks, splits)
    splits = triton.cdiv(key_blocks, blocks_per_split)
    acc = torch.empty(B, H, splits, L, dtype=torch.float32, device=q_lat_HBl.device)
    running = torch.empty(2, B, H, splits, dtype=torch.float32, device=q_lat_HBl.device)
    has_bias = bias_BS is not None
    if has_bias:
        bias_BS = bias_BS.expand(B, S) if bias_BS.shape[0] == 1 else bias_BS
        if bias_BS.stride(-1) != 1:
            bias_BS = bias_BS.contiguous()
    bias_arg = bias_BS if has_bias else c_kv_BSl
    for t in (q_lat_HBl, q_pe_HBr, c_kv_BSl, k_pe_BSr):
        if t.stride(-1) != 1:
            raise ValueError("absorbed_decode_attention: inputs need a contiguous last dim")
    fresh = advance_length is not None
    length_arg = advance_length if fresh else running
    early = fresh and config["early_keys"]
    fp32_dot = q_lat_HBl.dtype == torch.float32
    _absorbed_attention_split_kernel[(B, head_blocks, splits)](
        q_lat_HBl, q_pe_HBr, c_kv_BSl, k_pe_BSr, bias_arg, length_arg, acc, running[0], running[1],
        H, S, L, R, blocks_per_split, float(scale),
        q_lat_HBl.stride(0), q_lat_HBl.stride(1), q_pe_HBr.stride(0), q_pe_HBr.stride(1),
        c_kv_BSl.stride(0), c_kv_BSl.stride(1), k_pe_BSr.stride(0), k_pe_BSr.stride(1),
        bias_BS.stride(0) if has_bias else 0,
        acc.stride(0), acc.stride(1), acc.stride(2), running.stride(1), running.stride(2),
        HAS_BIAS=has_bias, FRESH=early, PRECISION="ieee" if fp32_dot else "tf32",
        # tl.dot needs operands of at least 16 along the reduced dimension: pad L and R (masked loads).
        BLOCK_H=block_h, BLOCK_S=block_s, BLOCK_L=max(16, triton.next_power_of_2(L)),
        BLOCK_R=max(16, triton.next_power_of_2(R)),
        **_launch_options(q_lat_HBl), num_warps=config["warps"], num_stages=config["stages"],
    )
    block_splits = triton.next_power_of_2(splits)
    if w_kv_b is not None:
        rows_per_head = w_kv_b.shape[0] // H
        V = rows_per_head - nope_dim
        if w_kv_b.stride(-1) != 1 or w_kv_b.shape[1] != L:
            raise ValueError(f"absorbed_decode_attention: w_kv_b {tuple(w_kv_b.shape)} is not [H * (N + V), {L}]")
        values = torch.empty(B, H * V, dtype=q_lat_HBl.dtype, device=q_lat_HBl.device)
        block_v = config["values_block"]  # one pass over L per program: no loop-carried load latency
        if B * splits <= config["fold_partials"]:  # acc [B, H, splits, L] in place of o_lat [H, B, L]
            _head_values_kernel[(B, H, triton.cdiv(V, block_v))](
                acc, w_kv_b, values, L, nope_dim, V, acc.stride(1), acc.stride(0), w_kv_b.stride(0), values.stride(0),
                running[0], running[1], length_arg, splits, acc.stride(2), running.stride(1), running.stride(2),
                COMBINE=True, ADVANCE=fresh, ROWS_PER_HEAD=rows_per_head, BLOCK_SPLITS=block_splits, BLOCK_V=block_v,
                BLOCK_L=triton.next_power_of_2(L), **_launch_options(acc), num_warps=4,
            )
            return values
    out = torch.empty(H, B, L, dtype=q_lat_HBl.dtype, device=q_lat_HBl.device)
    block_l = max(16, min(64, 8192 // block_splits))  # at most 8K float32 partials per program
    _absorbed_attention_combine_kernel[(B, H, triton.cdiv(L, block_l))](
        acc, running[0], running[1], out, length_arg, L, splits,
        acc.stride(0), acc.stride(1), acc.stride(2), running.stride(1), running.stride(2), out.stride(0),
        out.stride(1), ADVANCE=fresh, BLOCK_SPLITS=block_splits, BLOCK_L=block_l,
        **_launch_options(acc), num_warps=4,
    )
    if w_kv_b is None:
        return out
    _head_values_kernel[(B, H, triton.cdiv(V, block_v))](
        out, w_kv_b, values, L, nope_dim, V, out.stride(0), out.stride(1), w_kv_b.stride(0), values.stride(0),
        out, out, out, 1, 0, 0, 0, COMBINE=False, ADVANCE=False, ROWS_PER_HEAD=rows_per_head, BLOCK_SPLITS=1,
        BLOCK_V=block_v, BLOCK_L=triton.next_power_of_2(L), **_launch_options(out), num_warps=4,
    )
    return values


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`s = x + delta` (rounded to x's dtype) and `RMSNorm(s) * weight` in one pass: the residual add before a
    pre-norm, as `residual + out` then `DeepseekV3RMSNorm`. x, delta [..., C] (last dim contiguous, same dtype),
    weight [C] in x's dtype -> (s, normed), both contiguous [..., C]."""
    C = x.shape[-1]
    x_2d, d_2d = x.reshape(-1, C), delta.reshape(-1, C)
    if x_2d.stride(-1) != 1 or d_2d.stride(-1) != 1:
        raise ValueError("add_rms_norm: inputs need a contiguous last dim")
    total = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    normed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(C)
    _add_rms_norm_kernel[(x_2d.shape[0],)](
        x_2d, d_2d, weight, total, normed, C, x_2d.stride(0), d_2d.stride(0), eps, BLOCK_C=block,
        **_launch_options(x_2d), num_warps=min(16, max(1, block // 256)),
    )
    return total, normed


def moe_combine(y_PD: torch.Tensor, weight_TK: torch.Tensor, shared_TD: torch.Tensor | None,
                residual_TD: torch.Tensor, shared_parts: int = 0,
                norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """The end of a MoE layer for a few tokens in one pass: `residual + ((sum_k w_k * y_k) + shared)`, with the
    eager path's roundings (the float32 routed sum to the activation dtype, then each add).

    y_PD [T * K, D] float32 (each (token, slot) pair's expert output, token-major), weight_TK [T, K] float32,
    shared_TD [T, D] or None, residual_TD [T, D] (the activation dtype) -> [T, D] in residual's dtype. With
    `shared_parts` S > 0 (no shared_TD), y_PD holds T * S more rows, the shared experts' output in S float32 parts
    per token (as `moe_kernels.expert_down` appends them), summed and rounded here. `norm = (weight [D], eps)`:
    -> `rms_norm(output, weight, eps)` instead (the model's final norm after its last layer), as `rms_norm`
    computes it."""
    T, K = weight_TK.shape
    D = y_PD.shape[-1]
    if shared_parts and (shared_TD is not None or y_PD.shape[0] != T * (K + shared_parts)):
        raise ValueError(f"moe_combine: shared_parts={shared_parts} needs y [T*(K+S), D] = [{T * (K + shared_parts)},"
                         f" {D}] and no shared_TD; found y {tuple(y_PD.shape)}")
    norm_weight, eps = norm if norm is not None else (residual_TD, 0.0)
    if norm is not None and (tuple(norm_weight.shape) != (D,) or not norm_weight.is_contiguous()):
        raise ValueError(f"moe_combine: the norm weight must be a contiguous [{D}]; found {tuple(norm_weight.shape)}")
    dtype = torch.result_type(norm_weight, residual_TD) if norm is not None else residual_TD.dtype
    out = torch.empty(T, D, dtype=dtype, device=residual_TD.device)
    shared_arg = shared_TD if shared_TD is not None else residual_TD
    for name, t in (("y_PD", y_PD), ("shared_TD", shared_arg), ("residual_TD", residual_TD)):
        if t.stride(-1) != 1:
            raise ValueError(f"moe_combine: {name} needs a contiguous last dim")
    # With the norm, one program a row with rms_norm's block and warps (its sum of squares in the same order).
    block = triton.next_power_of_2(D) if norm is not None else 256
    warps = min(16, max(1, block // 256)) if norm is not None else 2
    _moe_combine_kernel[(T, triton.cdiv(D, block))](
        y_PD, weight_TK.contiguous(), shared_arg, residual_TD, out, T, D, y_PD.stride(0), shared_arg.stride(0),
        residual_TD.stride(0), norm_weight, float(eps), K=K, HAS_SHARED=shared_TD is not None,
        SHARED_PARTS=shared_parts, NORM=norm is not None, BLOCK_D=block, **_launch_options(y_PD), num_warps=warps,
    )
    return out


def latent_norm_rope(
    projected_BTk: torch.Tensor, q_norm_weight: torch.Tensor, kv_norm_weight: torch.Tensor, eps: float,
    cos_Tr: torch.Tensor, sin_Tr: torch.Tensor,
    cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """After the fused q_a / kv_a projection `projected_BTk` [B, T, Q + L + R] ([q_a | c_kv | k_pe]), in one launch:
    q_a_layernorm(q_a), kv_a_layernorm(c_kv) and the RoPE of k_pe (angles cos_Tr/sin_Tr [B * T, R/2], float32).

    Without `cache`: -> (q_a_normed [B, T, Q], c_kv [B, T, L], k_pe [B, T, R]). With `cache = (c_kv_BSl,
    k_pe_BSr, length)` (a static cache layer's tensors [B, S, L] / [B, S, R] and its device-side length, a 0-dim
    int64 tensor): c_kv and k_pe are written into the slots `length + t` (no write past S) and -> (q_a_normed,
    None, None); the caller advances the length."""
    B, T, width = projected_BTk.shape
    Q, L = q_norm_weight.shape[0], kv_norm_weight.shape[0]
    R = width - Q - L
    rows = projected_BTk.reshape(B * T, width)
    if rows.stride(-1) != 1:
        raise ValueError("latent_norm_rope: the projection needs a contiguous last dim")
    q_out = torch.empty(B, T, Q, dtype=projected_BTk.dtype, device=projected_BTk.device)
    if cache is None:
        c_kv = torch.empty(B, T, L, dtype=projected_BTk.dtype, device=projected_BTk.device)
        k_pe = torch.empty(B, T, R, dtype=projected_BTk.dtype, device=projected_BTk.device)
        length, S = c_kv, T  # unused pointer when HAS_LENGTH is off
    else:
        c_kv, k_pe, length = cache
        S = c_kv.shape[1]
        if c_kv.stride(-1) != 1 or k_pe.stride(-1) != 1 or c_kv.shape[0] != B:
            raise ValueError("latent_norm_rope: the cache tensors need batch B and a contiguous last dim")
    cos_Tr, sin_Tr = cos_Tr.contiguous(), sin_Tr.contiguous()
    _latent_norm_rope_kernel[(B * T, 2)](
        rows, q_norm_weight, kv_norm_weight, cos_Tr, sin_Tr, length, q_out, c_kv, k_pe,
        T, Q, L, S, rows.stride(0), c_kv.stride(0), c_kv.stride(1), k_pe.stride(0), k_pe.stride(1), cos_Tr.stride(0),
        eps, HAS_LENGTH=cache is not None, HALF=R // 2, BLOCK_Q=triton.next_power_of_2(Q),
        BLOCK_L=triton.next_power_of_2(L), BLOCK_HALF=triton.next_power_of_2(R // 2),
        **_launch_options(rows), num_warps=4,
    )
    if cache is not None:
        return q_out, None, None
    return q_out, c_kv, k_pe


# Latent columns per program of `absorb_query` (L / block programs a head and row, plus q_pe's and the latent
# row's), for up to ABSORB_SMALL_BATCH rows and beyond. In the captured V3-Lite step on an H200
# (benchmarks/ab_decode_step.py's step_ms): at batch 1, 16 beat 64 by 0.008-0.009 ms a step (32 and 128 lost 0.016
# and 0.026); at batch 32 (ctx 2048), 64 beat 16 by 0.43 ms (17.20 against 17.65 ms).
ABSORB_BLOCK_L = 16
ABSORB_BLOCK_L_LARGE = 64
ABSORB_SMALL_BATCH = 4


def absorb_query(q_BHk: torch.Tensor, w_kv_b: torch.Tensor, cos_Br: torch.Tensor, sin_Br: torch.Tensor,
                 nope_dim: int, latent: tuple | None = None) -> torch.Tensor:
    """The absorbed query of one new token per sequence in one launch: `q_lat = q_nope @ W_UK` per head and the
    RoPE of q_pe. q_BHk [B, H, N + R] (q_b_proj's output, last dim contiguous), w_kv_b [H * (N + V), L], angles
    cos_Br/sin_Br [B, R/2] float32 -> [H, B, L + R] ([q_lat | rotated q_pe]) in q's dtype.

    `latent = (kv_Bk, kv_norm_weight, eps, (c_kv_BSl, k_pe_BSr, length))`: the same launch also writes the new
    token's latent row [c_kv | k_pe] (kv_Bk [B, L + R], last dim contiguous, as kv_a_proj_with_mqa wrote it) into a
    static cache at slot `length`, as `latent_norm_rope` with that cache does (kv_a_layernorm of c_kv, RoPE of k_pe)."""
    B, H, width = q_BHk.shape
    N, R = nope_dim, width - nope_dim
    L = w_kv_b.shape[1]
    if q_BHk.stride(-1) != 1 or w_kv_b.stride(-1) != 1:
        raise ValueError("absorb_query: inputs need a contiguous last dim")
    cos_Br, sin_Br = cos_Br.contiguous(), sin_Br.contiguous()
    out = torch.empty(H, B, L + R, dtype=q_BHk.dtype, device=q_BHk.device)
    if latent is not None:
        kv_Bk, kv_norm_weight, eps, (c_kv, k_pe, length) = latent
        if (tuple(kv_Bk.shape) != (B, L + R) or kv_Bk.stride(-1) != 1 or c_kv.shape[0] != B or c_kv.stride(-1) != 1
                or k_pe.stride(-1) != 1 or tuple(kv_norm_weight.shape) != (L,)):
            raise ValueError(f"absorb_query: latent needs kv [{B}, {L + R}] and cache tensors [{B}, S, {L}] / "
                             f"[{B}, S, {R}] (last dims contiguous) and a [{L}] norm weight; found kv "
                             f"{tuple(kv_Bk.shape)}, cache {tuple(c_kv.shape)} / {tuple(k_pe.shape)}, norm "
                             f"{tuple(kv_norm_weight.shape)}")
    else:
        kv_Bk, kv_norm_weight, eps, (c_kv, k_pe, length) = q_BHk, w_kv_b, 0.0, (out, out, out)
    block_l = ABSORB_BLOCK_L if B <= ABSORB_SMALL_BATCH else ABSORB_BLOCK_L_LARGE
    _absorb_query_kernel[(B, H, triton.cdiv(L, block_l) + (2 if latent is not None else 1))](
        q_BHk, w_kv_b, cos_Br, sin_Br, out, N, L, q_BHk.stride(0), q_BHk.stride(1), w_kv_b.stride(0),
        cos_Br.stride(0), out.stride(0), out.stride(1),
        kv_Bk, kv_norm_weight, length, c_kv, k_pe, c_kv.shape[1], kv_Bk.stride(0), c_kv.stride(0), c_kv.stride(1),
        k_pe.stride(0), k_pe.stride(1), float(eps),
        ROWS_PER_HEAD=w_kv_b.shape[0] // H, HALF=R // 2, LATENT=latent is not None,
        BLOCK_LATENT=triton.next_power_of_2(L), BLOCK_N=triton.next_power_of_2(N), BLOCK_L=block_l,
        BLOCK_HALF=triton.next_power_of_2(R // 2), **_launch_options(q_BHk), num_warps=4,
    )
    return out


__all__ = [
    "MAX_GEMV_TOKENS",
    "absorb_query",
    "absorbed_decode_attention",
    "add_rms_norm",
    "decode_kernels_available",
    "decode_prologue",
    "greedy_pick_",
    "latent_norm_rope",
    "linear_pair",
    "moe_combine",
    "noaux_topk",
    "rms_norm",
    "rotate_pairs_",
    "router_scores",
    "silu_gate_up",
]
