"""bitsandbytes 4-bit and 8-bit loading: every linear and the routed experts quantized, straight from BF16 or FP8
official checkpoints, shard by shard."""

import pytest
import torch
from _helpers import LargestAllocation, random_model, relative_max_diff, tiny_config, write_dequantized_twin
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from modeling_deepseek_v3 import DeepseekV3ForCausalLM
from modeling_deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts
from modeling_deepseek_v3.official_checkpoint import CheckpointReader, write_official_checkpoint
from modeling_deepseek_v3.quantization import DeepseekV3QuantizedExperts, dequantized_weight, expected_4bit_footprint

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is a dev dependency (pip install -e '.[dev]')")

# bitsandbytes 0.50's CPU kernels dequantize 4-bit weights correctly only when in_features is a multiple of the
# 64-element block, and its CPU inference layout needs out_features % 32 == 0: the tiny preset's 32-wide expert
# and latent dimensions, and its 8-dim RoPE head (kv_a_proj_with_mqa 32 + 8 rows), are widened here.
QUANTIZABLE = dict(moe_intermediate_size=64, q_lora_rank=64, kv_lora_rank=64, qk_rope_head_dim=32)
NF4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
INT8 = BitsAndBytesConfig(load_in_8bit=True)


def quantizable_config(**overrides):
    return tiny_config(**{**QUANTIZABLE, **overrides})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantization")
    model = random_model(quantizable_config(), seed=21)
    write_official_checkpoint(model, root / "fp32", num_shards=3)
    official = write_official_checkpoint(model, root / "fp8", fp8=True, num_shards=3)
    write_dequantized_twin(official, root / "fp8", root / "twin")
    return model, root


def token_ids(seed=0, shape=(2, 16)):
    return torch.randint(2, 512, shape, generator=torch.Generator().manual_seed(seed))


def mean_relative_error(a, b):
    return ((a - b).abs().mean() / b.abs().mean()).item()


def plain_linears(model):
    return [name for name, module in model.named_modules() if type(module) is nn.Linear]


def test_4bit_load_quantizes_every_linear_and_the_routed_experts(checkpoints):
    reference, root = checkpoints
    model = AutoModelForCausalLM.from_pretrained(root / "fp32", quantization_config=NF4, dtype=torch.float32, device_map="cpu")
    assert plain_linears(model) == ["lm_head"]
    assert model.is_loaded_in_4bit and model.config.quantization_config.load_in_4bit
    moe = model.model.layers[1].mlp
    assert isinstance(moe.experts, DeepseekV3QuantizedExperts) and len(moe.experts.gate_up) == 16
    assert all(isinstance(linear, bnb.nn.Linear4bit) for linear in (*moe.experts.gate_up, *moe.experts.down))
    assert moe.experts.gate_up[3].weight.quant_type == "nf4"
    assert isinstance(moe.shared_experts.down_proj, bnb.nn.Linear4bit)
    assert isinstance(model.model.layers[3].eh_proj, bnb.nn.Linear4bit)  # the MTP layer too
    assert moe.gate.weight.dtype == torch.float32 and moe.gate.e_score_correction_bias.dtype == torch.float32
    assert model.model.norm.weight.dtype == torch.float32

    # The packed weights hold the checkpoint's values (NF4 error only), gate rows before up rows.
    fused = reference.model.layers[1].mlp.experts.gate_up_proj[3].detach()
    packed = dequantized_weight(moe.experts.gate_up[3])
    assert mean_relative_error(packed, fused) < 0.15
    assert mean_relative_error(packed, fused.roll(fused.shape[0] // 2, dims=0)) > 0.5  # halves in order

    # The quantized model computes what a float32 model with the dequantized weights computes.
    twin = random_model(quantizable_config(), seed=21)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit) and ".experts." not in name:
                twin.get_submodule(name).weight.copy_(dequantized_weight(module))
            elif isinstance(module, DeepseekV3QuantizedExperts):
                fused_twin = twin.get_submodule(name)
                for e in range(module.num_experts):
                    fused_twin.gate_up_proj[e].copy_(dequantized_weight(module.gate_up[e]))
                    fused_twin.down_proj[e].copy_(dequantized_weight(module.down[e]))
        ids = token_ids()
        # Training mode first: on AVX512-BF16 hosts bitsandbytes' CPU inference path (eval mode) repacks the
        # weights and computes in bf16; in training it dequantizes and multiplies in float32, as on a GPU.
        model.train(), twin.train()
        assert relative_max_diff(model(ids).logits, twin(ids).logits) < 1e-5
        model.eval()
        assert relative_max_diff(model(ids).logits, reference(ids).logits) < 0.4  # 4-bit noise on a random model


def test_8bit_load_quantizes_every_linear_and_stays_close_to_float32(checkpoints):
    reference, root = checkpoints
    model = AutoModelForCausalLM.from_pretrained(root / "fp32", quantization_config=INT8, dtype=torch.float32, device_map="cpu")
    assert plain_linears(model) == ["lm_head"] and model.is_loaded_in_8bit
    experts = model.model.layers[2].mlp.experts
    assert isinstance(experts, DeepseekV3QuantizedExperts)
    assert all(linear.weight.dtype == torch.int8 for linear in (*experts.gate_up, *experts.down))
    assert isinstance(model.model.layers[0].mlp.gate_proj, bnb.nn.Linear8bitLt)
    ids = token_ids(1)
    with torch.no_grad():
        assert relative_max_diff(model(ids).logits, reference(ids).logits) < 0.1


def test_skip_modules_keep_the_named_modules_in_high_precision(checkpoints):
    reference, root = checkpoints
    config = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["lm_head", "experts", "kv_b_proj"])
    model = DeepseekV3ForCausalLM.from_pretrained(root / "fp32", quantization_config=config, dtype=torch.float32, device_map="cpu")
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts, DeepseekV3Experts)
    assert torch.equal(experts.gate_up_proj, reference.model.layers[1].mlp.experts.gate_up_proj)
    assert type(model.model.layers[1].self_attn.kv_b_proj) is nn.Linear
    assert isinstance(model.model.layers[1].self_attn.q_b_proj, bnb.nn.Linear4bit)
    assert isinstance(model.model.layers[1].mlp.shared_experts.up_proj, bnb.nn.Linear4bit)


