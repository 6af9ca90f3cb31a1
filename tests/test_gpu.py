"""GPU checks (skipped without CUDA): the fast paths on the device they are for."""

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers
from _helpers import random_model, relative_max_diff, tiny_config

from modeling_deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts, _grouped_mm

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(_grouped_mm is None, reason="this torch has no grouped_mm (torch < 2.8)")
def test_grouped_mm_equals_eager_experts_on_cuda_bf16():
    config = tiny_config(hidden_size=256, moe_intermediate_size=128)
    torch.manual_seed(0)
    experts = DeepseekV3Experts(config).cuda().bfloat16()
    torch.nn.init.normal_(experts.gate_up_proj, std=0.05)
    torch.nn.init.normal_(experts.down_proj, std=0.05)
    x = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16)
    topk_idx = torch.randint(0, 11, (300, config.num_experts_per_tok), device="cuda")
    topk_weight = torch.rand(300, config.num_experts_per_tok, device="cuda")
    eager = experts._forward_eager(x, topk_idx, topk_weight)
    grouped = experts._forward_grouped_mm(x, topk_idx, topk_weight)
    assert relative_max_diff(grouped, eager) < 2e-2


@pytest.mark.skipif(_grouped_mm is None, reason="this torch has no grouped_mm (torch < 2.8)")
def test_float32_experts_under_bf16_autocast_take_grouped_mm_and_match_eager():
    """Trainer --bf16 keeps float32 weights under autocast: "auto" must still pick the grouped GEMMs (in bf16,
    with gradients reaching the float32 weights) rather than the eager loop with its host syncs."""
    config = tiny_config(hidden_size=256, moe_intermediate_size=128)
    torch.manual_seed(0)
    experts = DeepseekV3Experts(config).cuda()
    torch.nn.init.normal_(experts.gate_up_proj, std=0.05)
    torch.nn.init.normal_(experts.down_proj, std=0.05)
    x = torch.randn(300, 256, device="cuda")
    topk_idx = torch.randint(0, 11, (300, config.num_experts_per_tok), device="cuda")
    topk_weight = torch.rand(300, config.num_experts_per_tok, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = experts._forward_eager(x, topk_idx, topk_weight)
        calls = []
        original = experts._forward_grouped_mm
        experts._forward_grouped_mm = lambda *a: calls.append(1) or original(*a)
        auto = experts(x, topk_idx, topk_weight)
    assert calls and relative_max_diff(auto, eager) < 2e-2
    auto.sum().backward()
    assert experts.gate_up_proj.grad.dtype == torch.float32 and experts.gate_up_proj.grad.abs().sum() > 0


@pytest.mark.skipif(_grouped_mm is None, reason="this torch has no grouped_mm (torch < 2.8)")
def test_grouped_experts_combine_kernel_equals_the_reference_combine():
    """The Triton combine of the expert-sorted rows (decode_kernels in inference, training_kernels with autograd)
    against `_WeightedCombine`: outputs, and the gradients of the inputs, weights and routing weights."""
    config = tiny_config(hidden_size=1040, moe_intermediate_size=128)  # two column tiles, the last partial
    torch.manual_seed(0)
    experts = DeepseekV3Experts(config).cuda().bfloat16()
    torch.nn.init.normal_(experts.gate_up_proj, std=0.05)
    torch.nn.init.normal_(experts.down_proj, std=0.05)
    x = torch.randn(300, 1040, device="cuda", dtype=torch.bfloat16)
    topk_idx = torch.stack([torch.randperm(16, device="cuda")[:4] for _ in range(300)])
    topk_weight = torch.rand(300, 4, device="cuda")
    results = []
    for fused in (True, False):
        config.decode_kernels = config.training_kernels = fused
        with torch.no_grad():
            inference = experts.eval()._forward_grouped_mm(x, topk_idx, topk_weight)
        experts.train().zero_grad(set_to_none=True)
        x_grad, w_grad = x.clone().requires_grad_(), topk_weight.clone().requires_grad_()
        out = experts._forward_grouped_mm(x_grad, topk_idx, w_grad)
        (out * torch.linspace(-1, 1, 1040, device="cuda")).sum().backward()
        results.append((inference, out.detach(), x_grad.grad, w_grad.grad, experts.down_proj.grad))
    for fused, reference in zip(*results):
        assert relative_max_diff(fused, reference) < 1e-2
    assert relative_max_diff(results[0][0], results[1][0]) < 1e-5  # same rows, float32 sums: rounding order only


@pytest.mark.skipif(_grouped_mm is None, reason="this torch has no grouped_mm (torch < 2.8)")
def test_compiled_training_step_equals_the_eager_step():
    """torch.compile(model) in training, grouped experts in bf16 with expert loads that are not multiples of 8 (a
    traced custom combine backward once made the compiled grouped GEMM assert on those): same loss and gradients as
    the eager step. A large balancing bias fixes every token's experts, so bf16 rounding cannot flip a route."""
    model = random_model(tiny_config(hidden_size=256, moe_intermediate_size=128), seed=14).cuda().bfloat16().train()
    with torch.no_grad():
        for router in model.expert_routers():
            router.e_score_correction_bias.copy_(torch.linspace(0, 30, router.n_routed_experts))
    ids = torch.randint(2, 512, (2, 37), device="cuda")  # 74 tokens per expert chosen
    steps = []
    for step_fn in (model, torch.compile(model)):
        model.zero_grad(set_to_none=True)
        loss = step_fn(ids, labels=ids).loss
        loss.backward()
        steps.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = steps
    assert relative_max_diff(compiled_loss, eager_loss) < 2e-2
    assert compiled_grads.keys() == eager_grads.keys()
    for name, eager in eager_grads.items():
        assert relative_max_diff(compiled_grads[name], eager) < 5e-2, name


@pytest.mark.skipif(_grouped_mm is None, reason="this torch has no grouped_mm (torch < 2.8)")
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_graphed_training_step_equals_the_same_eager_steps(dtype, tolerance):
    """GraphedTrainingStep against the same calls run eagerly on a copy of the model: losses, gradients and routed-token
    counts after a write, an accumulating call, a bias update and zero_grad to None, zero_grad in place, gradients
    left by an eager step, and a changed MTP weight (captured again). float32 takes the gather experts while
    capturing (the eager loop syncs); a large balancing bias fixes every token's experts so rounding cannot flip a
    route."""
    from modeling_deepseek_v3.training import GraphedTrainingStep

    eager = random_model(tiny_config(hidden_size=256, moe_intermediate_size=128), seed=14).cuda().to(dtype).train()
    with torch.no_grad():
        for router in eager.expert_routers():
            router.e_score_correction_bias.copy_(torch.linspace(0, 30, router.n_routed_experts))
    graphed = copy.deepcopy(eager)
    step = GraphedTrainingStep(graphed)
    batches = [torch.randint(2, 512, (2, 37), device="cuda") for _ in range(2)]

    def both(ids, loss_scale=1.0):
        out = eager(input_ids=ids, labels=ids, use_cache=False)
        (out.loss * loss_scale).backward()
        graphed_out = step(ids, ids, loss_scale=loss_scale)
        for name in ("loss", "lm_loss", "mtp_loss", "aux_loss"):
            assert relative_max_diff(getattr(graphed_out, name), getattr(out, name).detach()) < tolerance, name
        assert graphed_out.logits is None
        grads = {n: p.grad for n, p in graphed.named_parameters() if p.grad is not None}
        assert grads.keys() == {n for n, p in eager.named_parameters() if p.grad is not None}
        for name, param in eager.named_parameters():
            if param.grad is not None:
                assert relative_max_diff(grads[name], param.grad) < tolerance, name
        for ours, reference in zip(graphed.expert_routers(), eager.expert_routers()):
            assert torch.equal(ours.expert_load, reference.expert_load)

    both(batches[0])  # writes the gradients (the warm-up's gradients and counts are discarded)
    both(batches[1], loss_scale=0.5)  # adds to them
    assert step.captures == 2
    for model in (eager, graphed):
        model.update_expert_bias()
        model.zero_grad(set_to_none=True)
    both(batches[1])
    for model in (eager, graphed):
        model.zero_grad(set_to_none=False)
    both(batches[0])
    graphed.zero_grad(set_to_none=True)
    eager.zero_grad(set_to_none=True)
    for model in (eager, graphed):  # gradients from an eager step, then a graphed call adds to them
        model(input_ids=batches[0], labels=batches[0], use_cache=False).loss.backward()
    both(batches[1])
    assert step.captures == 2
    for model in (eager, graphed):
        model.config.mtp_loss_weight = 0.05
    both(batches[0])
    assert step.captures == 4  # a new write graph and, since gradients were set, a new accumulate graph


def test_trainer_cuda_graph_step_on_cuda_trains_as_trainer_s_own_step(tmp_path):
    """DeepseekV3Trainer(cuda_graph_step=True) on a GPU: the captured step against Trainer's own (gradient
    accumulation 2, MTP weight schedule: captured again at step 3): the same weights and logged losses. Routes are
    fixed by a large balancing bias (float32 takes other expert kernels while capturing)."""
    from test_training import RepeatedText
    from transformers import TrainingArguments

    from modeling_deepseek_v3.training import DeepseekV3Trainer

    runs = []
    for graphed in (False, True):
        model = random_model(tiny_config(aux_loss_alpha=0.01, bias_update_speed=0.001), seed=5).cuda()
        with torch.no_grad():
            for router in model.expert_routers():
                router.e_score_correction_bias.copy_(torch.linspace(0, 30, router.n_routed_experts))
        args = TrainingArguments(output_dir=str(tmp_path / str(graphed)), per_device_train_batch_size=4,
                                 gradient_accumulation_steps=2, learning_rate=3e-3, logging_steps=2, max_steps=4,
                                 save_strategy="no", report_to=[], seed=0)
        trainer = DeepseekV3Trainer(model=model, args=args, train_dataset=RepeatedText(), cuda_graph_step=graphed,
                                    mtp_loss_weight_schedule=[(0, 0.3), (3, 0.1)])
        trainer.train()
        assert (trainer._graphed is not None) == graphed
        if graphed:
            assert trainer._graphed[0].capture and trainer._graphed[0].captures >= 2
        runs.append((model, [entry for entry in trainer.state.log_history if "loss" in entry]))
    (reference, reference_logs), (ours, our_logs) = runs
    # AdamW turns float32 rounding differences of tiny gradients into lr-sized steps: 1e-3, not 1e-5. A wrong loss
    # scale shows in the gradient norm (Adam's step is nearly scale-free).
    for (name, expected), actual in zip(reference.state_dict().items(), ours.state_dict().values()):
        assert relative_max_diff(actual.float(), expected.float()) < 1e-3, name
    for expected, actual in zip(reference_logs, our_logs):
        for key in ("loss", "lm_loss", "mtp_loss", "aux_loss", "grad_norm"):
            assert actual[key] == pytest.approx(expected[key], rel=1e-3), key


def test_cuda_float32_logits_and_greedy_tokens_match_builtin(tmp_path):
    random_model(tiny_config(), seed=1).save_pretrained(tmp_path)
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).cuda().eval()
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).cuda().eval()
    ids = torch.randint(2, 512, (2, 16), device="cuda")
    with torch.no_grad():
        assert relative_max_diff(ours(ids).logits, theirs(ids).logits) <= 1e-4
    kwargs = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    assert torch.equal(ours.generate(ids, **kwargs), theirs.generate(ids, **kwargs))


