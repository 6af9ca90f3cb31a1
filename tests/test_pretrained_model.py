"""transformers conventions: initialization of every tensor, gradient checkpointing, missing weights."""

import torch
from _helpers import random_model, tiny_config
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from modeling_deepseek_v3 import DeepseekV3ForCausalLM
from modeling_deepseek_v3.training import set_activation_checkpointing


def test_init_weights_covers_every_tensor():
    config = tiny_config()
    model = DeepseekV3ForCausalLM._from_config(config)
    std = config.initializer_range
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        assert torch.isfinite(tensor).all(), name
        if name.endswith(("e_score_correction_bias", "expert_load")):
            assert tensor.dtype == torch.float32 and (tensor == 0).all(), name
        elif "norm" in name:
            assert (tensor == 1).all(), name
        elif name.endswith("inv_freq"):
            assert (tensor > 0).all(), name
        else:
            assert abs(tensor.float().std().item() - std) < 0.3 * std, name


def test_checkpoint_without_mtp_layer_loads_with_fresh_mtp_weights(tmp_path):
    model = random_model(tiny_config(), seed=1)
    model.save_pretrained(tmp_path)
    n = model.config.num_hidden_layers
    weights = {k: v for k, v in load_file(tmp_path / "model.safetensors").items()
               if not k.startswith(f"model.layers.{n}.")}
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert torch.equal(loaded.model.layers[0].self_attn.kv_b_proj.weight, model.model.layers[0].self_attn.kv_b_proj.weight)
    eh_proj = loaded.model.layers[n].eh_proj.weight
    assert torch.isfinite(eh_proj).all() and eh_proj.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(2, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = random_model(tiny_config(attention_dropout=0.0), seed=2).train()
        if checkpointing:
            set_activation_checkpointing(model, True)
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_full_671b_config_builds_on_the_meta_device_with_the_published_parameter_count():
    import math

    from modeling_deepseek_v3 import DeepseekV3Config
    from modeling_deepseek_v3.checkpoint_layout import official_tensor_specs

    from _helpers import PRESETS

    config = DeepseekV3Config.from_pretrained(PRESETS / "deepseek-v3-671b.json")
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config)
    in_memory = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for name, b in model.named_buffers() if name.endswith("e_score_correction_bias"))
    on_disk = sum(math.prod(spec.shape) for spec in official_tensor_specs(config).values())
    assert round(on_disk / 1e9) == 684  # the release: "685B" = 671B main model + 14B MTP module
    # the MTP layer's stored copies of the embedding and head are shared, not separate parameters
    assert on_disk - in_memory == 2 * config.vocab_size * config.hidden_size


def test_accelerate_init_empty_weights_builds_the_671b_model_without_allocating_experts():
    import resource

    from accelerate import init_empty_weights

    from modeling_deepseek_v3 import DeepseekV3Config

    from _helpers import PRESETS

    config = DeepseekV3Config.from_pretrained(PRESETS / "deepseek-v3-671b.json")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with init_empty_weights():
        model = DeepseekV3ForCausalLM(config)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    experts = model.model.layers[3].mlp.experts
    assert experts.gate_up_proj.device.type == "meta" and experts.gate_up_proj.shape == (256, 4096, 7168)
    assert grown_kib < 2 * 2**20  # well under the 30 GB a layer of fused experts would take