def test_memory_footprint_is_within_10_percent_of_the_4bit_expectation(checkpoints):
    reference, root = checkpoints
    model = AutoModelForCausalLM.from_pretrained(root / "fp32", quantization_config=NF4, dtype=torch.float32, device_map="cpu")
    # Independent of the quantized model: half a byte per weight of every linear (lm_head excepted) and of the
    # routed experts, float32 for everything else.
    quantized_names = {f"{name}.weight" for name in plain_linears(reference) if name != "lm_head"}
    expected = 0
    for name, tensor in list(reference.named_parameters()) + list(reference.named_buffers()):
        if name in quantized_names or name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            expected += tensor.numel() // 2
        else:
            expected += tensor.numel() * 4
    footprint = model.get_memory_footprint()
    assert abs(footprint - expected) / expected < 0.10
    assert expected_4bit_footprint(model) == expected
    assert footprint < 0.25 * reference.get_memory_footprint()


def test_fp8_release_loads_straight_into_4bit_one_shard_at_a_time(checkpoints, monkeypatch):
    _, root = checkpoints
    open_shards = []
    original_open = CheckpointReader._open

    def tracking_open(self, filename):
        handle = original_open(self, filename)
        open_shards.append(len(self._handles))
        return handle

    monkeypatch.setattr(CheckpointReader, "_open", tracking_open)
    from_fp8 = AutoModelForCausalLM.from_pretrained(root / "fp8", quantization_config=NF4, dtype=torch.float32, device_map="cpu")
    assert max(open_shards) == 1  # each shard is released before the next one is read
    assert getattr(from_fp8.config.quantization_config, "quant_method", None) == "bitsandbytes"
    assert plain_linears(from_fp8) == ["lm_head"]

    # Exactly what quantizing the exactly dequantized twin gives: the FP8 weights are dequantized before NF4.
    from_twin = AutoModelForCausalLM.from_pretrained(root / "twin", quantization_config=NF4, dtype=torch.float32, device_map="cpu")
    a, b = dict(from_fp8.named_parameters()), dict(from_twin.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ids = token_ids(2)
    with torch.no_grad():
        assert torch.equal(from_fp8(ids).logits, from_twin(ids).logits)


def test_a_quantized_model_refuses_save_pretrained_with_a_way_out(checkpoints, tmp_path):
    _, root = checkpoints
    model = AutoModelForCausalLM.from_pretrained(root / "fp32", quantization_config=NF4, dtype=torch.float32, device_map="cpu")
    with pytest.raises(NotImplementedError, match="merge_and_unload"):
        model.save_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------------------------
# The grouped path of the 4-bit experts: chunks of experts dequantized at once, against the eager loop
# ------------------------------------------------------------------------------------------------------------------


def random_4bit_experts(moe_intermediate_size, double_quant):
    from modeling_deepseek_v3.quantization import quantize_weight

    config = quantizable_config(moe_intermediate_size=moe_intermediate_size, moe_implementation="eager")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                      bnb_4bit_use_double_quant=double_quant)
    experts = DeepseekV3QuantizedExperts(config, quantization)
    generator = torch.Generator().manual_seed(3)
    for linear in (*experts.gate_up, *experts.down):
        quantize_weight(linear, torch.randn(linear.out_features, linear.in_features, generator=generator) * 0.05, "cpu")
    return experts