def teacher_forced_logits(model, ids, cache):
    """Prefill ids[:, :8], then feed ids[:, 8:] one token per step; logits of every step."""
    mask = torch.ones(ids.shape[0], 8, dtype=torch.long, device=ids.device)
    steps = [model(ids[:, :8], attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1]]
    for t in range(8, ids.shape[1]):
        mask = torch.cat([mask, mask[:, -1:]], dim=1)
        steps.append(model(ids[:, t : t + 1], attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1])
    return torch.stack(steps)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_cuda_graph_decode_equals_eager_static_and_dynamic_decode(dtype, tolerance):
    from transformers import DynamicCache, StaticCache

    model = random_model(tiny_config(), seed=2).cuda().to(dtype)
    ids = torch.randint(2, 512, (2, 20), device="cuda")
    with torch.no_grad():
        model.config.cuda_graph_decode = True
        graph = teacher_forced_logits(model, ids, StaticCache(config=model.config, max_cache_len=32))
        assert model.__dict__.get("_decode_graphs"), "the static-cache decode steps did not use the CUDA graph"
        model.config.cuda_graph_decode = False
        eager_static = teacher_forced_logits(model, ids, StaticCache(config=model.config, max_cache_len=32))
        dynamic = teacher_forced_logits(model, ids, DynamicCache(config=model.config))
    assert relative_max_diff(graph, eager_static) < tolerance
    assert relative_max_diff(graph, dynamic) < tolerance


