"""Triton kernels for decode-sized MoE: matrix-vector products that read only the chosen experts' weights.

At decode batch sizes a token meets K experts and most experts meet no token. A grouped GEMM still walks every
expert, and gathering the chosen experts' weights first copies them (three passes over those bytes). These two
kernels index the fused expert tensors in place, so each chosen expert's weights cross memory once:

- `expert_gate_up_act`: for every (token, expert) pair p, `h[p] = act(W_gate[e] @ x[t]) * (W_up[e] @ x[t])`
  with `W_gate`/`W_up` the two halves of `gate_up_proj[e]` ([E, 2I, D]);
- `expert_down`: `y[p] = down_proj[e] @ h[p]` ([E, D, I]).

Accumulation is float32. `DeepseekV3Experts` uses them for `moe_implementation="triton"` (and "auto" on CUDA at
decode sizes); `_forward_eager` is the reference they are tested against.
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
        x_ptr, w_ptr, expert_ptr, out_ptr, K, I, D,
        stride_xt, stride_we, stride_wr, stride_op,
        BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
    ):
        if PDL:  # see decode_kernels.USE_PDL; the experts to read come from the router's kernel
            gdc_launch_dependents()
            gdc_wait()
        pair = tl.program_id(0)
        block = tl.program_id(1)
        token = pair // K
        expert = tl.load(expert_ptr + pair).to(tl.int64)
        rows = block * BLOCK_I + tl.arange(0, BLOCK_I)
        row_mask = rows < I
        acc_gate = tl.zeros((BLOCK_I,), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_I,), dtype=tl.float32)
        w_base = w_ptr + expert * stride_we
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            x = tl.load(x_ptr + token * stride_xt + cols, mask=col_mask, other=0.0).to(tl.float32)
            mask = row_mask[:, None] & col_mask[None, :]
            w_gate = tl.load(w_base + rows[:, None] * stride_wr + cols[None, :], mask=mask, other=0.0)
            w_up = tl.load(w_base + (rows[:, None] + I) * stride_wr + cols[None, :], mask=mask, other=0.0)
            acc_gate += tl.sum(w_gate.to(tl.float32) * x[None, :], axis=1)
            acc_up += tl.sum(w_up.to(tl.float32) * x[None, :], axis=1)
        # SiLU in float32, then the product rounded once to the activation dtype.
        h = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up
        tl.store(out_ptr + pair * stride_op + rows, h.to(out_ptr.dtype.element_ty), mask=row_mask)

    @triton.jit
    def _down_kernel(
        h_ptr, w_ptr, expert_ptr, out_ptr, D, I,
        stride_hp, stride_we, stride_wr, stride_op,
        BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr, PDL: tl.constexpr,
    ):
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        pair = tl.program_id(0)
        block = tl.program_id(1)
        expert = tl.load(expert_ptr + pair).to(tl.int64)
        rows = block * BLOCK_D + tl.arange(0, BLOCK_D)
        row_mask = rows < D
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        w_base = w_ptr + expert * stride_we
        for start in range(0, I, BLOCK_I):
            cols = start + tl.arange(0, BLOCK_I)
            col_mask = cols < I
            h = tl.load(h_ptr + pair * stride_hp + cols, mask=col_mask, other=0.0).to(tl.float32)
            w = tl.load(w_base + rows[:, None] * stride_wr + cols[None, :],
                        mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * h[None, :], axis=1)
        tl.store(out_ptr + pair * stride_op + rows, acc, mask=row_mask)


# Tiles (rows per program, columns per step, warps) of the two kernels, the fastest of a sweep on one H100 at the
# V3-Lite decode shapes (`benchmarks/tune_decode_kernels.py`, K=6 experts of one token): gate/up 24.9 us a layer
# (2.78 TB/s) against 32.4 us for (16, 256, 4); down 13.8 us (2.50 TB/s) against 16.8 us.
GATE_UP_TILE = (2, 2048, 2)
DOWN_TILE = (2, 2048, 8)


def expert_gate_up_act(x_TD: torch.Tensor, gate_up_proj: torch.Tensor, flat_expert: torch.Tensor, K: int,
                       tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x_TD [T, D], gate_up_proj [E, 2I, D] (contiguous), flat_expert [T*K] -> silu(gate) * up [T*K, I] in x's
    dtype (SiLU only: the DeepSeek-V3 activation)."""
    P, I, D = flat_expert.numel(), gate_up_proj.shape[1] // 2, x_TD.shape[1]
    block_i, block_d, warps = tile or GATE_UP_TILE
    out = torch.empty(P, I, dtype=x_TD.dtype, device=x_TD.device)
    grid = (P, triton.cdiv(I, block_i))
    _gate_up_act_kernel[grid](
        x_TD, gate_up_proj, flat_expert, out, K, I, D,
        x_TD.stride(0), gate_up_proj.stride(0), gate_up_proj.stride(1), out.stride(0),
        BLOCK_I=block_i, BLOCK_D=block_d, **_launch_options(x_TD), num_warps=warps,
    )
    return out


def expert_down(h_PI: torch.Tensor, down_proj: torch.Tensor, flat_expert: torch.Tensor,
                tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """h_PI [T*K, I], down_proj [E, D, I] (contiguous), flat_expert [T*K] -> float32 [T*K, D]."""
    P, I = h_PI.shape
    D = down_proj.shape[1]
    block_d, block_i, warps = tile or DOWN_TILE
    out = torch.empty(P, D, dtype=torch.float32, device=h_PI.device)
    grid = (P, triton.cdiv(D, block_d))
    _down_kernel[grid](
        h_PI, down_proj, flat_expert, out, D, I,
        h_PI.stride(0), down_proj.stride(0), down_proj.stride(1), out.stride(0),
        BLOCK_D=block_d, BLOCK_I=block_i, **_launch_options(h_PI), num_warps=warps,
    )
    return out


__all__ = ["expert_down", "expert_gate_up_act", "triton_moe_available"]
