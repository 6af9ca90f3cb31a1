"""Triton kernels for decode-sized MoE: matrix-vector products that read only the chosen experts' weights.

At decode batch sizes a token meets K experts and most experts meet no token. A grouped GEMM still walks every
expert, and gathering the chosen experts' weights first copies them (three passes over those bytes). These two
kernels index the fused expert tensors in place, so each chosen expert's weights cross memory once:

- `expert_gate_up_act`: for every (token, expert) pair p, `h[p] = act(W_gate[e] @ x[t]) * (W_up[e] @ x[t])`
  with `W_gate`/`W_up` the two halves of `gate_up_proj[e]` ([E, 2I, D]);
- `expert_down`: `y[p] = down_proj[e] @ h[p]` ([E, D, I]).

Accumulation is float32. `DeepseekV3Experts` uses them for `moe_implementation="triton"` (and "auto" on CUDA at
decode sizes); `_forward_eager` is the reference they are tested against.

One more kernel pair serves the grouped-GEMM path (prefill and training), where the expert outputs arrive sorted by
expert: `combine_sorted_pairs` sums each token's K weighted outputs in float32, reading each token's rows where they
sit (no float32 copy of the weighted rows, no atomic scatter-add), with a backward that writes the rows' gradient
and the weights' gradient in one pass. `modeling_deepseek_v3._WeightedCombine` is its eager reference.
"""

import torch

from .decode_kernels import _launch_options, gdc_launch_dependents, gdc_wait, triton

if triton is not None:
    import triton.language as tl


def triton_moe_available(x: torch.Tensor) -> bool:
    """Whether the kernels can run on `x` (CUDA tensor, triton importable)."""
    return triton is not None and x.is_cuda