def test_generate_with_static_cache_and_cuda_graph_matches_dynamic_greedy_tokens():
    model = random_model(tiny_config(), seed=3).cuda()
    ids = torch.randint(2, 512, (2, 12), device="cuda")
    kwargs = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    assert torch.equal(model.generate(ids, cache_implementation="static", **kwargs), model.generate(ids, **kwargs))


@pytest.mark.parametrize("sample, eos", [(False, list(range(2, 120))), (False, None), (True, list(range(2, 120)))])
def test_generate_loop_on_the_decode_graph_equals_transformers_loop_on_cuda(monkeypatch, sample, eos):
    # sample_on_decode_graph (no host sync per token, stop flags read late, extra steps dropped; greedy picks its
    # tokens inside the graph) against transformers' own loop on the eager forward. With `eos`, most tokens end a
    # row, so rows stop at different steps; without, the steps run to the length limit (the last cache slot).
    from modeling_deepseek_v3 import modeling_deepseek_v3 as modeling

    loops = []
    original = modeling.sample_on_decode_graph
    monkeypatch.setattr(modeling, "sample_on_decode_graph", lambda *args: loops.append(1) or original(*args))
    model = random_model(tiny_config(), seed=3).cuda()
    ids = torch.randint(2, 512, (3, 12), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    kwargs = dict(max_new_tokens=24, do_sample=sample, eos_token_id=eos, pad_token_id=0, attention_mask=mask,
                  cache_implementation="static", disable_compile=True)
    if sample:
        kwargs["top_k"] = 8
    outputs = []
    for graph in (True, False):
        model.config.cuda_graph_decode = graph
        torch.manual_seed(5)
        outputs.append(model.generate(ids, **kwargs))
    assert loops == [1], "generate() did not run sample_on_decode_graph"
    assert torch.equal(outputs[0], outputs[1])


def test_beam_search_replays_the_graph_on_a_reordered_static_cache():
    # Beam search reorders the static cache between steps (new tensors); the replay copies them back into the
    # tensors the graph addresses (restore_cache_tensors), so the beams equal those of the dynamic cache.
    model = random_model(tiny_config(), seed=3).cuda()
    ids = torch.randint(2, 512, (2, 12), device="cuda")
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, num_beams=3, pad_token_id=0,
                  attention_mask=torch.ones_like(ids))
    static = model.generate(ids, cache_implementation="static", **kwargs)
    assert model.__dict__.get("_decode_graphs"), "the beam search steps did not replay the CUDA graph"
    assert torch.equal(static, model.generate(ids, **kwargs))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_training_kernels_step_equals_the_eager_step(dtype, tolerance):
    model = random_model(tiny_config(), seed=13).cuda().to(dtype).train()
    ids = torch.randint(2, 512, (2, 16), device="cuda")
    steps = []
    for setting in (True, False):
        model.config.training_kernels = setting
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        steps.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (fused_loss, fused_grads), (eager_loss, eager_grads) = steps
    assert relative_max_diff(fused_loss, eager_loss) < tolerance
    assert len(fused_grads) == len(eager_grads)
    for fused, eager in zip(fused_grads, eager_grads):
        assert relative_max_diff(fused, eager) < tolerance


