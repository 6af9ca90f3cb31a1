"""The `decode_kernels` switch on the CPU: the Triton fast paths are CUDA-only, so the CPU forward (and any training
forward) is the eager reference whatever the switch says. Their equality with the eager ops is held by the GPU
tests in test_gpu.py (`test_decode_kernels_*`). Where triton is installed (CUDA builds of torch), two more checks
need no GPU: every kernel compiles for Hopper, and the loop-free kernels match the eager ops in Triton's
interpreter."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _helpers import random_model, tiny_config
from transformers import StaticCache


def _decode_logits(model, ids):
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 1)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        model(ids[:, :-1], attention_mask=mask[:, :-1], past_key_values=cache)
        return model(ids[:, -1:], attention_mask=mask, past_key_values=cache).logits


def test_decode_kernels_switch_leaves_the_cpu_forward_on_the_eager_path():
    model = random_model(tiny_config(), seed=11)
    ids = torch.randint(2, 512, (2, 9))
    model.config.decode_kernels = True
    with_switch = _decode_logits(model, ids)
    model.config.decode_kernels = False
    assert torch.equal(with_switch, _decode_logits(model, ids))


def test_kernel_switches_are_saved_config_fields_on_by_default(tmp_path):
    config = tiny_config()
    assert config.decode_kernels is True and config.training_kernels is True
    config.decode_kernels, config.training_kernels = False, False
    config.save_pretrained(tmp_path)
    reloaded = type(config).from_pretrained(tmp_path)
    assert reloaded.decode_kernels is False and reloaded.training_kernels is False


def test_training_kernels_switch_leaves_the_cpu_training_step_on_the_eager_path():
    model = random_model(tiny_config(), seed=12).train()
    ids = torch.randint(2, 512, (2, 9))
    grads = []
    for setting in (True, False):
        model.config.training_kernels = setting
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        grads.append(model.model.layers[0].input_layernorm.weight.grad.clone())
    assert torch.equal(grads[0], grads[1])


def _triton_or_skip():
    return pytest.importorskip("triton", reason="triton is not installed (CUDA builds of torch ship it)")


def test_triton_kernels_compile_for_hopper_without_a_gpu(monkeypatch):
    """Every Triton kernel of a decode step (PDL variants included), the training kernels and the grouped experts'
    combine compile to sm_90a machine code (the Hopper build), from real wrapper calls on CPU tensors: the launch is
    replaced by an ahead-of-time compile."""
    triton = _triton_or_skip()
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from modeling_deepseek_v3 import decode_kernels, moe_kernels
    from modeling_deepseek_v3.training_kernels import rms_norm_training, rotate_pairs_training, silu_mul_training

    types = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.int64: "i64", torch.bool: "i1"}
    compiled = set()

    def compile_instead_of_launch(kernel, *args, grid, warmup=False, **kwargs):
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "launch_pdl") if k in kwargs}
        values = dict(zip(kernel.arg_names, args), **kwargs)
        signature, constexprs = {}, {}
        for param, name in zip(kernel.params, kernel.arg_names):
            value = values[name]
            if param.is_constexpr:
                signature[name], constexprs[name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[name] = "*" + types[value.dtype]
            else:
                signature[name] = "fp32" if isinstance(value, float) else "i32"
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        compiled.add(kernel.fn.__name__)

    monkeypatch.setattr(JITFunction, "run", compile_instead_of_launch)
    pdl = lambda x: {"PDL": True, "launch_pdl": True}  # noqa: E731
    monkeypatch.setattr(decode_kernels, "_launch_options", pdl)
    monkeypatch.setattr(moe_kernels, "_launch_options", pdl)

    def t(*shape):
        return torch.randn(*shape, dtype=torch.bfloat16)

    angle = torch.rand(1, 32)
    decode_kernels.rms_norm(t(3, 1, 512), t(512), 1e-6)
    decode_kernels.add_rms_norm(t(1, 1, 2048), t(1, 1, 2048), t(2048), 1e-6)
    decode_kernels.linear_pair(t(1, 2048), t(1536, 2048), t(576, 2048))
    decode_kernels.linear_pair(t(1, 2048), t(1536, 2048), t(576, 2048), norm=(t(2048), 1e-6))  # + the input norm
    decode_kernels.linear_pair(torch.randn(8, 2048), t(1536, 2048), t(576, 2048), norm=(t(2048), 1e-6),
                               residual=t(1, 1, 2048), combine=(torch.rand(1, 6), 2))  # + the MoE layer's sum
    decode_kernels.router_scores(t(1, 2048), t(64, 2048))
    decode_kernels.router_scores(t(1, 2048), t(64, 2048), add_norm=(t(1, 2048), t(2048), 1e-6))  # + add, norm
    decode_kernels.silu_gate_up(t(1, 2048), t(2816, 2048), t(2816, 2048))
    decode_kernels.noaux_topk(torch.rand(1, 64), torch.zeros(64), 8, 4, 6, True, 2.5)
    decode_kernels.rotate_pairs_(t(1, 16, 192)[..., 128:], t(1, 64), angle, angle)
    decode_kernels.latent_norm_rope(t(1, 1, 2112), t(1536), t(512), 1e-6, angle, angle,
                                    cache=(t(1, 100, 512), t(1, 100, 64), torch.tensor(3)))
    q = decode_kernels.absorb_query(t(1, 16, 192), t(16 * 256, 512), angle, angle, 128)
    decode_kernels.absorb_query(t(1, 16, 192), t(16 * 256, 512), angle, angle, 128,  # + the new latent row
                                latent=(t(1, 576), t(512), 1e-6, (t(1, 100, 512), t(1, 100, 64), torch.tensor(3))))
    decode_kernels.absorbed_decode_attention(q[..., :512], q[..., 512:], t(1, 1025, 512), t(1, 1025, 64), t(1, 1025),
                                             0.1, t(16 * 256, 512), 128, advance_length=torch.tensor(3),
                                             config={"fold_partials": 0})  # the combine, then W_UV
    decode_kernels.absorbed_decode_attention(q[..., :512], q[..., 512:], t(1, 1025, 512), t(1, 1025, 64), None, 0.1,
                                             t(16 * 256, 512), 128, config={"fold_partials": 64})  # combine in W_UV
    decode_kernels.moe_combine(torch.randn(6, 2048), torch.rand(1, 6), t(1, 2048), t(1, 2048))
    decode_kernels.argmax_rows(t(2, 129280))
    ids = torch.zeros(2, 1, dtype=torch.long)
    decode_kernels.decode_prologue(ids, t(129280, 2048), ids.clone(), torch.rand(32), 1.0,
                                   torch.ones(2, 1025, dtype=torch.long), torch.tensor(3))
    decode_kernels.greedy_pick_(t(2, 129280), torch.zeros(2, 1026, dtype=torch.long), ids.clone(),
                                torch.ones(2, 1025, dtype=torch.long), ids.clone(), ids.clone(),
                                eos=(torch.tensor([1, 2]), torch.ones(2, dtype=torch.long), torch.tensor(0),
                                     torch.tensor(False)))
    experts = torch.arange(6)
    moe_kernels.expert_down(moe_kernels.expert_gate_up_act(t(1, 2048), t(64, 2816, 2048), experts, 6),
                            t(64, 2048, 1408), experts)
    h = moe_kernels.expert_gate_up_act(t(1, 2048), t(64, 2816, 2048), experts, 6, shared_gate=t(2816, 2048),
                                       shared_up=t(2816, 2048))  # with the shared experts as 2 more pairs
    y = moe_kernels.expert_down(h, t(64, 2048, 1408), experts, shared_down=t(2048, 2816))
    decode_kernels.moe_combine(y, torch.rand(1, 6), None, t(1, 2048), shared_parts=2)
    decode_kernels.moe_combine(y, torch.rand(1, 6), None, t(1, 2048), shared_parts=2, norm=(t(2048), 1e-6))
    x = t(8, 2048).requires_grad_()
    rms_norm_training(x, t(2048).requires_grad_(), 1e-6).backward(t(8, 2048))  # the training kernels, both ways
    gate_up = t(8, 2816).requires_grad_()
    silu_mul_training(*gate_up.chunk(2, dim=-1)).backward(t(8, 1408))
    q_pe, k_pe = t(8, 16, 192)[..., 128:].requires_grad_(), t(8, 576)[:, 512:].requires_grad_()
    q_rot, k_rot = rotate_pairs_training(q_pe, k_pe, angle.expand(8, 32), angle.expand(8, 32))
    (q_rot.sum() + k_rot.sum()).backward()
    y = t(48, 2048).requires_grad_()  # the grouped experts' combine, both ways
    moe_kernels.combine_sorted_pairs(y, torch.randperm(48).view(8, 6), torch.rand(8, 6).requires_grad_()).backward(
        torch.randn(8, 2048))
    assert len(compiled) == 25, sorted(compiled)


def test_triton_kernels_equal_the_eager_ops_in_the_triton_interpreter():
    """The kernels' math on CPU tensors through Triton's interpreter (tests/_triton_interpreter_check.py): the
    loop-free decode kernels, and the training kernels' forward and backward against eager autograd."""
    _triton_or_skip()
    env = dict(os.environ, TRITON_INTERPRET="1", DEEPSEEK_V3_PDL="0")
    script = Path(__file__).with_name("_triton_interpreter_check.py")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env,
                            cwd=script.parent)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout[-2000:] + result.stderr[-3000:]