if triton is not None:

    @triton.jit
    def _gate_up_act_kernel(
        x_ptr, w_ptr, expert_ptr, shared_gate_ptr, shared_up_ptr, out_ptr, K, P_ROUTED, S, I, D,
        stride_xt, stride_we, stride_wr, stride_sr, stride_op,
        BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
    ):
        # See decode_kernels.USE_PDL. The routed pairs' experts come from the router's kernel, just before this one:
        # their programs wait first. The shared experts' programs load their first weights before the wait. Every
        # program lets the next kernel (`_down_kernel`) launch only after its wait, so that the down projection may
        # read the experts before its own wait.
        pair = tl.program_id(0)
        block = tl.program_id(1)
        if pair < P_ROUTED:  # (token, slot) pair: rows [0, I) of expert e's gate_up block are gate, [I, 2I) up
            if PDL:
                gdc_wait()
                gdc_launch_dependents()
            token = pair // K
            expert = tl.load(expert_ptr + pair).to(tl.int64)
            gate_base = w_ptr + expert * stride_we
            up_base = gate_base + I * stride_wr
            stride_r = stride_wr
        else:  # (token, part) of the shared experts: rows [part * I, (part + 1) * I) of their gate and up weights
            token = (pair - P_ROUTED) // S
            part = ((pair - P_ROUTED) % S).to(tl.int64)
            gate_base = shared_gate_ptr + part * I * stride_sr
            up_base = shared_up_ptr + part * I * stride_sr
            stride_r = stride_sr
        rows = block * BLOCK_I + tl.arange(0, BLOCK_I)
        row_mask = rows < I
        acc_gate = tl.zeros((BLOCK_I,), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_I,), dtype=tl.float32)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            mask = row_mask[:, None] & col_mask[None, :]
            w_gate = tl.load(gate_base + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
            w_up = tl.load(up_base + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
            if PDL:  # (the routed pairs' programs have waited already)
                gdc_wait()
                gdc_launch_dependents()
            x = tl.load(x_ptr + token * stride_xt + cols, mask=col_mask, other=0.0).to(tl.float32)
            acc_gate += tl.sum(w_gate.to(tl.float32) * x[None, :], axis=1)
            acc_up += tl.sum(w_up.to(tl.float32) * x[None, :], axis=1)
        # SiLU in float32, then the product rounded once to the activation dtype.
        h = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up
        tl.store(out_ptr + pair * stride_op + rows, h.to(out_ptr.dtype.element_ty), mask=row_mask)

    @triton.jit
    def _down_kernel(
        h_ptr, w_ptr, expert_ptr, shared_down_ptr, out_ptr, P_ROUTED, S, D, I,
        stride_hp, stride_we, stride_wr, stride_sr, stride_op,
        BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr, PDL: tl.constexpr,
    ):
        if PDL:
            gdc_launch_dependents()
        pair = tl.program_id(0)
        block = tl.program_id(1)
        if pair < P_ROUTED:  # expert e's down_proj [D, I]
            # Read before the wait (see USE_PDL): the router's kernel wrote the experts, and `_gate_up_act_kernel`,
            # the kernel before this one, lets this one launch only after its own wait on the router's kernel.
            expert = tl.load(expert_ptr + pair).to(tl.int64)
            w_base = w_ptr + expert * stride_we
            stride_r = stride_wr
        else:  # columns [part * I, (part + 1) * I) of the shared experts' down_proj [D, S * I]
            part = ((pair - P_ROUTED) % S).to(tl.int64)
            w_base = shared_down_ptr + part * I
            stride_r = stride_sr
        rows = block * BLOCK_D + tl.arange(0, BLOCK_D)
        row_mask = rows < D
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for start in range(0, I, BLOCK_I):
            cols = start + tl.arange(0, BLOCK_I)
            col_mask = cols < I
            w = tl.load(w_base + rows[:, None] * stride_r + cols[None, :],
                        mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            if PDL:  # the weights are in flight; h is the previous kernel's output
                gdc_wait()
            h = tl.load(h_ptr + pair * stride_hp + cols, mask=col_mask, other=0.0).to(tl.float32)
            acc += tl.sum(w.to(tl.float32) * h[None, :], axis=1)
        tl.store(out_ptr + pair * stride_op + rows, acc, mask=row_mask)

    @triton.jit
    def _combine_forward_kernel(
        y_ptr, position_ptr, w_ptr, out_ptr, stride_y, stride_o,
        K: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # out[t] = sum_k w[t, k] * y[position[t, k]], float32, k in order (one program per token and column tile).
        token = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = cols < D
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for k in tl.static_range(K):
            row = tl.load(position_ptr + token * K + k).to(tl.int64)
            w = tl.load(w_ptr + token * K + k).to(tl.float32)
            acc += w * tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + token * stride_o + cols, acc, mask=mask)

    @triton.jit
    def _combine_backward_kernel(
        grad_ptr, y_ptr, position_ptr, w_ptr, grad_y_ptr, grad_w_ptr, stride_g, stride_y,
        K: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # One program per (token, slot) pair p = t * K + k, its row r = position[p]: grad_y[r] = w[p] * grad[t]
        # (rounded to y's dtype) and grad_w[p] = grad[t] . y[r] (float32).
        pair = tl.program_id(0).to(tl.int64)
        token = pair // K
        row = tl.load(position_ptr + pair).to(tl.int64)
        w = tl.load(w_ptr + pair).to(tl.float32)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for start in tl.static_range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            mask = cols < D
            g = tl.load(grad_ptr + token * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(grad_y_ptr + row * stride_y + cols, (g * w).to(grad_y_ptr.dtype.element_ty), mask=mask)
            acc += g * y
        tl.store(grad_w_ptr + pair, tl.sum(acc, axis=0))


COMBINE_BLOCK_D = 1024  # columns per program (forward) or per step (backward); 4 warps


class _CombineSortedPairs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_PD, position_TK, w_TK):
        T, K = position_TK.shape
        D = y_PD.shape[1]
        out_TD = torch.empty(T, D, dtype=torch.float32, device=y_PD.device)
        _combine_forward_kernel[(T, triton.cdiv(D, COMBINE_BLOCK_D))](
            y_PD, position_TK, w_TK, out_TD, y_PD.stride(0), out_TD.stride(0), K=K, D=D, BLOCK_D=COMBINE_BLOCK_D,
            num_warps=4,
        )
        ctx.save_for_backward(y_PD, position_TK, w_TK)
        return out_TD

    @staticmethod
    def backward(ctx, grad_TD):
        y_PD, position_TK, w_TK = ctx.saved_tensors
        T, K = position_TK.shape
        grad_TD = grad_TD.contiguous()
        grad_y = torch.empty_like(y_PD)
        grad_w = torch.empty(T, K, dtype=torch.float32, device=y_PD.device)
        _combine_backward_kernel[(T * K,)](
            grad_TD, y_PD, position_TK, w_TK, grad_y, grad_w, grad_TD.stride(0), y_PD.stride(0),
            K=K, D=y_PD.shape[1], BLOCK_D=COMBINE_BLOCK_D, num_warps=4,
        )
        return grad_y, None, grad_w.to(w_TK.dtype)


def combine_sorted_pairs(y_PD: torch.Tensor, position_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
    """y_PD [T*K, D] (the expert outputs in expert-sorted order), position_TK [T, K] (the row of y_PD that holds
    token t's k-th expert output), w_TK [T, K] (routing weights) -> float32 [T, D],
    `out[t] = sum_k w[t, k] * y[position[t, k]]`; differentiable in y_PD and w_TK."""
    if y_PD.dim() != 2 or position_TK.numel() != y_PD.shape[0] or w_TK.shape != position_TK.shape:
        raise ValueError(f"combine_sorted_pairs: expected y [T*K, D], position and weights [T, K]; found y "
                         f"{tuple(y_PD.shape)}, position {tuple(position_TK.shape)}, weights {tuple(w_TK.shape)}")
    if position_TK.shape[0] == 0:  # (a grid of zero programs does not launch)
        return y_PD.new_zeros(0, y_PD.shape[1], dtype=torch.float32)
    return _CombineSortedPairs.apply(y_PD.contiguous(), position_TK.contiguous(), w_TK.contiguous())


# Tiles (rows per program, columns per step, warps), the fastest of a sweep on one H200 at the V3-Lite decode shapes
# (`benchmarks/tune_decode_kernels.py --only moe`: 6 routed + 2 shared experts of one token; copy bandwidth 4.15
# TB/s): gate/up 22.3 us a layer (4.13 TB/s) against 22.9 us for the H100's (2, 2048, 2). The down projection loads
# its weights before the PDL wait: whole rows, so that a program issues them all at once; in the captured step
# (benchmarks/ab_decode_step.py, H200) (8, 2048, 4) beat the isolated sweep's (8, 256, 4) by 0.079 ms a step.
GATE_UP_TILE = (4, 2048, 4)
DOWN_TILE = (8, 2048, 4)


def _shared_parts(what: str, weights: dict, width_dim: int, I: int, D: int, dtype: torch.dtype) -> int:
    """How many expert-width parts S the shared experts' weights hold (0 when none is given), after checking them:
    `weights` maps argument names to 2D weights whose dim `width_dim` is the intermediate side (S * I) and whose
    other dim is D."""
    if all(w is None for w in weights.values()):
        return 0
    for name, w in weights.items():
        if w is None or w.dim() != 2 or w.stride(-1) != 1 or w.dtype != dtype:
            found = None if w is None else f"{tuple(w.shape)} {w.dtype}"
            raise ValueError(f"{what}: {name} must be a 2D {dtype} weight with a contiguous last dim (the shared "
                             f"experts' weights come together: {', '.join(weights)}); found {found}")
    width = next(iter(weights.values())).shape[width_dim]
    expected = (width, D) if width_dim == 0 else (D, width)
    if width % I or any(tuple(w.shape) != expected for w in weights.values()):
        raise ValueError(f"{what}: the shared experts' weights must be {expected} with a multiple of the expert "
                         f"width {I} on the intermediate side; found {[tuple(w.shape) for w in weights.values()]}")
    return width // I


def expert_gate_up_act(x_TD: torch.Tensor, gate_up_proj: torch.Tensor, flat_expert: torch.Tensor, K: int,
                       tile: tuple[int, int, int] | None = None, shared_gate: torch.Tensor | None = None,
                       shared_up: torch.Tensor | None = None) -> torch.Tensor:
    """x_TD [T, D], gate_up_proj [E, 2I, D] (contiguous), flat_expert [T*K] -> silu(gate) * up [T*K, I] in x's
    dtype (SiLU only: the DeepSeek-V3 activation).

    With the shared experts' gate and up weights [S*I, D] (S expert-width parts; `DeepseekV3MLP` of width S*I), the
    same launch appends their T*S rows: row T*K + t*S + s is part s of the shared experts for token t."""
    P, I, D = flat_expert.numel(), gate_up_proj.shape[1] // 2, x_TD.shape[1]
    S = _shared_parts("expert_gate_up_act", {"shared_gate": shared_gate, "shared_up": shared_up}, 0, I, D,
                      gate_up_proj.dtype)
    if S and shared_gate.stride(0) != shared_up.stride(0):
        raise ValueError("expert_gate_up_act: shared_gate and shared_up need the same row stride")
    shared_gate = gate_up_proj if shared_gate is None else shared_gate
    shared_up = gate_up_proj if shared_up is None else shared_up
    block_i, block_d, warps = tile or GATE_UP_TILE
    out = torch.empty(P + x_TD.shape[0] * S, I, dtype=x_TD.dtype, device=x_TD.device)
    grid = (out.shape[0], triton.cdiv(I, block_i))
    _gate_up_act_kernel[grid](
        x_TD, gate_up_proj, flat_expert, shared_gate, shared_up, out, K, P, max(S, 1), I, D,
        x_TD.stride(0), gate_up_proj.stride(0), gate_up_proj.stride(1), shared_gate.stride(0), out.stride(0),
        BLOCK_I=block_i, BLOCK_D=block_d, **_launch_options(x_TD), num_warps=warps,
    )
    return out


def expert_down(h_PI: torch.Tensor, down_proj: torch.Tensor, flat_expert: torch.Tensor,
                tile: tuple[int, int, int] | None = None, shared_down: torch.Tensor | None = None) -> torch.Tensor:
    """h_PI [T*K, I], down_proj [E, D, I] (contiguous), flat_expert [T*K] -> float32 [T*K, D].

    With the shared experts' down weight [D, S*I], h_PI also holds their T*S rows after the routed ones (as
    `expert_gate_up_act` appends them) and the output has T*K + T*S rows: part s of the shared experts' down
    projection for token t at row T*K + t*S + s (their sum over s is the shared experts' output)."""
    P_routed = flat_expert.numel()
    I = h_PI.shape[1]
    D = down_proj.shape[1]
    S = _shared_parts("expert_down", {"shared_down": shared_down}, 1, I, D, down_proj.dtype)
    extra = h_PI.shape[0] - P_routed
    if extra < 0 or (extra and not S) or (S and extra % S):
        raise ValueError(f"expert_down: h has {h_PI.shape[0]} rows for {P_routed} routed pairs and {S} shared parts")
    shared_down = down_proj if shared_down is None else shared_down
    block_d, block_i, warps = tile or DOWN_TILE
    out = torch.empty(h_PI.shape[0], D, dtype=torch.float32, device=h_PI.device)
    grid = (out.shape[0], triton.cdiv(D, block_d))
    _down_kernel[grid](
        h_PI, down_proj, flat_expert, shared_down, out, P_routed, max(S, 1), D, I,
        h_PI.stride(0), down_proj.stride(0), down_proj.stride(1), shared_down.stride(0), out.stride(0),
        BLOCK_D=block_d, BLOCK_I=block_i, **_launch_options(h_PI), num_warps=warps,
    )
    return out


__all__ = ["combine_sorted_pairs", "expert_down", "expert_gate_up_act", "triton_moe_available"]
