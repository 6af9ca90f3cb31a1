"""FP8 block quantization of the official DeepSeek-V3 release: the one place where the block math lives.

A quantized weight W [out, in] is stored as `float8_e4m3fn` values q plus a float32 `weight_scale_inv` s on the
grid `(ceil(out / 128), ceil(in / 128))`; an edge block that is not full still has one scale. Dequantization is a
multiply, `W[i, j] = q[i, j] * s[i // 128, j // 128]`, computed in float32 and rounded once to the target dtype.
The block size is never inferred from `out // grid_rows` (that is wrong for the partial blocks of the real
`kv_a_proj_with_mqa`, 576 rows on a 5-row grid).
"""

import math

import torch

BLOCK_SIZE = 128
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# DeepSeek-V3.1 (`scale_fmt: "ue8m0"`) uses power-of-two scales; they may be stored as float8_e8m0fnu.
SCALE_DTYPES = (torch.float32,) + ((torch.float8_e8m0fnu,) if hasattr(torch, "float8_e8m0fnu") else ())


def scale_grid_shape(weight_shape, block_size: int = BLOCK_SIZE) -> tuple[int, int]:
    """`(ceil(out / block), ceil(in / block))` for a weight of shape [out, in]."""
    out_features, in_features = weight_shape
    return math.ceil(out_features / block_size), math.ceil(in_features / block_size)


def check_fp8_pair(weight: torch.Tensor, scale_inv: torch.Tensor, name: str, block_size: int = BLOCK_SIZE) -> None:
    """Raise ValueError naming `name` unless `weight` is 2D float8_e4m3fn and `scale_inv` is a float32 (or e8m0)
    tensor on the ceil grid of its shape."""
    if weight.dtype != FP8_DTYPE or weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2D {FP8_DTYPE} weight, found {weight.dtype} of shape {tuple(weight.shape)}")
    expected = scale_grid_shape(weight.shape, block_size)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"{name}_scale_inv: expected a scale grid of shape {expected} for a weight of shape "
            f"{tuple(weight.shape)} and {block_size}x{block_size} blocks, found {tuple(scale_inv.shape)}"
        )
    if scale_inv.dtype not in SCALE_DTYPES:
        raise ValueError(f"{name}_scale_inv: expected dtype in {SCALE_DTYPES}, found {scale_inv.dtype}")


def dequantize_fp8_block(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    name: str = "weight",
    block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """Exact block dequantization: `weight` [out, in] float8_e4m3fn, `scale_inv` [ceil(out/b), ceil(in/b)] ->
    [out, in] in `dtype`, computed in float32 and rounded once. Validates shapes and dtypes (errors name `name`)."""
    check_fp8_pair(weight, scale_inv, name, block_size)
    out_features, in_features = weight.shape
    out = torch.empty(out_features, in_features, dtype=dtype, device=weight.device)
    # One row of blocks at a time: the float32 temporary is block_size rows, not the whole matrix, and each
    # element is converted, multiplied and rounded in a single pass.
    column_scales = scale_inv.to(torch.float32).repeat_interleave(block_size, dim=1)[:, :in_features]
    for block_row in range(scale_inv.shape[0]):
        rows = slice(block_row * block_size, min((block_row + 1) * block_size, out_features))
        out[rows] = weight[rows].to(torch.float32) * column_scales[block_row]
    return out


def quantize_fp8_block(weight: torch.Tensor, block_size: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize [out, in] to (float8_e4m3fn [out, in], float32 scale_inv on the ceil grid), as the official
    release does: `scale_inv = max(amax(block), 1e-4) / 448`, `q = (block / scale_inv).to(float8_e4m3fn)`."""
    out_features, in_features = weight.shape
    rows, cols = scale_grid_shape(weight.shape, block_size)
    padded = torch.zeros(rows * block_size, cols * block_size, dtype=torch.float32, device=weight.device)
    padded[:out_features, :in_features] = weight.to(torch.float32)
    blocks = padded.view(rows, block_size, cols, block_size)
    amax = blocks.abs().amax(dim=(1, 3))
    scale_inv = amax.clamp(min=1e-4) / FP8_MAX
    quantized = (blocks / scale_inv[:, None, :, None]).view_as(padded)[:out_features, :in_features]
    return quantized.to(FP8_DTYPE).contiguous(), scale_inv.contiguous()


__all__ = [
    "BLOCK_SIZE",
    "FP8_DTYPE",
    "check_fp8_pair",
    "dequantize_fp8_block",
    "quantize_fp8_block",
    "scale_grid_shape",
]