def routed_batch(experts, tokens=40):
    generator = torch.Generator().manual_seed(4)
    E, K = experts.num_experts, experts.config.num_experts_per_tok
    x = torch.randn(tokens, experts.config.hidden_size, generator=generator, requires_grad=True)
    # The last 3 experts receive no token: empty groups, and with small chunks an empty chunk.
    idx = torch.stack([torch.randperm(E - 3, generator=generator)[:K] for _ in range(tokens)])
    weight = torch.rand(tokens, K, generator=generator, requires_grad=True)
    return x, idx, weight


def output_and_grads(experts, implementation, x, idx, weight):
    experts.config.moe_implementation = implementation
    out = experts(x, idx, weight)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    grads = (x.grad.clone(), weight.grad.clone())
    x.grad = weight.grad = None
    return out.detach(), grads


# moe_intermediate_size 64: 128 first-level blocks per gate/up expert, not a multiple of the 256-block second level
# (double quantization dequantizes each expert's scales apart); 256: aligned (one call for the chunk).
@pytest.mark.parametrize("moe_intermediate_size, double_quant", [(64, False), (64, True), (256, True)])
@pytest.mark.parametrize("experts_per_chunk", [None, 3])
def test_grouped_mm_4bit_experts_equal_the_eager_loop(moe_intermediate_size, double_quant, experts_per_chunk):
    experts = random_4bit_experts(moe_intermediate_size, double_quant)
    D, I = experts.config.hidden_size, moe_intermediate_size
    if experts_per_chunk:
        experts.dequantize_chunk_bytes = experts_per_chunk * 2 * I * D * 4
    batch = routed_batch(experts)
    expected, expected_grads = output_and_grads(experts, "eager", *batch)
    got, grads = output_and_grads(experts, "grouped_mm", *batch)
    assert relative_max_diff(got, expected) < 1e-6
    for a, b in zip(grads, expected_grads):
        assert relative_max_diff(a, b) < 1e-6
    # The experts' weights are now views of the stacked buffers: the eager loop reads the same values.
    assert experts.gate_up[5].weight.data_ptr() == experts.stacked("gate_up").data[5].data_ptr()
    assert torch.equal(output_and_grads(experts, "eager", *batch)[0], expected)


def test_grouped_mm_restacks_an_expert_given_a_new_weight():
    from modeling_deepseek_v3.quantization import quantize_weight

    experts = random_4bit_experts(64, double_quant=True)
    batch = routed_batch(experts)
    output_and_grads(experts, "grouped_mm", *batch)
    stacked = experts.stacked("down")
    quantize_weight(experts.down[2], 0.1 * torch.ones(experts.down[2].out_features, experts.down[2].in_features), "cpu")
    assert not stacked.is_current(experts.down)
    expected, _ = output_and_grads(experts, "eager", *batch)
    got, _ = output_and_grads(experts, "grouped_mm", *batch)
    assert experts.stacked("down") is not stacked
    assert relative_max_diff(got, expected) < 1e-6


def test_grouped_mm_4bit_experts_hold_one_chunk_of_dequantized_weights_never_the_stack():
    experts = random_4bit_experts(256, double_quant=True)
    D, I, E = experts.config.hidden_size, 256, experts.num_experts
    experts.dequantize_chunk_bytes = 2 * 2 * I * D * 4  # two experts' gate/up weights in float32
    x, idx, weight = routed_batch(experts, tokens=8)
    experts.config.moe_implementation = "grouped_mm"
    experts.stacked("gate_up"), experts.stacked("down")  # built once, outside the measured step
    with LargestAllocation() as mode:
        experts(x, idx, weight).sum().backward()
    assert mode.nbytes <= experts.dequantize_chunk_bytes < E * 2 * I * D * 4
    assert x.grad.abs().sum() > 0