@pytest.mark.parametrize("tokens", [1, 5, 64])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_triton_decode_experts_equal_the_eager_loop(tokens, dtype, tolerance):
    config = tiny_config(hidden_size=512, moe_intermediate_size=320)  # several blocks and masked edges
    torch.manual_seed(1)
    experts = DeepseekV3Experts(config).cuda().to(dtype)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.05)
    torch.nn.init.normal_(experts.down_proj, std=0.05)
    x = torch.randn(tokens, 512, device="cuda", dtype=dtype)
    topk_idx = torch.stack([torch.randperm(16, device="cuda")[:4] for _ in range(tokens)])
    topk_weight = torch.rand(tokens, 4, device="cuda")
    eager = experts._forward_eager(x, topk_idx, topk_weight)
    assert relative_max_diff(experts._forward_triton(x, topk_idx, topk_weight), eager) < tolerance
    assert relative_max_diff(experts._forward_gather(x, topk_idx, topk_weight), eager) < tolerance


@pytest.mark.parametrize("n_shared", [1, 2])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_shared_experts_inside_the_routed_kernels_equal_the_separate_and_eager_moe(monkeypatch, n_shared, dtype,
                                                                                     tolerance):
    from modeling_deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = tiny_config(hidden_size=512, moe_intermediate_size=320, n_shared_experts=n_shared)
    layer = random_model(config, seed=2).cuda().to(dtype).model.layers[1]
    moe, norm = layer.mlp, layer.post_attention_layernorm
    x = torch.randn(3, 1, 512, device="cuda", dtype=dtype)
    residual = torch.randn_like(x)
    with torch.no_grad():
        assert moe._decode_combine(x.view(-1, 512)) and moe._shared_in_expert_kernels(x.view(-1, 512))
        fused, _ = moe(x, residual=residual)
        # The decoder layer's residual add and post-attention norm inside the router's pass.
        assert moe.routes_after_add_norm(residual, x, norm)
        after_norm, _ = moe(x, residual=residual, post_attention_norm=norm)
        before_norm, _ = moe(norm(residual + x), residual=residual + x)
        monkeypatch.setattr(DeepseekV3MoE, "_shared_in_expert_kernels", lambda self, x: False)
        separate, _ = moe(x, residual=residual)
        config.decode_kernels = False
        eager, _ = moe(x, residual=residual)
    assert relative_max_diff(after_norm, before_norm) < tolerance
    assert relative_max_diff(fused, separate) < tolerance
    assert relative_max_diff(fused, eager) < tolerance


def test_repeated_generate_reuses_the_static_cache_and_its_captured_graph():
    from modeling_deepseek_v3.modeling_deepseek_v3 import DecodeGraph

    model = random_model(tiny_config(), seed=4).cuda()
    ids = torch.randint(2, 512, (1, 10), device="cuda")
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids),
                  cache_implementation="static")
    captures = DecodeGraph.captures
    first = model.generate(ids, **kwargs)
    assert DecodeGraph.captures == captures + 1  # generate() passes position_ids: the graph serves them too
    before = DecodeGraph.captures
    replays = []
    graph = next(iter(model._decode_graphs.values()))
    original = graph._run  # under replay() (transformers' loop) and advance() (sample_on_decode_graph)
    graph._run = lambda: replays.append(1) or original()
    again = model.generate(ids, **kwargs)
    assert torch.equal(first, again)
    assert DecodeGraph.captures == before and len(replays) == 5


