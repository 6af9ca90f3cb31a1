"""Triton kernels with their own backward for CUDA training (`config.training_kernels`, on by default).

`rms_norm_training`: RMSNorm as one forward and one backward kernel instead of eager ops. The eager
`DeepseekV3RMSNorm` is seven kernels forward and about ten backward, and autograd keeps a float32 copy of its input
for backward (4 bytes per element for every norm of every layer); this keeps the input in its own dtype and one
float32 scale per row. Same math as the eager reference: float32 statistics, the normalized value rounded to the
input dtype before the weight multiply; the backward treats that rounding as the identity, as autograd does.

`silu_mul_training`: the gated activation `silu(gate) * up` of the dense MLPs, the shared experts and the grouped
routed experts as one forward and one backward kernel; autograd keeps gate and up (the halves of one projection
output) and recomputes the SiLU, where the eager ops also keep `silu(gate)`.

`rotate_pairs_training`: the interleaved-pair RoPE of every head of q_pe and of the shared k_pe in one launch each
way (the eager `apply_rotary_interleaved` is about nine kernels forward and a dozen backward for each of the two);
the backward is the rotation by the opposite angle. Nothing is saved but the angles.

Shapes: rows of C features (N for the activation's width).
"""

import torch

from .decode_kernels import triton

if triton is not None:
    import triton.language as tl

    from .decode_kernels import _rotate_pairs_row

    @triton.jit
    def _rms_norm_forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, C, stride_x, eps, BLOCK_C: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_C)
        mask = cols < C
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / C + eps)
        h = (x * rstd).to(x_ptr.dtype.element_ty)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * C + cols, (h.to(tl.float32) * w).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _rms_norm_backward_kernel(
        x_ptr, w_ptr, rstd_ptr, dy_ptr, dx_ptr, dw_rows_ptr, C, stride_x, BLOCK_C: tl.constexpr,
    ):
        # y = w * round(x * rstd): dw gets dy * round(x * rstd) (summed over rows by the caller), and with
        # g = dy * w, dx = rstd * (g - x_hat * mean(g * x_hat)), x_hat = x * rstd.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_C)
        mask = cols < C
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        dy = tl.load(dy_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        x_hat = x * rstd
        tl.store(dw_rows_ptr + row * C + cols, dy * x_hat.to(x_ptr.dtype.element_ty).to(tl.float32), mask=mask)
        g = dy * w
        dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=0) / C))
        tl.store(dx_ptr + row * C + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


    @triton.jit
    def _silu_mul_forward_kernel(g_ptr, u_ptr, h_ptr, N, stride_g, stride_u, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        # The eager roundings: silu(gate) to the activation dtype, then the product.
        s = (g / (1.0 + tl.exp(-g))).to(h_ptr.dtype.element_ty).to(tl.float32)
        tl.store(h_ptr + row * N + cols, (s * u).to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_backward_kernel(g_ptr, u_ptr, dh_ptr, dg_ptr, du_ptr, N, stride_g, stride_u, BLOCK: tl.constexpr):
        # h = silu(g) * u: du = dh * silu(g), dg = dh * u * sigmoid(g) * (1 + g * (1 - sigmoid(g))).
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(dh_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-g))
        s = (g * sig).to(du_ptr.dtype.element_ty).to(tl.float32)
        tl.store(du_ptr + row * N + cols, (dh * s).to(du_ptr.dtype.element_ty), mask=mask)
        dg = dh * u * sig * (1.0 + g * (1.0 - sig))
        tl.store(dg_ptr + row * N + cols, dg.to(dg_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotate_pairs_training_kernel(
        q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, H,
        stride_qt, stride_qh, stride_kt, stride_qot, stride_qoh, stride_kot, stride_ct,
        HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    ):
        # Program (t, h < H) rotates head h of q at row t, program (t, H) the row's k; out of place.
        row = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        if head < H:
            src = q_ptr + row * stride_qt + head * stride_qh
            dst = q_out_ptr + row * stride_qot + head * stride_qoh
        else:
            src = k_ptr + row * stride_kt
            dst = k_out_ptr + row * stride_kot
        i = tl.arange(0, BLOCK_HALF)
        _rotate_pairs_row(src, dst, cos_ptr + row * stride_ct, sin_ptr + row * stride_ct, i, i < HALF)


def _rotate_pairs_launch(q_THr, k_Tr, q_out, k_out, cos_Tr, sin_Tr):
    T, H, R = q_THr.shape
    _rotate_pairs_training_kernel[(T, H + 1)](
        q_THr, k_Tr, q_out, k_out, cos_Tr, sin_Tr, H,
        q_THr.stride(0), q_THr.stride(1), k_Tr.stride(0), q_out.stride(0), q_out.stride(1), k_out.stride(0),
        cos_Tr.stride(0), HALF=R // 2, BLOCK_HALF=triton.next_power_of_2(R // 2), num_warps=1,
    )


class _RotatePairs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_THr, k_Tr, cos_Tr, sin_Tr):
        q_out = torch.empty(q_THr.shape, dtype=q_THr.dtype, device=q_THr.device)
        k_out = torch.empty(k_Tr.shape, dtype=k_Tr.dtype, device=k_Tr.device)
        _rotate_pairs_launch(q_THr, k_Tr, q_out, k_out, cos_Tr, sin_Tr)
        ctx.save_for_backward(cos_Tr, sin_Tr)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_THr, dk_Tr):
        # A rotation's transpose is the rotation by the opposite angle.
        cos_Tr, sin_Tr = ctx.saved_tensors
        dq_THr = dq_THr if dq_THr.stride(-1) == 1 else dq_THr.contiguous()
        dk_Tr = dk_Tr if dk_Tr.stride(-1) == 1 else dk_Tr.contiguous()
        dq_in = torch.empty(dq_THr.shape, dtype=dq_THr.dtype, device=dq_THr.device)
        dk_in = torch.empty(dk_Tr.shape, dtype=dk_Tr.dtype, device=dk_Tr.device)
        _rotate_pairs_launch(dq_THr, dk_Tr, dq_in, dk_in, cos_Tr, -sin_Tr)
        return dq_in, dk_in, None, None


SILU_MUL_BLOCK = 1024


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        N = gate.shape[-1]
        g_2d, u_2d = gate.reshape(-1, N), up.reshape(-1, N)
        rows = g_2d.shape[0]
        h = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
        grid = (rows, triton.cdiv(N, SILU_MUL_BLOCK))
        _silu_mul_forward_kernel[grid](g_2d, u_2d, h, N, g_2d.stride(0), u_2d.stride(0), BLOCK=SILU_MUL_BLOCK,
                                       num_warps=4)
        ctx.save_for_backward(g_2d, u_2d)
        ctx.shape = gate.shape
        return h

    @staticmethod
    def backward(ctx, dh):
        g_2d, u_2d = ctx.saved_tensors
        rows, N = g_2d.shape
        dh = dh.contiguous()
        dg = torch.empty(ctx.shape, dtype=g_2d.dtype, device=g_2d.device)
        du = torch.empty(ctx.shape, dtype=u_2d.dtype, device=u_2d.device)
        grid = (rows, triton.cdiv(N, SILU_MUL_BLOCK))
        _silu_mul_backward_kernel[grid](g_2d, u_2d, dh, dg, du, N, g_2d.stride(0), u_2d.stride(0),
                                        BLOCK=SILU_MUL_BLOCK, num_warps=4)
        return dg, du


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        C = x.shape[-1]
        x_2d = x.reshape(-1, C)
        if x_2d.stride(-1) != 1:
            x_2d = x_2d.contiguous()
        rows = x_2d.shape[0]
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(C)
        warps = min(16, max(1, block // 256))
        _rms_norm_forward_kernel[(rows,)](x_2d, weight, y, rstd, C, x_2d.stride(0), eps, BLOCK_C=block, num_warps=warps)
        ctx.save_for_backward(x_2d, weight, rstd)
        ctx.x_shape, ctx.block, ctx.warps = x.shape, block, warps
        return y

    @staticmethod
    def backward(ctx, dy):
        x_2d, weight, rstd = ctx.saved_tensors
        rows, C = x_2d.shape
        dy = dy.contiguous()
        dx = torch.empty(ctx.x_shape, dtype=x_2d.dtype, device=x_2d.device)
        dw_rows = torch.empty(rows, C, dtype=torch.float32, device=x_2d.device)
        _rms_norm_backward_kernel[(rows,)](
            x_2d, weight, rstd, dy, dx, dw_rows, C, x_2d.stride(0), BLOCK_C=ctx.block, num_warps=ctx.warps,
        )
        return dx, dw_rows.sum(dim=0).to(weight.dtype), None


def rms_norm_training(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`DeepseekV3RMSNorm` of x [..., C] (last dim contiguous, any row stride) with weight [C] in x's dtype -> [...,
    C] in x's dtype, differentiable in x and weight; saves x and a float32 scale per row for backward."""
    if weight.dtype != x.dtype or x.stride(-1) != 1:
        raise ValueError(f"rms_norm_training: expected weight in x's dtype {x.dtype} and a contiguous last dim, "
                         f"found {weight.dtype}, stride {x.stride(-1)}")
    return _RMSNorm.apply(x, weight, eps)


def silu_mul_training(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for gate, up [..., N] of one dtype (last dim contiguous, any row stride: the two halves of
    a fused gate/up output) -> [..., N], differentiable in both; saves gate and up for backward, not silu(gate)."""
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.stride(-1) != 1 or up.stride(-1) != 1:
        raise ValueError(f"silu_mul_training: expected gate and up of one shape and dtype with a contiguous last dim, "
                         f"found {tuple(gate.shape)} {gate.dtype} and {tuple(up.shape)} {up.dtype}")
    return _SiluMul.apply(gate, up)


def rotate_pairs_training(
    q_THr: torch.Tensor, k_Tr: torch.Tensor, cos_Tr: torch.Tensor, sin_Tr: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`apply_rotary_interleaved` of q_THr [T, H, R] (every head) and k_Tr [T, R] by the float32 angles cos_Tr/sin_Tr
    [T, R/2], in one launch each way -> (new [T, H, R], new [T, R]) in the inputs' dtypes, differentiable in q and
    k. Inputs may be strided views (the q_pe / k_pe slices of the projections' outputs) with a contiguous last dim."""
    if q_THr.stride(-1) != 1 or k_Tr.stride(-1) != 1 or q_THr.shape[0] != k_Tr.shape[0] or q_THr.shape[2] != k_Tr.shape[1]:
        raise ValueError(f"rotate_pairs_training: expected q [T, H, R] and k [T, R] with contiguous last dims, found "
                         f"{tuple(q_THr.shape)} (strides {q_THr.stride()}) and {tuple(k_Tr.shape)} (strides {k_Tr.stride()})")
    return _RotatePairs.apply(q_THr, k_Tr, cos_Tr.float().contiguous(), sin_Tr.float().contiguous())


__all__ = ["rms_norm_training", "rotate_pairs_training", "silu_mul_training"]
