"""PEFT LoRA: adapters on the attention projections reach every path (the absorbed decode included); per-expert
LoRA on the routed experts (peft_experts.py) trains, saves, reloads and merges, runs on routed tokens only, and
works on a bitsandbytes 4-bit model (QLoRA) with the Trainer."""

import json

import pytest
import torch
from _helpers import LargestAllocation, random_model, relative_max_diff, tiny_config
from safetensors.torch import load_file

peft = pytest.importorskip("peft", reason="peft is a dev dependency (pip install -e '.[dev]')")
from modeling_deepseek_v3.peft_experts import LoraExperts, load_lora_adapter, lora_config  # noqa: E402


def lora_model(form):
    model = random_model(tiny_config(attention_form=form), seed=12)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
                                                                 "kv_b_proj", "o_proj"], init_lora_weights=False)
    return peft.get_peft_model(model, config).eval()


def test_lora_on_kv_b_proj_is_applied_in_decode_as_in_the_naive_form():
    auto, naive = lora_model("auto"), lora_model("naive")
    ids = torch.randint(2, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids),
                  output_logits=True, return_dict_in_generate=True)
    a, b = auto.generate(input_ids=ids, **kwargs), naive.generate(input_ids=ids, **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits):
        assert relative_max_diff(x, y) < 1e-5
    plain = random_model(tiny_config(), seed=12)
    with torch.no_grad():
        assert relative_max_diff(plain(ids).logits, auto(input_ids=ids).logits) > 1e-3  # the adapters do act



# ------------------------------------------------------------------------------------------------------------------
# LoRA on the routed experts
# ------------------------------------------------------------------------------------------------------------------


def ids_of(shape=(2, 16), seed=0):
    return torch.randint(2, 512, shape, generator=torch.Generator().manual_seed(seed))


def expert_lora(config=None, seed=5, preset="all", **kwargs):
    model = random_model(config or tiny_config(), seed=seed)
    return peft.get_peft_model(model, lora_config(preset, r=4, **kwargs))


@pytest.mark.parametrize("implementation", ["eager", "gather"])
def test_expert_lora_with_zero_B_equals_the_base_experts(implementation):
    config = tiny_config(moe_implementation=implementation)
    base = random_model(config, seed=5)
    model = expert_lora(config)
    assert isinstance(model.base_model.model.model.layers[1].mlp.experts, LoraExperts)
    ids = ids_of()
    with torch.no_grad():
        expected, got = base(ids).logits, model(ids).logits
    if implementation == "eager":
        assert torch.equal(got, expected)  # the same loop, plus exact zeros
    else:
        assert relative_max_diff(got, expected) < 1e-5


def test_all_preset_targets_attention_dense_and_shared_mlps_and_routed_experts():
    model = expert_lora()
    names = {name.split(".lora_")[0].removeprefix("base_model.model.") for name, p in model.named_parameters()
             if p.requires_grad}
    assert "model.layers.0.self_attn.kv_b_proj" in names and "model.layers.0.mlp.down_proj" in names
    assert "model.layers.1.mlp.shared_experts.gate_proj" in names and "model.layers.1.mlp.experts" in names
    assert "model.layers.3.mlp.experts" in names  # the MTP layer
    # PEFT's transformers-5 migration would have turned gate/up/down_proj into target_parameters on the fused experts.
    assert not model.peft_config["default"].target_parameters


def test_lora_training_lowers_the_loss_and_trains_the_expert_adapters():
    model = expert_lora().train()
    experts = model.base_model.model.model.layers[1].mlp.experts
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = ids_of((4, 16), seed=1)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0] - 0.3
    assert experts.lora_gate_up_B["default"].abs().sum() > 0 and experts.lora_down_B["default"].abs().sum() > 0
    assert not experts.base_layer.gate_up_proj.requires_grad


def test_adapter_saves_and_reloads_to_identical_outputs(tmp_path):
    model = expert_lora(init_lora_weights=False).eval()
    ids = ids_of()
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.1.mlp.experts.lora_gate_up_A" in keys
    reloaded = load_lora_adapter(random_model(tiny_config(), seed=5), tmp_path)
    # Plain PEFT, no helper: importing peft_experts registers the expert layer on every config PEFT injects.
    plain = peft.PeftModel.from_pretrained(random_model(tiny_config(), seed=5), tmp_path)
    assert isinstance(plain.base_model.model.model.layers[1].mlp.experts, LoraExperts)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)
        assert torch.equal(plain(ids).logits, expected)