def test_graph_capture_at_the_last_cache_slot_does_not_overflow():
    model = random_model(tiny_config(), seed=6).cuda()
    ids = torch.randint(2, 512, (1, 10), device="cuda")
    kwargs = dict(max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    static = model.generate(ids, cache_implementation="static", **kwargs)  # the cache has one slot left at capture
    torch.cuda.synchronize()
    assert torch.equal(static, model.generate(ids, **kwargs))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_decode_kernels_equal_their_eager_references(dtype, tolerance):
    from modeling_deepseek_v3 import decode_kernels as kernels
    from modeling_deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3Attention,
        DeepseekV3MLP,
        DeepseekV3RMSNorm,
        DeepseekV3TopkRouter,
        apply_rotary_interleaved,
    )

    torch.manual_seed(0)
    projection = torch.randn(3, 1, 2112, device="cuda", dtype=dtype)  # [q_a | c_kv | k_pe] of one pass
    norm = DeepseekV3RMSNorm(512).cuda().to(dtype)
    torch.nn.init.normal_(norm.weight, 1.0, 0.2)
    c_kv = projection[..., 1536:2048]  # a strided slice, as in the attention
    assert relative_max_diff(kernels.rms_norm(c_kv, norm.weight, norm.variance_epsilon), norm(c_kv)) < tolerance

    x = torch.randn(3, 1, 2048, device="cuda", dtype=dtype)
    w1, w2 = (torch.randn(n, 2048, device="cuda", dtype=dtype) * 0.02 for n in (1536, 576))
    reference = torch.cat([F.linear(x.float(), w1.float()), F.linear(x.float(), w2.float())], dim=-1)
    assert relative_max_diff(kernels.linear_pair(x, w1, w2), reference) < tolerance
    assert relative_max_diff(kernels.linear_pair(x, w2, None), reference[..., 1536:]) < tolerance

    mlp = DeepseekV3MLP(tiny_config(hidden_size=2048), intermediate_size=1408).cuda().to(dtype)
    for linear in (mlp.gate_proj, mlp.up_proj):
        torch.nn.init.normal_(linear.weight, std=0.02)
    fused = mlp.down_proj(kernels.silu_gate_up(x, mlp.gate_proj.weight, mlp.up_proj.weight))
    assert relative_max_diff(fused, mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))) < tolerance

    q = torch.randn(3, 16, 192, device="cuda", dtype=dtype)
    angles = torch.randn(3, 32, device="cuda") * 100
    cos, sin = angles.cos(), angles.sin()
    q_pe_reference = apply_rotary_interleaved(q[..., 128:], cos[:, None], sin[:, None])
    k_pe_reference = apply_rotary_interleaved(projection[:, 0, 2048:], cos, sin)
    kernels.rotate_pairs_(q[..., 128:], projection[:, 0, 2048:], cos, sin)
    assert relative_max_diff(q[..., 128:], q_pe_reference) < tolerance
    assert relative_max_diff(projection[:, 0, 2048:], k_pe_reference) < tolerance

    config = tiny_config(hidden_size=2048, n_routed_experts=64, n_group=8, topk_group=4, num_experts_per_tok=6)
    router = DeepseekV3TopkRouter(config).cuda().eval()
    torch.nn.init.normal_(router.weight, std=0.02)
    router.e_score_correction_bias.normal_(0.0, 0.05)
    router.weight.data = router.weight.data.to(dtype)
    with torch.no_grad():
        for tokens in (1, 4, 37):  # the matrix-vector kernel, and cuBLAS logits beyond MAX_GEMV_TOKENS
            hidden = torch.randn(tokens, 2048, device="cuda", dtype=dtype)
            config.decode_kernels = True
            idx, weight, scores = router(hidden)
            config.decode_kernels = False
            idx_ref, weight_ref, scores_ref = router(hidden)
            assert relative_max_diff(scores, scores_ref) < 1e-5
            order, order_ref = idx.sort(dim=-1), idx_ref.sort(dim=-1)
            assert torch.equal(order.values, order_ref.values)
            assert relative_max_diff(weight.gather(1, order.indices), weight_ref.gather(1, order_ref.indices)) < 1e-5

    attention_config = tiny_config(num_attention_heads=20, num_key_value_heads=20, kv_lora_rank=512,
                                   qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
    attention = DeepseekV3Attention(attention_config, 0).cuda().to(dtype).eval()
    B, S = 3, 300
    q_nope, q_pe = torch.randn(B, 20, 1, 128, device="cuda", dtype=dtype), torch.randn(B, 20, 1, 64, device="cuda", dtype=dtype)
    c_kv, k_pe = torch.randn(B, S, 512, device="cuda", dtype=dtype), torch.randn(B, S, 64, device="cuda", dtype=dtype)
    allowed = torch.ones(B, S, dtype=torch.bool, device="cuda")
    allowed[0, 200:] = False  # unwritten static-cache slots
    allowed[1, :50] = False  # left padding
    bias = torch.zeros(B, 1, 1, S, device="cuda", dtype=dtype).masked_fill(~allowed[:, None, None], torch.finfo(dtype).min)
    torch.nn.init.normal_(attention.kv_b_proj.weight, std=0.05)
    w_kv_b = attention.kv_b_proj.weight
    q = torch.cat([q_nope, q_pe], dim=-1)[:, :, 0]  # [B, H, N + R], as q_b_proj writes it
    with torch.no_grad():
        # The absorbed query (q_nope @ W_UK, RoPE of q_pe) in one kernel.
        q_HBk = kernels.absorb_query(q, w_kv_b, cos[:B], sin[:B], 128)
        w_uk = w_kv_b.view(20, 256, 512)[:, :128]
        q_lat_reference = torch.einsum("bhn,hnl->hbl", q_nope[:, :, 0].float(), w_uk.float())
        assert relative_max_diff(q_HBk[..., :512], q_lat_reference) < tolerance
        q_pe_reference = apply_rotary_interleaved(q_pe[:, :, 0], cos[:B, None], sin[:B, None])
        assert relative_max_diff(q_HBk[..., 512:], q_pe_reference.transpose(0, 1)) < tolerance
        # The attention over the latent cache, alone and with W_UV in its combine.
        rotated = q_pe_reference[:, :, None]  # [B, H, 1, R]
        for attention_bias in (bias, None):
            bias_BS = attention_bias[:, 0, 0] if attention_bias is not None else None
            reference = attention._attend_absorbed(q_nope, rotated, c_kv, k_pe, attention_bias)  # [B, H, 1, V]
            o_lat = kernels.absorbed_decode_attention(q_HBk[..., :512], q_HBk[..., 512:], c_kv, k_pe, bias_BS,
                                                      attention.scaling)
            unfused = torch.einsum("hbl,hvl->bhv", o_lat, w_kv_b.view(20, 256, 512)[:, 128:])
            # Against the reference's chain (einsum, bmm, softmax, bmm, einsum), rounded to bf16 at other points.
            attention_tolerance = 2 * tolerance
            assert relative_max_diff(unfused, reference[:, :, 0]) < attention_tolerance
            # W_UV after the combine, and inside it (few splits); with a static cache's length (the fresh slot read
            # after the wait), which advances by one.
            for config in (None, {"programs": 16, "fold_partials": 16}, {"programs": 64, "fold_partials": 64}):
                length = torch.tensor(150, device="cuda")
                fused = kernels.absorbed_decode_attention(q_HBk[..., :512], q_HBk[..., 512:], c_kv, k_pe, bias_BS,
                                                          attention.scaling, w_kv_b, 128, advance_length=length,
                                                          config=config)
                assert fused.shape == (B, 20 * 128) and int(length) == 151
                assert relative_max_diff(fused.view(B, 20, 128), reference[:, :, 0]) < attention_tolerance


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_fused_decode_kernels_equal_the_eager_ops_they_replace(dtype, tolerance):
    from modeling_deepseek_v3 import decode_kernels as kernels
    from modeling_deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm, apply_rotary_interleaved

    torch.manual_seed(0)
    # Residual add + RMSNorm.
    norm = DeepseekV3RMSNorm(2048).cuda().to(dtype)
    torch.nn.init.normal_(norm.weight, 1.0, 0.2)
    x, delta = torch.randn(3, 1, 2048, device="cuda", dtype=dtype), torch.randn(3, 1, 2048, device="cuda", dtype=dtype)
    total, normed = kernels.add_rms_norm(x, delta, norm.weight, norm.variance_epsilon)
    assert torch.equal(total, x + delta)
    assert relative_max_diff(normed, norm(x + delta)) < tolerance

    # MoE combine: routed sum, shared experts and residual with the eager roundings.
    T, K, D = 3, 6, 2048
    y = torch.randn(T * K, D, device="cuda")
    weight = torch.rand(T, K, device="cuda")
    shared, residual = torch.randn(T, D, device="cuda", dtype=dtype), torch.randn(T, D, device="cuda", dtype=dtype)
    routed = (y * weight.reshape(-1, 1)).view(T, K, D).sum(dim=1).to(dtype)
    assert relative_max_diff(kernels.moe_combine(y, weight, shared, residual), residual + (routed + shared)) < tolerance
    assert relative_max_diff(kernels.moe_combine(y, weight, None, residual), residual + routed) < tolerance

    # The greedy token's argmax over V3's vocabulary (two passes), first index on ties, for rows of a [B, 1, V] output.
    logits = torch.randn(4, 1, 129280, device="cuda", dtype=dtype)
    top = logits.max() + 1
    logits[1, 0, [70000, 70001]] = top
    logits[2, 0, [129279, 5]] = top
    logits[3, 0, [2 * kernels.ARGMAX_BLOCK - 1, 2 * kernels.ARGMAX_BLOCK]] = top
    assert torch.equal(kernels.argmax_rows(logits[:, -1]), logits[:, -1].float().argmax(dim=-1))

    # Latent norms + RoPE of k_pe, into fresh tensors and into a static cache's slots.
    B, T, Q, L, R = 2, 2, 1536, 512, 64
    projected = torch.randn(B, T, Q + L + R, device="cuda", dtype=dtype)
    q_norm, kv_norm = DeepseekV3RMSNorm(Q).cuda().to(dtype), DeepseekV3RMSNorm(L).cuda().to(dtype)
    for n in (q_norm, kv_norm):
        torch.nn.init.normal_(n.weight, 1.0, 0.2)
    angles = torch.randn(B * T, R // 2, device="cuda") * 100
    cos, sin = angles.cos(), angles.sin()
    q_a, c_kv_new, k_pe_new = projected.split([Q, L, R], dim=-1)
    q_a_reference, c_kv_reference = q_norm(q_a), kv_norm(c_kv_new)
    k_pe_reference = apply_rotary_interleaved(k_pe_new, cos.view(B, T, -1), sin.view(B, T, -1))
    q_out, c_kv, k_pe = kernels.latent_norm_rope(projected, q_norm.weight, kv_norm.weight, 1e-6, cos, sin)
    assert relative_max_diff(q_out, q_a_reference) < tolerance
    assert relative_max_diff(c_kv, c_kv_reference) < tolerance
    assert relative_max_diff(k_pe, k_pe_reference) < tolerance
    S = 5
    for length in (0, 2, 4):  # at 4, the second token's slot is past the cache: not written
        cache_c, cache_k = torch.zeros(B, S, L, device="cuda", dtype=dtype), torch.zeros(B, S, R, device="cuda", dtype=dtype)
        out, _, _ = kernels.latent_norm_rope(projected, q_norm.weight, kv_norm.weight, 1e-6, cos, sin,
                                             cache=(cache_c, cache_k, torch.tensor(length, device="cuda")))
        assert relative_max_diff(out, q_a_reference) < tolerance
        written = min(T, S - length)
        assert relative_max_diff(cache_c[:, length : length + written], c_kv_reference[:, :written]) < tolerance
        assert relative_max_diff(cache_k[:, length : length + written], k_pe_reference[:, :written]) < tolerance
        untouched = torch.ones(S, dtype=torch.bool)
        untouched[length : length + written] = False
        assert not cache_c[:, untouched].any() and not cache_k[:, untouched].any()


def test_decode_prologue_and_greedy_pick_equal_the_torch_ops_bit_for_bit():
    # The step's first launch (embedding, rotary angles, bias) and last (the greedy bookkeeping) replace torch ops
    # whose results the rest of the step reads: they must be the same bits, angles included (Triton's cos/sin are
    # libdevice's), at every position up to V3's 163,840.
    import json

    from _helpers import PRESETS
    from _triton_interpreter_check import greedy_reference

    from modeling_deepseek_v3 import DeepseekV3Config
    from modeling_deepseek_v3 import decode_kernels as kernels
    from modeling_deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding, build_attention_bias

    config = DeepseekV3Config(**json.loads((PRESETS / "deepseek-v3-lite.json").read_text()))  # YaRN, factor 40
    rotary = DeepseekV3RotaryEmbedding(config).cuda()
    for dtype in (torch.bfloat16, torch.float32):
        B, S = 4, 40000
        embed = torch.randn(1000, 2048, dtype=dtype, device="cuda")
        ids = torch.tensor([[7], [0], [999], [3]], device="cuda")
        for length in (0, 17, S - 1):
            mask = torch.zeros(B, S, dtype=torch.long, device="cuda")
            mask[:, : length + 1] = 1
            mask[1, : length // 2] = 0  # left padding
            positions = torch.tensor([[length], [0], [163839], [81234]], device="cuda")
            length_t = torch.tensor(length, device="cuda")
            embeds, (cos, sin), bias = kernels.decode_prologue(ids, embed, positions, rotary.inv_freq,
                                                               rotary.attention_scaling, mask, length_t)
            cos_ref, sin_ref = rotary(positions)
            assert torch.equal(embeds, embed[ids])
            assert torch.equal(cos, cos_ref) and torch.equal(sin, sin_ref)
            assert torch.equal(bias, build_attention_bias(mask, length_t.reshape(1), S, dtype, keys_are_exact=False))
    positions = torch.arange(0, 163840, 7, device="cuda")[:, None]
    cos_ref, sin_ref = rotary(positions)
    mask = torch.ones(positions.shape[0], 8, dtype=torch.long, device="cuda")
    ids = torch.zeros_like(positions)
    _, (cos, sin), _ = kernels.decode_prologue(ids, embed, positions, rotary.inv_freq, rotary.attention_scaling,
                                               mask, torch.tensor(7, device="cuda"))
    assert torch.equal(cos, cos_ref) and torch.equal(sin, sin_ref)

    torch.manual_seed(0)
    for B in (1, 3, 32, kernels.GREEDY_MAX_ROWS):
        for with_eos in (False, True):
            logits = torch.randn(B, 129280, device="cuda", dtype=torch.bfloat16)
            logits[0, [5, 70000]] = 10.0  # a tie across chunks: the first index
            state = (torch.randint(0, 129280, (B, 41), device="cuda"), torch.full((B, 1), 6, device="cuda"),
                     (torch.rand(B, 40, device="cuda") > 0.3).long(), torch.randint(0, 9, (B, 1), device="cuda"),
                     torch.zeros(B, 1, dtype=torch.long, device="cuda"))
            eos = None
            if with_eos:
                eos = (logits.argmax(-1)[::2].clone(), (torch.rand(B, device="cuda") > 0.2).long(),
                       torch.tensor(1, device="cuda"), torch.tensor(False, device="cuda"))
            expected, found = copy.deepcopy((*state, eos)), copy.deepcopy((*state, eos))
            greedy_reference(logits, *expected)
            kernels.greedy_pick_(logits, *found)
            for a, b in zip((*expected[:5], *(expected[5] or ())), (*found[:5], *(found[5] or ()))):
                assert torch.equal(a, b), (B, with_eos)


# Batch 2: the fused path (matrix-vector kernels, latent written into the cache); batch 6: past MAX_GEMV_TOKENS,
# cuBLAS projections and the one-token attention kernels.
@pytest.mark.parametrize("batch", [2, 6])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_decode_kernels_decode_equals_eager_decode(dtype, tolerance, batch):
    from transformers import StaticCache

    model = random_model(tiny_config(), seed=7).cuda().to(dtype)
    ids = torch.randint(2, 512, (batch, 20), device="cuda")
    with torch.no_grad():
        model.config.decode_kernels = True
        fast = teacher_forced_logits(model, ids, StaticCache(config=model.config, max_cache_len=32))
        model.config.decode_kernels = False
        model.config.cuda_graph_decode = False
        eager = teacher_forced_logits(model, ids, StaticCache(config=model.config, max_cache_len=32))
    assert relative_max_diff(fast, eager) < tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_output_summed_inside_the_next_layer_equals_its_own_combine(monkeypatch, dtype):
    # A decode step hands each MoE layer's output to the next layer as its parts (PendingMoEOutput), summed inside
    # the q_a/kv_a pass with the input norm (the last one inside the final norm's launch): the same bits as
    # moe_combine's launch, then the pass or the norm, and the eager path.
    from transformers import StaticCache

    from modeling_deepseek_v3 import modeling_deepseek_v3 as modeling

    model = random_model(tiny_config(num_hidden_layers=4), seed=10).cuda().to(dtype)  # 3 MoE layers: 2 hand-overs
    model.config.cuda_graph_decode = False  # count the eager step's calls
    ids = torch.randint(2, 512, (3, 14), device="cuda")
    sums, final = [], []
    normed_products, normed = modeling.PendingMoEOutput.normed_products, modeling.PendingMoEOutput.normed
    monkeypatch.setattr(modeling.PendingMoEOutput, "normed_products",
                        lambda self, *args: sums.append(self) or normed_products(self, *args))
    monkeypatch.setattr(modeling.PendingMoEOutput, "normed", lambda self, *args: final.append(self) or normed(self, *args))
    with torch.no_grad():
        folded = teacher_forced_logits(model, ids, StaticCache(config=model.config, max_cache_len=16))
        assert len(sums) == 2 * 6, "each of the 6 one-token steps: two MoE outputs summed in the next layer"
        assert len(final) == 6, "and the last one inside the final norm"
        model.config.cuda_graph_decode = True
        graphed = teacher_forced_logits(model, ids, StaticCache(config=model.config, max_cache_len=16))
        assert model.__dict__.get("_decode_graphs") and len(sums) > 2 * 6  # captured with the hand-overs
        monkeypatch.setattr(modeling, "_passes_moe_parts", lambda *args: False)
        count = len(sums)
        graphed_separate = teacher_forced_logits(model, ids, StaticCache(config=model.config, max_cache_len=16))
        model.config.cuda_graph_decode = False
        separate = teacher_forced_logits(model, ids, StaticCache(config=model.config, max_cache_len=16))
        assert len(sums) == count
        model.config.decode_kernels = False
        eager = teacher_forced_logits(model, ids, StaticCache(config=model.config, max_cache_len=16))
    assert torch.equal(folded, separate) and torch.equal(graphed, graphed_separate)
    assert relative_max_diff(folded, eager) < (1e-4 if dtype == torch.float32 else 3e-2)

    # A hook on a MoE layer sees its output, not the parts: that layer sums it itself.
    monkeypatch.undo()
    outputs = []
    model.model.layers[2].mlp.register_forward_hook(lambda module, args, output: outputs.append(output[0]))
    model.config.decode_kernels = True
    with torch.no_grad():
        hooked = teacher_forced_logits(model, ids, StaticCache(config=model.config, max_cache_len=16))
    assert outputs and all(isinstance(out, torch.Tensor) for out in outputs)
    assert torch.equal(hooked, folded)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_prompt_with_decode_kernels_equals_the_eager_prompt(dtype, tolerance):
    # A prompt (past MAX_GEMV_TOKENS) under decode_kernels: the RoPE of q_pe and k_pe in one launch
    # (rotate_pairs_training's forward), norms and the MoE kernels; left padding gives each row its own positions.
    model = random_model(tiny_config(), seed=9).cuda().to(dtype)
    ids = torch.randint(2, 512, (2, 40), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() counts them: angles [B, T, R/2]
    with torch.no_grad():
        model.config.decode_kernels = True
        fast = model(ids, attention_mask=mask, position_ids=positions).logits
        model.config.decode_kernels = False
        eager = model(ids, attention_mask=mask, position_ids=positions).logits
    assert relative_max_diff(fast[:, 7:], eager[:, 7:]) < tolerance


def test_decode_kernels_greedy_tokens_equal_eager_greedy_tokens():
    model = random_model(tiny_config(), seed=8).cuda()
    ids = torch.randint(2, 512, (2, 12), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    kwargs = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0, attention_mask=mask)
    model.config.decode_kernels = True
    fast = model.generate(ids, cache_implementation="static", **kwargs)
    model.config.decode_kernels = False
    model.config.cuda_graph_decode = False  # the eager forward (generate() would compile it otherwise)
    assert torch.equal(fast, model.generate(ids, cache_implementation="static", disable_compile=True, **kwargs))


@pytest.mark.skipif(_grouped_mm is None, reason="this torch has no grouped_mm (torch < 2.8)")
@pytest.mark.parametrize("double_quant", [False, True])
def test_qlora_4bit_experts_take_grouped_mm_under_autocast_and_match_the_eager_loop(tmp_path, double_quant):
    peft = pytest.importorskip("peft", reason="peft is a dev dependency (pip install -e '.[dev]')")
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is a dev dependency (pip install -e '.[dev]')")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from modeling_deepseek_v3.official_checkpoint import write_official_checkpoint
    from modeling_deepseek_v3.peft_experts import lora_config

    # moe_intermediate_size 128: gate/up experts hold 256 first-level blocks (double quantization dequantizes a
    # chunk's scales in one call), down experts 128 (one call per expert).
    write_official_checkpoint(random_model(tiny_config(moe_intermediate_size=128), seed=8), tmp_path, num_shards=2)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                      bnb_4bit_use_double_quant=double_quant)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, dtype=torch.float32,
                                                 device_map={"": 0})
    # r=4: the grouped GEMMs pad it to 8 in bf16 (16-byte strides).
    model = peft.get_peft_model(model, lora_config("all", r=4, init_lora_weights=False)).train()
    experts = model.base_model.model.model.layers[1].mlp.experts.base_layer
    experts.dequantize_chunk_bytes = 5 * 256 * 64 * 2  # 5 experts' gate/up weights in bf16: 4 chunks
    ids = torch.randint(2, 512, (2, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def run(implementation, autocast):
        model.config.moe_implementation = implementation
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
        return {"logits": out.logits.float(), **grads}

    def error(a, b):
        return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()

    # Both bf16 runs against the float32 eager loop: the grouped path may differ from it by bf16 rounding, as much as
    # the eager loop under autocast does, not more.
    exact = run("eager", autocast=False)
    eager = run("eager", autocast=True)
    assert not experts._stacked
    grouped = run("auto", autocast=True)
    assert set(experts._stacked) == {"gate_up", "down"}
    excess = {name: error(grouped[name], exact[name]) - 2 * error(eager[name], exact[name]) for name in exact}
    worst = max(excess, key=excess.get)
    assert excess[worst] < 5e-3, (worst, error(grouped[worst], exact[worst]), error(eager[worst], exact[worst]))
