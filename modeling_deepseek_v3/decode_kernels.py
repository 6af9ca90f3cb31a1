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
  (with one weight: the matrix-vector product of q_b_proj, o_proj and the MLPs' down_proj);
- `router_scores` / `noaux_topk`: the `noaux_tc` router: sigmoid of float32 logits, then bias-selected
  group-limited top-k and the normalized, scaled weights of the unbiased scores (one program per token);
- `silu_gate_up`: `silu(x @ W_gate^T) * (x @ W_up^T)` for a few rows in one pass (dense MLP, shared experts);
- `rotate_pairs_`: interleaved-pair RoPE of every head of `q_pe` and of `k_pe`, in place, in one launch;
- `absorbed_decode_attention`: multi-query attention of one new token per sequence over the latent cache
  (scores `q_lat . c_kv + q_pe . k_pe`, float32 softmax, values `c_kv`), split over the keys
  (flash-decoding) so that a long context spreads over the GPU, then one combine.

Shapes: T tokens (rows), D input features, E experts, K experts per token, G expert groups, H heads, L latent
(kv_lora_rank), R rope dims, S cache slots.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

# Matrix-vector products re-read the weight per token: beyond a few rows cuBLAS is the better kernel.
MAX_GEMV_TOKENS = 4
# Tile of the matrix-vector kernels: 2 rows per program, 512 columns per step, 4 warps. The fastest of rows
# {2, 4, 8, 16} x columns {128, 256, 512} x warps {4, 8} on one H100 for every decode shape of the V3-Lite preset
# (q_a + kv_a, router, shared and dense gate/up): many narrow programs keep enough loads in flight.
GEMV_BLOCK_N, GEMV_BLOCK_D, GEMV_WARPS = 2, 512, 4


def decode_kernels_available(x: torch.Tensor) -> bool:
    """Whether the kernels can run on `x` (CUDA tensor, triton importable)."""
    return triton is not None and x.is_cuda


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, C, stride_x, stride_o, eps, BLOCK_C: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_C)
        mask = cols < C
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        variance = tl.sum(x * x, axis=0) / C
        # As the reference: normalized in float32, rounded to the input dtype, then times the weight.
        h = (x * tl.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        y = h.to(tl.float32) * w.to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _linear_pair_kernel(
        x_ptr, w1_ptr, w2_ptr, out_ptr, D, N1, N2,
        stride_xt, stride_w1, stride_w2, stride_ot,
        SIGMOID: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
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
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            x = tl.load(x_ptr + token * stride_xt + cols, mask=col_mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_w + cols[None, :],
                        mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        if SIGMOID:
            acc = 1.0 / (1.0 + tl.exp(-acc))
        tl.store(out_ptr + token * stride_ot + col0 + rows, acc.to(out_ptr.dtype.element_ty), mask=row_mask)

    @triton.jit
    def _silu_gate_up_kernel(
        x_ptr, gate_ptr, up_ptr, out_ptr, D, N, stride_xt, stride_g, stride_u, stride_ot,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        token = tl.program_id(0).to(tl.int64)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        acc_gate = tl.zeros((BLOCK_N,), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(x_ptr + token * stride_xt + cols, mask=col_mask, other=0.0).to(tl.float32)
            gate = tl.load(gate_ptr + rows[:, None].to(tl.int64) * stride_g + cols[None, :], mask=mask, other=0.0)
            up = tl.load(up_ptr + rows[:, None].to(tl.int64) * stride_u + cols[None, :], mask=mask, other=0.0)
            acc_gate += tl.sum(gate.to(tl.float32) * x[None, :], axis=1)
            acc_up += tl.sum(up.to(tl.float32) * x[None, :], axis=1)
        h = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up
        tl.store(out_ptr + token * stride_ot + rows, h.to(out_ptr.dtype.element_ty), mask=row_mask)

    @triton.jit
    def _noaux_topk_kernel(
        scores_ptr, bias_ptr, idx_ptr, weight_ptr, stride_s, scale,
        G: tl.constexpr, EG: tl.constexpr, TOPK_GROUP: tl.constexpr, K: tl.constexpr, NORMALIZE: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_EG: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
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
        HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        if head < H:
            base = q_ptr + row * stride_qt + head * stride_qh
        else:
            base = k_ptr + row * stride_kt
        i = tl.arange(0, BLOCK_HALF)
        mask = i < HALF
        cos = tl.load(cos_ptr + row * stride_ct + i, mask=mask, other=0.0)
        sin = tl.load(sin_ptr + row * stride_ct + i, mask=mask, other=0.0)
        x_even = tl.load(base + 2 * i, mask=mask, other=0.0).to(tl.float32)
        x_odd = tl.load(base + 2 * i + 1, mask=mask, other=0.0).to(tl.float32)
        even = x_even * cos - x_odd * sin
        odd = x_even * sin + x_odd * cos
        tl.store(base + 2 * i, even.to(base.dtype.element_ty), mask=mask)
        tl.store(base + 2 * i + 1, odd.to(base.dtype.element_ty), mask=mask)

    @triton.jit
    def _absorbed_attention_split_kernel(
        q_lat_ptr, q_pe_ptr, c_kv_ptr, k_pe_ptr, bias_ptr, acc_ptr, max_ptr, sum_ptr,
        H, S, L, R, blocks_per_split, scale,
        stride_qlh, stride_qlb, stride_qph, stride_qpb,
        stride_cb, stride_cs, stride_kb, stride_ks, stride_bb,
        stride_ab, stride_ah, stride_as, stride_mb, stride_mh,
        HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        split = tl.program_id(2)
        head_mask = head < H
        lat = tl.arange(0, BLOCK_L)
        rope = tl.arange(0, BLOCK_R)
        q_lat = tl.load(q_lat_ptr + head[:, None] * stride_qlh + b * stride_qlb + lat[None, :],
                        mask=head_mask[:, None] & (lat[None, :] < L), other=0.0)
        q_pe = tl.load(q_pe_ptr + head[:, None] * stride_qph + b * stride_qpb + rope[None, :],
                       mask=head_mask[:, None] & (rope[None, :] < R), other=0.0)
        # A finite start: a split whose keys are all masked keeps weight exp(-inf) = 0 and no NaN.
        running_max = tl.full((BLOCK_H,), -1e30, dtype=tl.float32)
        running_sum = tl.zeros((BLOCK_H,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_H, BLOCK_L), dtype=tl.float32)
        for block in range(split * blocks_per_split, (split + 1) * blocks_per_split):
            key = block * BLOCK_S + tl.arange(0, BLOCK_S)
            key_mask = key < S
            c_kv = tl.load(c_kv_ptr + b * stride_cb + key[:, None] * stride_cs + lat[None, :],
                           mask=key_mask[:, None] & (lat[None, :] < L), other=0.0)
            k_pe = tl.load(k_pe_ptr + b * stride_kb + key[:, None] * stride_ks + rope[None, :],
                           mask=key_mask[:, None] & (rope[None, :] < R), other=0.0)
            scores = tl.dot(q_lat, tl.trans(c_kv), input_precision=PRECISION)
            scores = tl.dot(q_pe, tl.trans(k_pe), acc=scores, input_precision=PRECISION) * scale
            if HAS_BIAS:
                scores += tl.load(bias_ptr + b * stride_bb + key, mask=key_mask, other=0.0).to(tl.float32)[None, :]
            scores = tl.where(key_mask[None, :], scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            correction = tl.exp(running_max - new_max)
            p = tl.exp(scores - new_max[:, None])
            running_sum = running_sum * correction + tl.sum(p, axis=1)
            acc = acc * correction[:, None] + tl.dot(p.to(c_kv.dtype), c_kv, input_precision=PRECISION)
            running_max = new_max
        tl.store(acc_ptr + b * stride_ab + head[:, None] * stride_ah + split * stride_as + lat[None, :], acc,
                 mask=head_mask[:, None] & (lat[None, :] < L))
        tl.store(max_ptr + b * stride_mb + head * stride_mh + split, running_max, mask=head_mask)
        tl.store(sum_ptr + b * stride_mb + head * stride_mh + split, running_sum, mask=head_mask)

    @triton.jit
    def _absorbed_attention_combine_kernel(
        acc_ptr, max_ptr, sum_ptr, out_ptr, L, SPLITS,
        stride_ab, stride_ah, stride_as, stride_mb, stride_mh, stride_oh, stride_ob,
        BLOCK_SPLITS: tl.constexpr, BLOCK_L: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1).to(tl.int64)
        lat = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
        split = tl.arange(0, BLOCK_SPLITS)
        stats = b * stride_mb + head * stride_mh
        split_max = tl.load(max_ptr + stats + split, mask=split < SPLITS, other=-1e30)
        split_sum = tl.load(sum_ptr + stats + split, mask=split < SPLITS, other=0.0)
        weight = tl.exp(split_max - tl.max(split_max, axis=0))  # [SPLITS], 0 for the padding
        total = tl.sum(weight * split_sum, axis=0)
        acc = tl.load(acc_ptr + b * stride_ab + head * stride_ah + split[:, None] * stride_as + lat[None, :],
                      mask=(split[:, None] < SPLITS) & (lat[None, :] < L), other=0.0)
        out = tl.sum(acc * weight[:, None], axis=0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + head * stride_oh + b * stride_ob + lat, out.to(out_ptr.dtype.element_ty), mask=lat < L)


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
        x_2d, weight, out, C, x_2d.stride(0), C, eps, BLOCK_C=block, num_warps=min(16, max(1, block // 256)),
    )
    return out


def linear_pair(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor | None, sigmoid: bool = False,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`x` [..., D] (at most MAX_GEMV_TOKENS rows), `w1` [N1, D], `w2` [N2, D] or None (then `x @ w1^T` alone) ->
    `[x @ w1^T | x @ w2^T]` [..., N1 + N2], accumulated in float32 and rounded once to `out_dtype` (default x's dtype); `sigmoid` applies
    the logistic function in float32 first. Reads each weight once per token."""
    D = x.shape[-1]
    x_2d = x.reshape(-1, D)
    if x_2d.stride(-1) != 1:
        x_2d = x_2d.contiguous()
    n1, n2 = w1.shape[0], (w2.shape[0] if w2 is not None else 0)
    w2 = w1 if w2 is None else w2
    if w1.stride(-1) != 1 or w2.stride(-1) != 1:
        raise ValueError("linear_pair: weights need a contiguous last dim")
    out = torch.empty(*x.shape[:-1], n1 + n2, dtype=out_dtype or x.dtype, device=x.device)
    grid = (x_2d.shape[0], triton.cdiv(n1, GEMV_BLOCK_N) + triton.cdiv(n2, GEMV_BLOCK_N))
    _linear_pair_kernel[grid](
        x_2d, w1, w2, out, D, n1, n2, x_2d.stride(0), w1.stride(0), w2.stride(0), n1 + n2,
        SIGMOID=sigmoid, BLOCK_N=GEMV_BLOCK_N, BLOCK_D=GEMV_BLOCK_D, num_warps=GEMV_WARPS,
    )
    return out


def silu_gate_up(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
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
    _silu_gate_up_kernel[(x_2d.shape[0], triton.cdiv(N, GEMV_BLOCK_N))](
        x_2d, w_gate, w_up, out, D, N, x_2d.stride(0), w_gate.stride(0), w_up.stride(0), N,
        BLOCK_N=GEMV_BLOCK_N, BLOCK_D=GEMV_BLOCK_D, num_warps=GEMV_WARPS,
    )
    return out


def router_scores(x_TD: torch.Tensor, weight_ED: torch.Tensor) -> torch.Tensor:
    """sigmoid(x @ W^T) [T, E] in float32 (float32 accumulation of the exact products of the inputs)."""
    return linear_pair(x_TD, weight_ED, None, sigmoid=True, out_dtype=torch.float32)


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
        BLOCK_K=triton.next_power_of_2(top_k), num_warps=1 if E <= 128 else 4,
    )
    return idx, weight


def rotate_pairs_(q_pe_THr: torch.Tensor, k_pe_Tr: torch.Tensor, cos_Tr: torch.Tensor, sin_Tr: torch.Tensor) -> None:
    """In place: rotate the pairs (x[2i], x[2i+1]) of q_pe_THr [T, H, R] (any row/head strides, last dim
    contiguous) and k_pe_Tr [T, R] by the float32 angles cos_Tr/sin_Tr [T, R/2], as `apply_rotary_interleaved`."""
    T, H, R = q_pe_THr.shape
    if q_pe_THr.stride(-1) != 1 or k_pe_Tr.stride(-1) != 1:
        raise ValueError("rotate_pairs_: q_pe and k_pe need a contiguous last dim")
    cos_Tr, sin_Tr = cos_Tr.contiguous(), sin_Tr.contiguous()
    _rotate_pairs_kernel[(T, H + 1)](
        q_pe_THr, k_pe_Tr, cos_Tr, sin_Tr, H, q_pe_THr.stride(0), q_pe_THr.stride(1), k_pe_Tr.stride(0), R // 2,
        HALF=R // 2, BLOCK_HALF=triton.next_power_of_2(R // 2), num_warps=1,
    )


def absorbed_decode_attention(
    q_lat_HBl: torch.Tensor, q_pe_HBr: torch.Tensor, c_kv_BSl: torch.Tensor, k_pe_BSr: torch.Tensor,
    bias_BS: torch.Tensor | None, scale: float,
) -> torch.Tensor:
    """One query token per sequence over the latent cache (multi-query: every head reads the same keys).

    q_lat_HBl [H, B, L] and q_pe_HBr [H, B, R] (strided views, last dim contiguous), c_kv_BSl [B, S, L],
    k_pe_BSr [B, S, R], bias_BS [B or 1, S] additive or None -> o_lat [H, B, L] in q's dtype:
    `softmax(scale * (q_lat . c_kv + q_pe . k_pe) + bias) @ c_kv`, softmax in float32. A row whose keys are all
    masked (-inf) gives zeros."""
    H, B, L = q_lat_HBl.shape
    S, R = c_kv_BSl.shape[1], k_pe_BSr.shape[-1]
    block_h, block_s = 16, 32
    head_blocks = triton.cdiv(H, block_h)
    key_blocks = triton.cdiv(S, block_s)
    # Enough programs to cover the GPU (B * head blocks * splits >= ~2 per SM), at most 128 splits: each split
    # writes a float32 partial [H, L] that the combine reads back. (Measured on one H100 at 1k and 32k keys.)
    splits = max(1, min(key_blocks, 128, triton.cdiv(264, B * head_blocks)))
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
    fp32_dot = q_lat_HBl.dtype == torch.float32
    _absorbed_attention_split_kernel[(B, head_blocks, splits)](
        q_lat_HBl, q_pe_HBr, c_kv_BSl, k_pe_BSr, bias_arg, acc, running[0], running[1],
        H, S, L, R, blocks_per_split, float(scale),
        q_lat_HBl.stride(0), q_lat_HBl.stride(1), q_pe_HBr.stride(0), q_pe_HBr.stride(1),
        c_kv_BSl.stride(0), c_kv_BSl.stride(1), k_pe_BSr.stride(0), k_pe_BSr.stride(1),
        bias_BS.stride(0) if has_bias else 0,
        acc.stride(0), acc.stride(1), acc.stride(2), running.stride(1), running.stride(2),
        HAS_BIAS=has_bias, PRECISION="ieee" if fp32_dot else "tf32",
        # tl.dot needs operands of at least 16 along the reduced dimension: pad L and R (masked loads).
        BLOCK_H=block_h, BLOCK_S=block_s, BLOCK_L=max(16, triton.next_power_of_2(L)),
        BLOCK_R=max(16, triton.next_power_of_2(R)), num_warps=4, num_stages=3,
    )
    out = torch.empty(H, B, L, dtype=q_lat_HBl.dtype, device=q_lat_HBl.device)
    _absorbed_attention_combine_kernel[(B, H, triton.cdiv(L, 64))](
        acc, running[0], running[1], out, L, splits,
        acc.stride(0), acc.stride(1), acc.stride(2), running.stride(1), running.stride(2), out.stride(0),
        out.stride(1), BLOCK_SPLITS=triton.next_power_of_2(splits), BLOCK_L=64, num_warps=4,
    )
    return out


__all__ = [
    "MAX_GEMV_TOKENS",
    "absorbed_decode_attention",
    "decode_kernels_available",
    "linear_pair",
    "noaux_topk",
    "rms_norm",
    "rotate_pairs_",
    "router_scores",
    "silu_gate_up",
]