def test_a_plain_lora_config_targeting_experts_gets_per_expert_adapters():
    config = peft.LoraConfig(r=4, target_modules=["q_a_proj", "experts"], init_lora_weights=False)
    model = peft.get_peft_model(random_model(tiny_config(), seed=5), config)
    assert isinstance(model.base_model.model.model.layers[1].mlp.experts, LoraExperts)


def test_merge_and_unload_equals_the_unmerged_forward_and_saves_the_official_layout(tmp_path):
    model = expert_lora(init_lora_weights=False).eval()
    ids = ids_of()
    with torch.no_grad():
        unmerged = model(ids).logits
        merged = model.merge_and_unload()
        assert type(merged.model.layers[1].mlp.experts).__name__ == "DeepseekV3Experts"
        assert relative_max_diff(merged(ids).logits, unmerged) < 1e-5
    merged.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert "model.layers.1.mlp.experts.15.up_proj.weight" in keys
    assert not any("lora" in key or "gate_up_proj" in key for key in keys)
    reloaded = type(merged).from_pretrained(tmp_path)
    with torch.no_grad():
        assert relative_max_diff(reloaded(ids).logits, unmerged) < 1e-5


def largest_training_allocation(model, ids) -> int:
    with LargestAllocation() as mode:
        model(input_ids=ids, labels=ids).loss.backward()
    return mode.nbytes


def test_expert_lora_allocates_O_routed_tokens_never_the_merged_expert_stack():
    # 64 experts: the stack of one layer's expert weights is far larger than a few tokens' activations, as in the
    # real model. PEFT's target_parameters path adds B @ A to the whole [E, 2I, D] stack at every forward.
    config = tiny_config(n_routed_experts=64, num_hidden_layers=2, num_nextn_predict_layers=0)
    ours = expert_lora(config).train()
    merged_stack = peft.get_peft_model(random_model(config, seed=5), peft.LoraConfig(
        r=4, target_modules=[], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])).train()
    E, D, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
    gate_up_stack_bytes = E * 2 * I * D * 4

    few, more = ids_of((1, 4)), ids_of((1, 64))
    assert largest_training_allocation(merged_stack, few) >= gate_up_stack_bytes
    ours_few, ours_more = largest_training_allocation(ours, few), largest_training_allocation(ours, more)
    assert ours_few <= gate_up_stack_bytes / 16  # [E, r, D] adapter gradients, not [E, 2I, D]
    assert ours_few < ours_more < gate_up_stack_bytes / 4  # grows with the routed tokens


# ------------------------------------------------------------------------------------------------------------------
# QLoRA: LoRA on a bitsandbytes 4-bit model, the routed experts included
# ------------------------------------------------------------------------------------------------------------------

# bitsandbytes 0.50's CPU 4-bit kernels need in_features % 64 == 0 and out_features % 32 == 0 (test_quantization.py).
QUANTIZABLE = dict(moe_intermediate_size=64, q_lora_rank=64, kv_lora_rank=64, qk_rope_head_dim=32)


@pytest.fixture(scope="module")
def quantizable_checkpoint(tmp_path_factory):
    from modeling_deepseek_v3.official_checkpoint import write_official_checkpoint

    folder = tmp_path_factory.mktemp("qlora")
    write_official_checkpoint(random_model(tiny_config(**QUANTIZABLE), seed=8), folder, num_shards=2)
    return folder


def load_4bit(folder):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is a dev dependency (pip install -e '.[dev]')")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=torch.float32, device_map="cpu")


