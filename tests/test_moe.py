"""DeepSeekMoE: routing against the paper's rule written out per token, grouped GEMM vs the eager loop."""

import pytest
import torch
from _helpers import LargestAllocation, random_model, relative_max_diff, tiny_config

from modeling_deepseek_v3.modeling_deepseek_v3 import (
    CACHE_FIELD,
    DeepseekV3Experts,
    DeepseekV3MLP,
    DeepseekV3MoE,
    DeepseekV3TopkRouter,
    _grouped_mm,
    combine_sorted_outputs,
    sequence_balance_loss,
    sort_by_expert,
)


def route_one_token_by_the_paper(x, weight, bias, config):
    """Sigmoid affinities; bias-adjusted top-2 sum per group; best topk_group groups; top-k there; weights are the
    unbiased affinities normalized over the chosen experts times the routing scale. Plain Python per token."""
    s = torch.sigmoid(x.double() @ weight.double().T).tolist()
    biased = [si + bi for si, bi in zip(s, bias.double().tolist())]
    per_group = config.n_routed_experts // config.n_group
    groups = []
    for g in range(config.n_group):
        members = sorted(biased[g * per_group:(g + 1) * per_group], reverse=True)
        groups.append((members[0] + members[1], g))
    kept = {g for _, g in sorted(groups, reverse=True)[: config.topk_group]}
    candidates = [(biased[e], e) for e in range(config.n_routed_experts) if e // per_group in kept]
    chosen = [e for _, e in sorted(candidates, reverse=True)[: config.num_experts_per_tok]]
    total = sum(s[e] for e in chosen)
    return {e: s[e] / total * config.routed_scaling_factor for e in chosen}


def test_router_matches_the_paper_rule_token_by_token():
    config = tiny_config()
    torch.manual_seed(0)
    router = DeepseekV3TopkRouter(config)
    torch.nn.init.normal_(router.weight, std=0.5)
    router.e_score_correction_bias.normal_(0, 0.3)
    x = torch.randn(64, config.hidden_size)
    topk_idx, topk_weight, scores = router(x)
    assert topk_weight.dtype == torch.float32 and scores.dtype == torch.float32
    for t in range(x.shape[0]):
        expected = route_one_token_by_the_paper(x[t], router.weight, router.e_score_correction_bias, config)
        got = dict(zip(topk_idx[t].tolist(), topk_weight[t].tolist()))
        assert set(got) == set(expected), f"token {t}"
        for e in got:
            assert got[e] == pytest.approx(expected[e], rel=1e-5)


def test_correction_bias_selects_but_never_weights():
    config = tiny_config()
    router = DeepseekV3TopkRouter(config)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(8, config.hidden_size)
    with torch.no_grad():
        router.e_score_correction_bias.zero_()
        router.e_score_correction_bias[5] = 10.0  # expert 5 is always selected...
        idx, weight, scores = router(x)
    assert (idx == 5).any(dim=-1).all()
    picked = weight[idx == 5]
    norm = scores.gather(1, idx).sum(-1)
    # ...but weighted by its unbiased affinity.
    torch.testing.assert_close(picked, scores[:, 5] / norm * config.routed_scaling_factor)


def test_group_limited_routing_only_uses_topk_groups():
    config = tiny_config()
    router = DeepseekV3TopkRouter(config)
    torch.nn.init.normal_(router.weight, std=1.0)
    idx, _, _ = router(torch.randn(128, config.hidden_size))
    groups = idx // (config.n_routed_experts // config.n_group)
    for row in groups:
        assert len(set(row.tolist())) <= config.topk_group


@pytest.mark.skipif(_grouped_mm is None, reason="this torch has no grouped_mm (torch < 2.8)")
def test_grouped_mm_experts_equal_the_eager_loop():
    config = tiny_config()
    torch.manual_seed(1)
    experts = DeepseekV3Experts(config)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    x = torch.randn(40, config.hidden_size)
    # Some experts get no token at all, one gets many.
    topk_idx = torch.randint(0, 6, (40, config.num_experts_per_tok))
    topk_idx[:, 0] = 3
    topk_weight = torch.rand(40, config.num_experts_per_tok)
    eager = experts._forward_eager(x, topk_idx, topk_weight)
    grouped = experts._forward_grouped_mm(x, topk_idx, topk_weight)
    assert relative_max_diff(grouped, eager) < 1e-5


def random_experts_and_routing(config, tokens: int, seed: int = 3):
    """Experts with N(0, 0.1) weights, `tokens` random inputs, and K distinct random experts per token with random
    weights."""
    torch.manual_seed(seed)
    experts = DeepseekV3Experts(config)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    x = torch.randn(tokens, config.hidden_size)
    K = config.num_experts_per_tok
    topk_idx = torch.stack([torch.randperm(config.n_routed_experts)[:K] for _ in range(tokens)])
    return experts, x, topk_idx, torch.rand(tokens, K)


@pytest.mark.skipif(_grouped_mm is None, reason="this torch has no grouped_mm (torch < 2.8)")
def test_grouped_mm_gradients_equal_the_eager_loop():
    """The grouped path's float32 combine has its own backward (it keeps the expert outputs in their dtype): the
    gradients of the input, both expert weights and the routing weights match the eager loop's autograd."""
    config = tiny_config()
    experts, x, topk_idx, topk_weight = random_experts_and_routing(config, tokens=40)
    upstream = torch.randn(40, config.hidden_size)
    grads = []
    for forward in (experts._forward_eager, experts._forward_grouped_mm):
        inputs = [x.clone().requires_grad_(), topk_weight.clone().requires_grad_()]
        experts.zero_grad()
        (forward(inputs[0], topk_idx, inputs[1]) * upstream).sum().backward()
        grads.append([inputs[0].grad, inputs[1].grad, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()])
    for eager, grouped in zip(*grads):
        assert relative_max_diff(grouped, eager) < 1e-5


@pytest.mark.skipif(_grouped_mm is None, reason="this torch has no grouped_mm (torch < 2.8)")
def test_grouped_mm_model_equals_eager_model():
    eager = random_model(tiny_config(moe_implementation="eager"), seed=2)
    grouped = random_model(tiny_config(moe_implementation="grouped_mm"), seed=2)
    ids = torch.randint(2, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert relative_max_diff(grouped(ids).logits, eager(ids).logits) < 1e-5


def test_eager_experts_match_per_expert_linear_layers():
    config = tiny_config()
    experts, x, topk_idx, topk_weight = random_experts_and_routing(config, tokens=10)
    I = config.moe_intermediate_size
    expected = torch.zeros(10, config.hidden_size)
    for t in range(10):
        for k in range(config.num_experts_per_tok):
            e = topk_idx[t, k]
            gate, up = experts.gate_up_proj[e, :I], experts.gate_up_proj[e, I:]
            h = torch.nn.functional.silu(x[t] @ gate.T) * (x[t] @ up.T)
            expected[t] += topk_weight[t, k] * (h @ experts.down_proj[e].T)
    torch.testing.assert_close(experts._forward_eager(x, topk_idx, topk_weight), expected, rtol=1e-5, atol=1e-6)


def test_first_k_dense_replace_layers_are_dense_and_the_rest_moe():
    config = tiny_config(num_hidden_layers=4, first_k_dense_replace=2)
    model = random_model(config)
    kinds = [type(layer.mlp) for layer in model.model.layers]
    assert kinds == [DeepseekV3MLP, DeepseekV3MLP, DeepseekV3MoE, DeepseekV3MoE, DeepseekV3MoE]  # + MTP layer
    shared = model.model.layers[2].mlp.shared_experts
    assert shared.gate_proj.out_features == config.moe_intermediate_size * config.n_shared_experts


def test_sequence_balance_loss_matches_its_definition():
    B, T, E, K, alpha = 2, 5, 8, 2, 0.01
    torch.manual_seed(4)
    scores = torch.rand(B, T, E)
    topk_idx = torch.stack([torch.stack([torch.randperm(E)[:K] for _ in range(T)]) for _ in range(B)])
    expected = 0.0
    for b in range(B):
        for i in range(E):
            f_i = E / (K * T) * sum(int(i in topk_idx[b, t].tolist()) for t in range(T))
            p_i = sum((scores[b, t, i] / scores[b, t].sum()).item() for t in range(T)) / T
            expected += alpha * f_i * p_i
    expected /= B
    assert sequence_balance_loss(scores, topk_idx, alpha, per_sequence=True).item() == pytest.approx(expected, rel=1e-5)


def test_balance_loss_only_in_training_and_off_at_alpha_zero():
    model = random_model(tiny_config(aux_loss_alpha=0.01))
    ids = torch.randint(2, 512, (2, 12))
    assert model(ids, labels=ids).aux_loss is None
    model.train()
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss > 0
    torch.testing.assert_close(out.loss, out.lm_loss + out.mtp_loss + out.aux_loss)
    off = random_model(tiny_config(aux_loss_alpha=0.0)).train()
    assert off(ids, labels=ids).aux_loss is None


def test_router_stays_float32_under_bf16_autocast_and_training_loss_runs():
    model = random_model(tiny_config(aux_loss_alpha=0.01)).train()
    ids = torch.randint(2, 512, (2, 12))
    router = model.expert_routers()[0]
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        _, weight, scores = router(torch.randn(5, model.config.hidden_size))
        out = model(ids, labels=ids)
    assert weight.dtype == torch.float32 and scores.dtype == torch.float32
    assert torch.isfinite(out.loss) and out.aux_loss is not None


@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_gather_experts_equal_the_eager_loop(tokens):
    config = tiny_config()
    torch.manual_seed(5)
    experts = DeepseekV3Experts(config)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    x = torch.randn(tokens, config.hidden_size)
    topk_idx = torch.stack([torch.randperm(config.n_routed_experts)[: config.num_experts_per_tok] for _ in range(tokens)])
    topk_weight = torch.rand(tokens, config.num_experts_per_tok)
    eager = experts._forward_eager(x, topk_idx, topk_weight)
    assert relative_max_diff(experts._forward_gather(x, topk_idx, topk_weight), eager) < 1e-5


def test_auto_uses_gather_for_decode_sized_batches_and_matches_eager_model():
    auto = random_model(tiny_config(moe_implementation="auto"), seed=7)
    eager = random_model(tiny_config(moe_implementation="eager"), seed=7)
    calls = []
    experts = auto.model.layers[1].mlp.experts
    original = experts._forward_gather
    experts._forward_gather = lambda *a: calls.append(1) or original(*a)
    ids = torch.randint(2, 512, (1, 6))
    with torch.no_grad():
        a = auto(ids, use_cache=True)
        b = eager(ids, use_cache=True)
        step_a = auto(ids[:, :1], past_key_values=getattr(a, CACHE_FIELD)).logits
        step_b = eager(ids[:, :1], past_key_values=getattr(b, CACHE_FIELD)).logits
    assert relative_max_diff(step_a, step_b) < 1e-5
    assert calls  # 1 token x 4 experts <= 16 experts: gather


def _set_inference_chunk(model, tokens):
    for module in model.modules():
        if isinstance(module, (DeepseekV3MoE, DeepseekV3MLP)):
            module.inference_chunk_tokens = tokens


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
def test_long_prompt_feed_forward_in_token_chunks_equals_all_at_once(implementation):
    """Inference over many tokens runs the dense MLP, the shared and the routed experts chunk by chunk: the same
    logits and the same routed-token counts as one pass."""
    if implementation == "grouped_mm" and _grouped_mm is None:
        pytest.skip("this torch has no grouped_mm (torch < 2.8)")
    model = random_model(tiny_config(moe_implementation=implementation), seed=6).eval()
    ids = torch.randint(2, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: left out of the counts in both
    results = []
    for chunk in (None, 7):
        if chunk is not None:
            _set_inference_chunk(model, chunk)
        with torch.no_grad(), model.tracking_expert_load():
            logits = model(ids, attention_mask=mask).logits
            loads = [router.expert_load.clone() for router in model.expert_routers()]
        model.expert_load_statistics(reset=True)
        results.append((logits, loads))
    (whole, whole_loads), (chunked, chunked_loads) = results
    assert relative_max_diff(chunked, whole) < 1e-6
    for a, b in zip(whole_loads, chunked_loads):
        assert torch.equal(a, b)


def test_chunked_inference_bounds_the_largest_feed_forward_allocation():
    model = random_model(tiny_config(intermediate_size=4096, moe_implementation="eager"), seed=6).eval()
    ids = torch.randint(2, 512, (1, 256), generator=torch.Generator().manual_seed(0))
    largest = []
    for chunk in (None, 32):
        if chunk is not None:
            _set_inference_chunk(model, chunk)
        with torch.no_grad(), LargestAllocation() as allocation:
            model(ids, use_cache=False)
        largest.append(allocation.nbytes)
    dense_intermediate = 256 * 4096 * 4
    assert largest[0] >= dense_intermediate > 2 * largest[1]


def test_router_counts_and_bias_stay_float32_when_the_model_is_cast_to_bf16():
    """`model.to(torch.bfloat16)` casts floating buffers; the expert-load counts (bf16 counts exactly only to 256)
    and the balancing bias must stay float32, and counting must still work (a scatter-add of float32 ones)."""
    config = tiny_config()
    model = random_model(config).to(torch.bfloat16).train()
    ids = torch.randint(2, 512, (3, 200))
    model(ids, labels=ids)
    routers = model.expert_routers()
    assert all(r.expert_load.dtype == torch.float32 and r.e_score_correction_bias.dtype == torch.float32
               for r in routers)
    main_layer_loads = [r.expert_load.sum().item() for r in routers[: len(routers) - config.num_nextn_predict_layers]]
    assert main_layer_loads == [600 * config.num_experts_per_tok] * len(main_layer_loads)


def test_traced_expert_combine_equals_the_custom_backward_reference():
    """Under torch.compile the grouped experts' combine is the plain differentiable expression (Inductor plans what
    backward keeps); it must equal `_WeightedCombine` in value and in the gradients of the rows and the weights."""
    config = tiny_config()
    experts = DeepseekV3Experts(config)
    topk_idx = torch.stack([torch.randperm(16)[:4] for _ in range(10)])
    order, token, _ = sort_by_expert(topk_idx, 16)
    results = []
    for combine in (combine_sorted_outputs, torch.compile(combine_sorted_outputs, backend="aot_eager", fullgraph=True)):
        y = torch.randn(40, config.hidden_size, generator=torch.Generator().manual_seed(0)).requires_grad_()
        w = torch.rand(10, 4, generator=torch.Generator().manual_seed(1)).requires_grad_()
        out = combine(experts, y, order, token, w)
        (out * torch.linspace(-1, 1, config.hidden_size)).sum().backward()
        results.append((out.detach(), y.grad, w.grad))
    for traced, reference in zip(*reversed(results)):
        assert relative_max_diff(traced, reference) < 1e-6


def test_post_attention_norm_inside_the_moe_is_refused_off_the_decode_kernels_path():
    # `post_attention_norm` hands the MoE the attention's output un-normalized (the router's pass adds and
    # normalizes it): only the decode kernels do that, so any other path must refuse rather than skip the norm.
    layer = random_model(tiny_config(), seed=0).model.layers[1]
    x, residual = torch.randn(1, 1, layer.mlp.config.hidden_size), torch.randn(1, 1, layer.mlp.config.hidden_size)
    assert not layer.mlp.routes_after_add_norm(residual, x, layer.post_attention_layernorm)  # CPU: no kernels
    with torch.no_grad(), pytest.raises(ValueError, match="post_attention_norm"):
        layer.mlp(x, residual=residual, post_attention_norm=layer.post_attention_layernorm)
    with torch.no_grad():  # the decoder layer adds and normalizes first
        out, _ = layer.mlp(layer.post_attention_layernorm(residual + x), residual=residual + x)
    assert out.shape == x.shape