def test_decode_expert_kernels_name_a_missing_or_misshaped_shared_expert_weight():
    from modeling_deepseek_v3 import decode_kernels, moe_kernels

    def t(*shape):
        return torch.zeros(*shape, dtype=torch.bfloat16)

    experts = torch.arange(6)
    with pytest.raises(ValueError, match="shared_up must be a 2D torch.bfloat16 weight.*found None"):
        moe_kernels.expert_gate_up_act(t(1, 2048), t(64, 2816, 2048), experts, 6, shared_gate=t(2816, 2048))
    with pytest.raises(ValueError, match=r"must be \(2816, 2048\) with a multiple of the expert width 1408"):
        moe_kernels.expert_gate_up_act(t(1, 2048), t(64, 2816, 2048), experts, 6, shared_gate=t(2816, 2048),
                                       shared_up=t(2000, 2048))
    with pytest.raises(ValueError, match=r"must be \(2048, 2000\) with a multiple of the expert width 1408"):
        moe_kernels.expert_down(t(8, 1408), t(64, 2048, 1408), experts, shared_down=t(2048, 2000))
    with pytest.raises(ValueError, match="h has 7 rows for 6 routed pairs and 2 shared parts"):
        moe_kernels.expert_down(t(7, 1408), t(64, 2048, 1408), experts, shared_down=t(2048, 2816))
    with pytest.raises(ValueError, match="shared_parts=2 needs y"):
        decode_kernels.moe_combine(torch.zeros(7, 2048), torch.rand(1, 6), None, t(1, 2048), shared_parts=2)