def test_qlora_trains_with_kbit_preparation_gradient_checkpointing_and_the_trainer(quantizable_checkpoint, tmp_path):
    from torch.utils.data import Dataset
    from transformers import AutoModelForCausalLM, TrainingArguments

    from modeling_deepseek_v3.quantization import DeepseekV3QuantizedExperts
    from modeling_deepseek_v3.training import DeepseekV3Trainer

    model = load_4bit(quantizable_checkpoint)
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = peft.get_peft_model(model, lora_config("all", r=4))
    experts = model.base_model.model.model.layers[1].mlp.experts
    assert isinstance(experts, LoraExperts) and isinstance(experts.base_layer, DeepseekV3QuantizedExperts)
    assert model.base_model.model.model.gradient_checkpointing

    class Blocks(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = ids_of((16,), seed=i % 2)
            return {"input_ids": ids, "labels": ids}

    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=12, per_device_train_batch_size=4,
                             learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none",
                             use_cpu=True, seed=0)
    trainer = DeepseekV3Trainer(model=model, args=args, train_dataset=Blocks())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2
    assert experts.lora_down_B["default"].abs().sum() > 0

    # The adapter is the same on the 4-bit and the float model: it loads onto the latter with every key.
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_parameters"] is None
    plain = AutoModelForCausalLM.from_pretrained(quantizable_checkpoint, dtype=torch.float32)
    ids = ids_of()
    with torch.no_grad():
        before = plain(ids).logits
        adapted = load_lora_adapter(plain, tmp_path / "adapter")
        assert relative_max_diff(adapted(ids).logits, before) > 1e-3
        assert torch.equal(adapted.base_model.model.model.layers[1].mlp.experts.lora_down_B["default"],
                           experts.lora_down_B["default"])


def test_merging_into_4bit_experts_requantizes_the_updated_weight(quantizable_checkpoint):
    from modeling_deepseek_v3.quantization import dequantized_weight

    model = peft.get_peft_model(load_4bit(quantizable_checkpoint), lora_config("all", r=4, init_lora_weights=False))
    experts = model.base_model.model.model.layers[2].mlp.experts
    before = dequantized_weight(experts.base_layer.gate_up[5]).clone()
    delta_gate_up, _ = experts.get_delta_weight("default", 5)
    experts.merge()
    after = dequantized_weight(experts.base_layer.gate_up[5])
    # Exactly one NF4 rounding of (old + delta): the error is NF4's, not the delta's.
    assert ((after - (before + delta_gate_up)).abs().mean() / (before + delta_gate_up).abs().mean()) < 0.15
    assert ((after - before).abs().mean() / (before + delta_gate_up - before).abs().mean()) > 0.5


def qlora_grads(model, implementation, ids):
    model.config.moe_implementation = implementation
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


def test_grouped_mm_qlora_experts_equal_the_eager_loop_in_outputs_and_adapter_gradients(quantizable_checkpoint):
    # The grouped path runs the expert adapters as grouped GEMMs on the sorted rows: same outputs, and the same
    # gradients for every adapter (the attention adapters' depend on the experts' input gradient).
    model = peft.get_peft_model(load_4bit(quantizable_checkpoint), lora_config("all", r=4, init_lora_weights=False))
    model.train()
    experts = model.base_model.model.model.layers[1].mlp.experts
    assert experts.base_layer.config is model.config
    experts.base_layer.dequantize_chunk_bytes = 5 * experts.base_layer.gate_up[0].out_features * 64 * 4  # 4 chunks
    ids = ids_of((2, 24), seed=3)
    expected_logits, expected = qlora_grads(model, "eager", ids)
    assert not experts.base_layer._stacked  # the eager loop did not stack the 4-bit weights
    logits, grads = qlora_grads(model, "grouped_mm", ids)
    assert set(experts.base_layer._stacked) == {"gate_up", "down"}
    assert relative_max_diff(logits, expected_logits) < 1e-5
    assert grads.keys() == expected.keys() and any("lora_down_B" in name for name in grads)
    for name in grads:
        assert relative_max_diff(grads[name], expected[name]) < 1e-4, name

    # Merging requantizes every expert and releases the stacked buffers; the grouped path restacks the new weights.
    with torch.no_grad():
        merged = model.merge_and_unload()
        assert not merged.model.layers[1].mlp.experts._stacked
        merged.config.moe_implementation = "eager"
        expected_logits = merged(ids).logits
        merged.config.moe_implementation = "grouped_mm"
        assert relative_max_diff(merged(ids).logits, expected_logits) < 1e-5
