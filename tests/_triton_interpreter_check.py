"""Run by test_decode_kernels.py in a fresh interpreter with TRITON_INTERPRET=1 (set before triton is imported):
the decode kernels on CPU tensors through Triton's interpreter, against the eager ops they replace. Kernels with a
loop over a runtime bound (the matrix-vector products, the attention split, the MoE experts) are left to the GPU
tests: Triton 3.6's interpreter cannot run those loops."""

import copy

import torch
from _helpers import relative_max_diff

from modeling_deepseek_v3 import decode_kernels as kernels
from modeling_deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm, apply_rotary_interleaved

TOLERANCE = 1e-5


def norm_of(width: int) -> DeepseekV3RMSNorm:
    norm = DeepseekV3RMSNorm(width)
    torch.nn.init.normal_(norm.weight, 1.0, 0.2)
    return norm


def main():
    torch.manual_seed(0)
    norm = norm_of(64)
    x, delta = torch.randn(3, 1, 64), torch.randn(3, 1, 64)
    assert relative_max_diff(kernels.rms_norm(x, norm.weight, 1e-6), norm(x)) < TOLERANCE
    total, normed = kernels.add_rms_norm(x, delta, norm.weight, 1e-6)
    assert torch.equal(total, x + delta) and relative_max_diff(normed, norm(x + delta)) < TOLERANCE

    # Latent norms + RoPE of k_pe, into fresh tensors and into cache slots 2..3 (B=2 rows of T=2 tokens).
    B, T, Q, L, R = 2, 2, 48, 32, 8
    projected = torch.randn(B, T, Q + L + R)
    q_norm, kv_norm = norm_of(Q), norm_of(L)
    angles = torch.randn(B * T, R // 2) * 100
    cos, sin = angles.cos(), angles.sin()
    q_a, c_kv_new, k_pe_new = projected.split([Q, L, R], dim=-1)
    k_pe_reference = apply_rotary_interleaved(k_pe_new, cos.view(B, T, -1), sin.view(B, T, -1))
    q_out, c_kv, k_pe = kernels.latent_norm_rope(projected, q_norm.weight, kv_norm.weight, 1e-6, cos, sin)
    assert relative_max_diff(q_out, q_norm(q_a)) < TOLERANCE
    assert relative_max_diff(c_kv, kv_norm(c_kv_new)) < TOLERANCE
    assert relative_max_diff(k_pe, k_pe_reference) < TOLERANCE
    cache_c, cache_k = torch.zeros(B, 5, L), torch.zeros(B, 5, R)
    kernels.latent_norm_rope(projected, q_norm.weight, kv_norm.weight, 1e-6, cos, sin,
                             cache=(cache_c, cache_k, torch.tensor(2)))
    assert relative_max_diff(cache_c[:, 2:4], kv_norm(c_kv_new)) < TOLERANCE
    assert relative_max_diff(cache_k[:, 2:4], k_pe_reference) < TOLERANCE
    assert not cache_c[:, [0, 1, 4]].any() and not cache_k[:, [0, 1, 4]].any()
    cache_c, cache_k = torch.zeros(B, 5, L), torch.zeros(B, 5, R)  # a full cache: the second token has no slot
    kernels.latent_norm_rope(projected, q_norm.weight, kv_norm.weight, 1e-6, cos, sin,
                             cache=(cache_c, cache_k, torch.tensor(4)))
    assert relative_max_diff(cache_c[:, 4], kv_norm(c_kv_new)[:, 0]) < TOLERANCE
    assert not cache_c[:, :4].any() and not cache_k[:, :4].any()

    # Absorbed query: q_nope @ W_UK and the RoPE of q_pe.
    H, N, V = 4, 16, 16
    w_kv_b = torch.randn(H * (N + V), L) * 0.2
    q = torch.randn(B, H, N + R)
    q_HBk = kernels.absorb_query(q, w_kv_b, cos[:B], sin[:B], N)
    q_lat = torch.einsum("bhn,hnl->hbl", q[..., :N], w_kv_b.view(H, N + V, L)[:, :N])
    q_pe = apply_rotary_interleaved(q[..., N:], cos[:B, None], sin[:B, None]).transpose(0, 1)
    assert relative_max_diff(q_HBk[..., :L], q_lat) < TOLERANCE
    assert relative_max_diff(q_HBk[..., L:], q_pe) < TOLERANCE
    # With the new token's latent row written to a static cache by the same launch: latent_norm_rope's slot.
    cache_c, cache_k = torch.zeros(B, 5, L), torch.zeros(B, 5, R)
    kernels.latent_norm_rope(projected[:, :1], q_norm.weight, kv_norm.weight, 1e-6, cos[:B], sin[:B],
                             cache=(cache_c, cache_k, torch.tensor(3)))
    fused_c, fused_k = torch.zeros(B, 5, L), torch.zeros(B, 5, R)
    latent = (projected[:, 0, Q:], kv_norm.weight, 1e-6, (fused_c, fused_k, torch.tensor(3)))
    assert torch.equal(kernels.absorb_query(q, w_kv_b, cos[:B], sin[:B], N, latent=latent), q_HBk)
    assert torch.equal(fused_c, cache_c) and torch.equal(fused_k, cache_k) and cache_c[:, 3].any()
    q_rope = q.clone()
    kernels.rotate_pairs_(q_rope[..., N:], None, cos[:B], sin[:B])
    assert relative_max_diff(q_rope[..., N:], q_pe.transpose(0, 1)) < TOLERANCE

    # Greedy argmax over a vocabulary, two passes: first index of the maximum on ties inside one chunk, across
    # chunks and at a chunk's edge, a row of equal values, a partial last chunk.
    for V in (3 * kernels.ARGMAX_BLOCK, 2 * kernels.ARGMAX_BLOCK + 77):
        logits = torch.randn(5, V)
        top = logits.max() + 1
        logits[1, [V // 2, V // 2 + 1]] = top
        logits[2, [V - 1, 3]] = top
        logits[3, [kernels.ARGMAX_BLOCK, kernels.ARGMAX_BLOCK - 1]] = top
        logits[4] = 0
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.equal(kernels.argmax_rows(logits.to(dtype)), logits.to(dtype).float().argmax(dim=-1))

    # Router top-k, and the MoE combine (routed sum, shared experts, residual).
    scores_TE = torch.rand(3, 16)
    idx, weight = kernels.noaux_topk(scores_TE, torch.zeros(16), 4, 2, 4, True, 2.5)
    groups = scores_TE.view(3, 4, 4).topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices
    assert all(set((idx[t] // 4).tolist()) <= set(groups[t].tolist()) for t in range(3))
    assert torch.allclose(weight.sum(-1), torch.full((3,), 2.5))
    y = torch.randn(3 * 4, 64)
    shared, residual = torch.randn(3, 64), torch.randn(3, 64)
    combined = residual + ((y * weight.reshape(-1, 1)).view(3, 4, 64).sum(1) + shared)
    assert relative_max_diff(kernels.moe_combine(y, weight, shared, residual), combined) < TOLERANCE
    # With the final norm in the same launch: rms_norm of the sum, bit for bit.
    summed = kernels.moe_combine(y, weight, None, residual)
    assert torch.equal(kernels.moe_combine(y, weight, None, residual, norm=(norm.weight, 1e-6)),
                       kernels.rms_norm(summed, norm.weight, 1e-6))
    # Training RMSNorm: forward and backward against the eager module's autograd (a strided input, as the c_kv
    # slice of kv_a_proj's output), and what it keeps for backward.
    from modeling_deepseek_v3.training_kernels import rms_norm_training

    for dtype, tolerance in ((torch.float32, TOLERANCE), (torch.bfloat16, 2e-2)):
        norm = norm_of(64).to(dtype)
        projected_eager = torch.randn(6, 80, dtype=dtype, requires_grad=True)
        projected_fused = projected_eager.detach().clone().requires_grad_()
        dy = torch.randn(6, 64, dtype=dtype)
        eager = norm(projected_eager[:, :64])
        eager.backward(dy)
        eager_dw, norm.weight.grad = norm.weight.grad, None
        fused = rms_norm_training(projected_fused[:, :64], norm.weight, 1e-6)  # rows with stride 80
        fused.backward(dy)
        assert relative_max_diff(fused, eager) < tolerance
        assert relative_max_diff(projected_fused.grad, projected_eager.grad) < tolerance
        assert relative_max_diff(norm.weight.grad, eager_dw) < tolerance
    # Training SiLU-gated activation on the two halves of one gate/up output (row stride 2N), against eager autograd.
    from modeling_deepseek_v3.training_kernels import silu_mul_training

    for dtype, tolerance in ((torch.float32, TOLERANCE), (torch.bfloat16, 2e-2)):
        gate_up_eager = torch.randn(2, 5, 2 * 48, dtype=dtype, requires_grad=True)
        gate_up_fused = gate_up_eager.detach().clone().requires_grad_()
        dh = torch.randn(2, 5, 48, dtype=dtype)
        gate, up = gate_up_eager.chunk(2, dim=-1)
        eager = torch.nn.functional.silu(gate) * up
        eager.backward(dh)
        fused = silu_mul_training(*gate_up_fused.chunk(2, dim=-1))
        fused.backward(dh)
        assert relative_max_diff(fused, eager) < tolerance
        assert relative_max_diff(gate_up_fused.grad, gate_up_eager.grad) < tolerance

    # Training RoPE of q_pe (every head) and k_pe, strided slices of the projections' outputs, both ways, against the
    # eager rotation's autograd.
    from modeling_deepseek_v3.training_kernels import rotate_pairs_training

    for dtype, tolerance in ((torch.float32, TOLERANCE), (torch.bfloat16, 2e-2)):
        q_eager = torch.randn(6, 3, 24, dtype=dtype, requires_grad=True)  # [T, H, N + R], R = 8
        k_eager = torch.randn(6, 40, dtype=dtype, requires_grad=True)  # [T, L + R]
        q_fused, k_fused = (t.detach().clone().requires_grad_() for t in (q_eager, k_eager))
        angles = torch.randn(6, 4) * 50
        cos, sin = angles.cos(), angles.sin()
        dq, dk = torch.randn(6, 3, 8, dtype=dtype), torch.randn(6, 8, dtype=dtype)
        q_rot = apply_rotary_interleaved(q_eager[..., 16:], cos[:, None], sin[:, None])
        k_rot = apply_rotary_interleaved(k_eager[:, 32:], cos, sin)
        torch.autograd.backward((q_rot, k_rot), (dq, dk))
        q_out, k_out = rotate_pairs_training(q_fused[..., 16:], k_fused[:, 32:], cos, sin)
        torch.autograd.backward((q_out, k_out), (dq, dk))
        assert relative_max_diff(q_out, q_rot) < tolerance and relative_max_diff(k_out, k_rot) < tolerance
        assert relative_max_diff(q_fused.grad, q_eager.grad) < tolerance
        assert relative_max_diff(k_fused.grad, k_eager.grad) < tolerance

    # The grouped experts' combine (expert-sorted rows -> tokens), forward and backward, against its eager reference.
    from modeling_deepseek_v3.modeling_deepseek_v3 import _WeightedCombine, sort_by_expert
    from modeling_deepseek_v3.moe_kernels import combine_sorted_pairs

    for dtype, tolerance in ((torch.float32, TOLERANCE), (torch.bfloat16, 1e-2)):
        T, K, E, D = 5, 3, 8, 1100  # D past one 1024-column tile
        topk_idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
        order, token, _ = sort_by_expert(topk_idx, E)
        position = torch.empty_like(order).scatter_(0, order, torch.arange(T * K)).view(T, K)
        y_eager = torch.randn(T * K, D, dtype=dtype, requires_grad=True)
        y_fused = y_eager.detach().clone().requires_grad_()
        w_eager = torch.rand(T, K, requires_grad=True)
        w_fused = w_eager.detach().clone().requires_grad_()
        grad = torch.randn(T, D)
        eager = _WeightedCombine.apply(y_eager, w_eager.reshape(-1)[order], token, T)
        eager.backward(grad)
        fused = combine_sorted_pairs(y_fused, position, w_fused)
        fused.backward(grad)
        assert fused.dtype == torch.float32 and relative_max_diff(fused, eager) < TOLERANCE
        assert relative_max_diff(y_fused.grad, y_eager.grad) < tolerance
        assert relative_max_diff(w_fused.grad, w_eager.grad) < TOLERANCE

    check_decode_experts_with_shared_parts()
    check_greedy_pick()
    check_decode_prologue()

    saved = []
    x = torch.randn(32, 64, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
        rms_norm_training(x, torch.ones(64, dtype=torch.bfloat16), 1e-6)
    assert sum(saved) == 32 * 64 * 2 + 64 * 2 + 32 * 4  # x, the weight, one float32 scale per row
    print("ok")


def check_decode_experts_with_shared_parts():
    """The decode MoE kernels with the shared experts as S more pairs per token (`expert_gate_up_act`,
    `expert_down`, `moe_combine(shared_parts=S)`) against the eager layer's math: residual + (routed + shared).
    Their loops run over a runtime bound, which Triton's interpreter runs from 3.9 on (3.6's could not)."""
    import triton

    from modeling_deepseek_v3 import moe_kernels

    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 9):
        print(f"decode experts: not run (Triton {triton.__version__}'s interpreter cannot run their loops)")
        return
    # The a-projection pair with the layer's input RMSNorm inside (each program normalizes the row itself), for a
    # row within one step and one spread over several (BLOCK_D < D), against rms_norm then the products.
    for dtype, tolerance in ((torch.float32, TOLERANCE), (torch.bfloat16, 2e-2)):
        norm = norm_of(96).to(dtype)
        x = torch.randn(2, 1, 96, dtype=dtype)
        w1, w2 = (torch.randn(n, 96, dtype=dtype) * 0.1 for n in (40, 24))
        normed = norm(x).float()
        reference = torch.cat([normed @ w1.float().T, normed @ w2.float().T], dim=-1)
        for tile in ((8, 128, 4), (8, 32, 4)):
            fused = kernels.linear_pair(x, w1, w2, tile=tile, norm=(norm.weight, norm.variance_epsilon))
            assert relative_max_diff(fused, reference) < tolerance
            separate = kernels.linear_pair(kernels.rms_norm(x, norm.weight, norm.variance_epsilon), w1, w2, tile=tile)
            assert torch.equal(fused, separate)
            # With a residual (the router's pass with the post-attention add and norm): the sum, the normed row
            # and the scores of the normed row.
            residual = torch.randn(2, 1, 96, dtype=dtype)
            scores, total, normed = kernels.linear_pair(x, w1, None, sigmoid=True, out_dtype=torch.float32, tile=tile,
                                                        norm=(norm.weight, norm.variance_epsilon), residual=residual)
            total_ref, normed_ref = kernels.add_rms_norm(residual, x, norm.weight, norm.variance_epsilon)
            assert torch.equal(total, total_ref) and relative_max_diff(normed, normed_ref) < tolerance
            assert torch.equal(scores, kernels.linear_pair(normed, w1, None, sigmoid=True, out_dtype=torch.float32,
                                                           tile=tile))
            # With a MoE layer's parts (the next layer's a-projections summing the previous layer's output):
            # moe_combine's sum, then the pair of its normed row, for K routed pairs and S shared parts per row.
            for S in (0, 2):
                y = torch.randn(2 * (3 + S), 96)
                routing = torch.rand(2, 3)
                products, summed = kernels.linear_pair(y, w1, w2, tile=tile, norm=(norm.weight, norm.variance_epsilon),
                                                       residual=residual, combine=(routing, S))
                combined = kernels.moe_combine(y, routing, None, residual.view(2, 96), shared_parts=S).view(2, 1, 96)
                assert summed.shape == residual.shape and torch.equal(summed, combined)
                assert torch.equal(products, kernels.linear_pair(combined, w1, w2, tile=tile,
                                                                 norm=(norm.weight, norm.variance_epsilon)))

    check_absorbed_attention()
    check_noaux_topk()

    T, K, E, I, D = 3, 4, 8, 48, 64
    for S in (1, 2):
        x = torch.randn(T, D)
        gate_up, down = torch.randn(E, 2 * I, D) * 0.1, torch.randn(E, D, I) * 0.1
        shared_gate, shared_up = torch.randn(S * I, D) * 0.1, torch.randn(S * I, D) * 0.1
        shared_down = torch.randn(D, S * I) * 0.1
        idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
        weight, residual = torch.rand(T, K), torch.randn(T, D)
        # Tiles smaller than I and D: several blocks per pair, masked edges.
        h = moe_kernels.expert_gate_up_act(x, gate_up, idx.reshape(-1), K, tile=(32, 32, 4), shared_gate=shared_gate,
                                           shared_up=shared_up)
        y = moe_kernels.expert_down(h, down, idx.reshape(-1), tile=(16, 32, 4), shared_down=shared_down)
        out = kernels.moe_combine(y, weight, None, residual, shared_parts=S)

        def expert(e, v):
            gate, up = (gate_up[e] @ v).chunk(2)
            return down[e] @ (torch.nn.functional.silu(gate) * up)

        routed = torch.stack([sum(weight[t, k] * expert(idx[t, k], x[t]) for k in range(K)) for t in range(T)])
        shared = (torch.nn.functional.silu(x @ shared_gate.T) * (x @ shared_up.T)) @ shared_down.T
        assert y.shape == (T * (K + S), D)
        assert relative_max_diff(out, residual + (routed + shared)) < TOLERANCE


def check_absorbed_attention():
    """The split attention over the latent cache, its combine, and the combine folded into W_UV, for one split and
    several of several key blocks, with a padding bias; with `advance_length` (a static cache's new slot at the
    length, patched into the split's first block after the PDL wait) the length advances by one."""
    torch.manual_seed(0)
    B, H, S, L, R, N, V = 2, 4, 70, 32, 16, 8, 8
    q_lat, q_pe = torch.randn(H, B, L), torch.randn(H, B, R)
    c_kv, k_pe = torch.randn(B, S, L), torch.randn(B, S, R)
    bias = torch.zeros(B, S)
    bias[0, 50:] = float("-inf")  # unwritten slots
    bias[1, :7] = float("-inf")  # left padding
    w_kv_b = torch.randn(H * (N + V), L) * 0.2
    scores = (torch.einsum("hbl,bsl->bhs", q_lat, c_kv) + torch.einsum("hbr,bsr->bhs", q_pe, k_pe)) * 0.3 + bias[:, None]
    o_lat = torch.einsum("bhs,bsl->hbl", scores.softmax(-1), c_kv)
    values = torch.einsum("hbl,hvl->bhv", o_lat, w_kv_b.view(H, N + V, L)[:, N:]).reshape(B, H * V)
    for config in ({"block_s": 16, "programs": 1}, {"block_s": 16, "programs": 6}, {"block_s": 16, "programs": 64},
                   {"block_s": 32, "programs": 2, "fold_partials": 8, "values_block": 4}):
        for fresh_slot in (None, 0, 33, 69):
            length = torch.tensor(fresh_slot) if fresh_slot is not None else None
            out = kernels.absorbed_decode_attention(q_lat, q_pe, c_kv, k_pe, bias, 0.3, advance_length=length,
                                                    config=config)
            assert relative_max_diff(out, o_lat) < TOLERANCE, config
            length = torch.tensor(fresh_slot) if fresh_slot is not None else None
            out = kernels.absorbed_decode_attention(q_lat, q_pe, c_kv, k_pe, bias, 0.3, w_kv_b, N,
                                                    advance_length=length, config=config)
            assert relative_max_diff(out, values) < TOLERANCE, config
            assert length is None or int(length) == fresh_slot + 1


def topk_reference(scores, bias, n_group, topk_group, top_k, scale):
    """noaux_tc selection in torch, ties to the lower id (stable descending sorts)."""
    T, E = scores.shape
    choice = scores + bias
    if n_group > 1:
        group_scores = choice.view(T, n_group, -1).topk(2, dim=-1).values.sum(-1)
        best = torch.sort(group_scores, dim=-1, descending=True, stable=True).indices[:, :topk_group]
        keep = torch.zeros(T, n_group, dtype=torch.bool).scatter_(1, best, True)
        choice = choice.view(T, n_group, -1).masked_fill(~keep[..., None], float("-inf")).view(T, E)
    idx = torch.sort(choice, dim=-1, descending=True, stable=True).indices[:, :top_k]
    weight = scores.gather(1, idx)
    return idx, weight / (weight.sum(-1, keepdim=True) + 1e-20) * scale


def check_noaux_topk():
    """The router's top-k (ranks, in chunks of 64 experts past 64) against torch's stable sorts: V3-Lite's and V3's
    shapes, no groups, and scores with many ties (ties go to the lower id, for groups and experts alike)."""
    torch.manual_seed(0)
    for E, n_group, topk_group, top_k in ((16, 4, 2, 4), (64, 8, 4, 6), (256, 8, 4, 8), (64, 1, 1, 6)):
        for tied in (False, True):
            scores = torch.rand(3, E)
            bias = torch.randn(E) * 0.05
            if tied:
                scores, bias = (scores * 4).round() / 4, torch.zeros(E)
            idx, weight = kernels.noaux_topk(scores, bias, n_group, topk_group, top_k, True, 2.5)
            idx_ref, weight_ref = topk_reference(scores, bias, n_group, topk_group, top_k, 2.5)
            assert torch.equal(idx, idx_ref), (E, n_group, tied, idx, idx_ref)
            assert relative_max_diff(weight, weight_ref) < TOLERANCE


def greedy_reference(logits, tokens, column, mask, position, input_ids, eos):
    """DecodeGraph._pick_greedy's torch ops (in place)."""
    token = logits.argmax(dim=-1)
    if eos is not None:
        eos_ids, unfinished, pad, stopped = eos
        token = token * unfinished + pad * (1 - unfinished)
        ended = (token[:, None] == eos_ids[None, :]).any(dim=-1)
        unfinished.copy_(unfinished & ~ended)
        stopped.copy_(unfinished.max() == 0)
    column += 1
    tokens.scatter_(1, column, token[:, None])
    mask.scatter_(1, column.clamp(max=mask.shape[1] - 1), 1)
    position += 1
    input_ids.copy_(token[:, None])


def check_greedy_pick():
    """`greedy_pick_` (argmax over chunks, the greedy bookkeeping of all rows in one program) against the torch
    ops it replaces: ties inside and across chunks (the first index wins), end-of-sequence ids finishing rows,
    finished rows padded, `stopped` once all rows are (and in the stop log), the mask column clamped at the cache's
    end."""
    torch.manual_seed(0)
    B, V, S = 3, 2 * kernels.ARGMAX_BLOCK + 100, 12
    for case in ("plain", "eos", "all-finish", "last-column"):
        logits = torch.randn(B, V)
        logits[0, [5, 3000, 4100]] = 10.0  # ties across chunks
        logits[1, [4097, 4098]] = 10.0  # a tie inside the last chunk
        logits[2, 2047:2049] = 10.0  # a tie across a chunk boundary
        column = torch.full((B, 1), S - 1 if case == "last-column" else 4, dtype=torch.long)
        tokens = torch.randint(0, V, (B, S + 1))
        mask = (torch.rand(B, S) > 0.5).long()
        position = torch.randint(0, 9, (B, 1))
        input_ids = torch.zeros(B, 1, dtype=torch.long)
        eos = None
        if case != "plain":
            eos_ids = torch.tensor([3000, 7] if case == "eos" else [5, 4097, 2047, 1])
            eos = (eos_ids, torch.tensor([1, 0, 1]), torch.tensor(1), torch.tensor(False))
        state = (tokens, column, mask, position, input_ids, eos)
        states = [copy.deepcopy(state), copy.deepcopy(state)]
        greedy_reference(logits, *states[0])
        kernels.greedy_pick_(logits, *states[1])
        flat = [[t for t in (*s[:5], *(s[5] or ()))] for s in states]
        for expected, found in zip(*flat):
            assert torch.equal(expected, found), (case, expected, found)
        if case == "all-finish":
            assert bool(states[1][5][3])
        if eos is not None:  # with the stop log: the same state, and the flag at the new sequence length
            logged = copy.deepcopy(state)
            log = torch.zeros(S + 2, dtype=torch.bool)
            kernels.greedy_pick_(logits, *logged[:5], (*logged[5], log))
            for expected, found in zip(flat[1], [t for t in (*logged[:5], *logged[5])]):
                assert torch.equal(expected, found), (case, expected, found)
            assert log.nonzero().flatten().tolist() == ([int(column[0]) + 2] if bool(logged[5][3]) else [])
            assert bool(logged[5][3]) == (case != "eos")


def check_decode_prologue():
    """`decode_prologue` (embedding rows, rotary angles, attention bias of one new token on a static cache in one
    launch) against the embedding, `DeepseekV3RotaryEmbedding` and `build_attention_bias`: equal embeddings and
    bias, left padding and unwritten slots masked; the angles to float32 rounding here (the interpreter's cos/sin
    are numpy's; the GPU test holds them bit-equal to torch's on the device)."""
    from _helpers import tiny_config

    from modeling_deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding, build_attention_bias

    torch.manual_seed(0)
    config = tiny_config()
    rotary = DeepseekV3RotaryEmbedding(config)
    B, S, V, D = 3, 1500, 50, 24
    embed = torch.randn(V, D, dtype=torch.bfloat16)
    ids = torch.tensor([[7], [0], [49]])
    length = torch.tensor(1203)
    mask = torch.zeros(B, S, dtype=torch.long)
    mask[:, : int(length) + 1] = 1
    mask[1, :40] = 0  # left padding
    positions = mask.sum(-1, keepdim=True) - 1
    embeds, (cos, sin), bias = kernels.decode_prologue(ids, embed, positions, rotary.inv_freq,
                                                       rotary.attention_scaling, mask, length)
    cos_ref, sin_ref = rotary(positions)
    assert torch.equal(embeds, embed[ids])
    assert torch.allclose(cos, cos_ref, atol=1e-5) and torch.allclose(sin, sin_ref, atol=1e-5)
    assert torch.equal(bias, build_attention_bias(mask, length.reshape(1), S, torch.bfloat16, keys_are_exact=False))


if __name__ == "__main__":
    main()
