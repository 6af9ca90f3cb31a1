"""Loading the official FP8 release directly: exact dequantization, placement, and clear errors."""

import json
import shutil

import pytest
import torch
import transformers
from _helpers import block_crossing_config, random_model, relative_max_diff, write_dequantized_twin
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from modeling_deepseek_v3 import DeepseekV3ForCausalLM, DeepseekV3Model
from modeling_deepseek_v3.checkpoint_layout import official_tensor_specs
from modeling_deepseek_v3.official_checkpoint import CheckpointError, write_official_checkpoint


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    model = random_model(block_crossing_config(), seed=11)
    official = write_official_checkpoint(model, root / "fp8", fp8=True, num_shards=3)
    twin = write_dequantized_twin(official, root / "fp8", root / "twin")
    return root / "fp8", root / "twin", official, twin


def test_fixture_has_several_shards_partial_blocks_and_the_mtp_layer(fp8_checkpoint):
    fp8_dir, _, official, _ = fp8_checkpoint
    assert len(json.loads((fp8_dir / "model.safetensors.index.json").read_text())["weight_map"]) == len(official)
    assert len(list(fp8_dir.glob("*.safetensors"))) == 3
    kv_a = official["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    assert kv_a.dtype == torch.float8_e4m3fn and kv_a.shape == (176, 160)
    assert official["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (2, 2)
    assert official["model.layers.2.mlp.experts.0.gate_proj.weight_scale_inv"].shape == (2, 2)  # MTP layer, 136x160
    assert official["model.layers.2.eh_proj.weight"].dtype == torch.float32  # eh_proj is not quantized


def test_fp8_load_equals_the_dequantized_twin_bit_exactly_in_float32(fp8_checkpoint):
    fp8_dir, twin_dir, _, _ = fp8_checkpoint
    from_fp8 = DeepseekV3ForCausalLM.from_pretrained(fp8_dir, dtype=torch.float32)
    from_twin = DeepseekV3ForCausalLM.from_pretrained(twin_dir, dtype=torch.float32)
    a, b = from_fp8.state_dict(), from_twin.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    ids = torch.randint(2, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(from_fp8(ids).logits, from_twin(ids).logits)


def test_fp8_load_in_bf16_rounds_the_float32_dequantization_once(fp8_checkpoint):
    fp8_dir, _, _, twin = fp8_checkpoint
    model = AutoModelForCausalLM.from_pretrained(fp8_dir)  # default dtype: bfloat16
    state = model.state_dict()
    assert state["model.layers.0.self_attn.q_b_proj.weight"].dtype == torch.bfloat16
    assert torch.equal(state["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"],
                       twin["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].to(torch.bfloat16))
    I = model.config.moe_intermediate_size
    fused = state["model.layers.1.mlp.experts.gate_up_proj"]
    assert torch.equal(fused[5, I:], twin["model.layers.1.mlp.experts.5.up_proj.weight"].to(torch.bfloat16))
    assert state["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32


def test_builtin_on_the_twin_gives_our_logits_from_the_fp8_original(fp8_checkpoint):
    fp8_dir, twin_dir, _, _ = fp8_checkpoint
    ours = AutoModelForCausalLM.from_pretrained(fp8_dir, dtype=torch.float32)
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(twin_dir, dtype=torch.float32)
    ids = torch.randint(2, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert relative_max_diff(ours(ids).logits, theirs(ids).logits) <= 1e-4


def test_loaded_fp8_model_is_plain_and_saves_a_bf16_official_checkpoint(fp8_checkpoint, tmp_path):
    fp8_dir, _, _, twin = fp8_checkpoint
    model = AutoModelForCausalLM.from_pretrained(fp8_dir, dtype=torch.bfloat16)
    assert getattr(model.config, "quantization_config", None) is None
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config
    on_disk = load_file(tmp_path / "model.safetensors")
    assert set(on_disk) == set(official_tensor_specs(model.config))
    assert on_disk["model.layers.1.mlp.experts.3.down_proj.weight"].dtype == torch.bfloat16
    assert torch.equal(on_disk["model.layers.1.mlp.experts.3.down_proj.weight"],
                       twin["model.layers.1.mlp.experts.3.down_proj.weight"].to(torch.bfloat16))


def test_base_model_and_device_maps_load_from_fp8(fp8_checkpoint):
    fp8_dir, _, _, twin = fp8_checkpoint
    base = DeepseekV3Model.from_pretrained(fp8_dir, dtype=torch.float32, device_map="auto")  # a GPU if there is one
    assert torch.equal(base.layers[0].self_attn.o_proj.weight.cpu(), twin["model.layers.0.self_attn.o_proj.weight"])
    mapped = DeepseekV3ForCausalLM.from_pretrained(fp8_dir, dtype=torch.float32, device_map={"model": "cpu", "lm_head": "cpu"})
    assert mapped.hf_device_map == {"model": "cpu", "lm_head": "cpu"}


def test_ue8m0_power_of_two_scales_load_exactly(tmp_path):
    model = random_model(block_crossing_config(), seed=12)
    official = write_official_checkpoint(model, tmp_path / "fp8", fp8=True)
    # Re-quantize with the scales rounded up to powers of two, as DeepSeek-V3.1 (scale_fmt ue8m0) stores them.
    for key in [k for k in official if k.endswith("_scale_inv")]:
        weight = official[key.removesuffix("_scale_inv")]
        exact = torch.exp2(torch.ceil(torch.log2(official[key])))
        from _helpers import dequantize_by_blocks

        original = dequantize_by_blocks(weight, official[key])
        grid = exact.repeat_interleave(128, 0)[: weight.shape[0]].repeat_interleave(128, 1)[:, : weight.shape[1]]
        official[key.removesuffix("_scale_inv")] = (original / grid).to(torch.float8_e4m3fn)
        official[key] = exact
    save_file(official, str(tmp_path / "fp8" / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    config["quantization_config"]["scale_fmt"] = "ue8m0"
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    twin = write_dequantized_twin(official, tmp_path / "fp8", tmp_path / "twin")
    loaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "fp8", dtype=torch.float32).state_dict()
    assert torch.equal(loaded["model.layers.0.self_attn.q_a_proj.weight"], twin["model.layers.0.self_attn.q_a_proj.weight"])


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_scale_stored_in_another_shard_is_found(fp8_checkpoint, tmp_path):
    fp8_dir, _, _, twin = fp8_checkpoint
    folder = copy_checkpoint(fp8_dir, tmp_path / "moved")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = "model.layers.0.self_attn.q_b_proj.weight_scale_inv"
    source = folder / index["weight_map"][key]
    tensors = load_file(source)
    save_file({key: tensors.pop(key)}, str(folder / "scales-only.safetensors"), metadata={"format": "pt"})
    save_file(tensors, str(source), metadata={"format": "pt"})
    index["weight_map"][key] = "scales-only.safetensors"
    index_path.write_text(json.dumps(index))
    loaded = DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert torch.equal(loaded.model.layers[0].self_attn.q_b_proj.weight, twin["model.layers.0.self_attn.q_b_proj.weight"])


def rewrite_shard_without(folder, key, replacement=None):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    path = folder / index["weight_map"][key]
    tensors = load_file(path)
    if replacement is None:
        del tensors[key]
    else:
        tensors[key] = replacement
    save_file(tensors, str(path), metadata={"format": "pt"})
    if replacement is None:
        del index["weight_map"][key]
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_missing_scale_is_an_error_naming_the_tensor(fp8_checkpoint, tmp_path):
    folder = copy_checkpoint(fp8_checkpoint[0], tmp_path / "bad")
    rewrite_shard_without(folder, "model.layers.1.self_attn.o_proj.weight_scale_inv")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight has no .*weight_scale_inv"):
        DeepseekV3ForCausalLM.from_pretrained(folder)


def test_wrong_scale_grid_is_an_error_naming_the_tensor_and_shapes(fp8_checkpoint, tmp_path):
    folder = copy_checkpoint(fp8_checkpoint[0], tmp_path / "bad")
    key = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"
    rewrite_shard_without(folder, key, replacement=torch.ones(1, 2))  # [176, 160] needs a (2, 2) grid
    with pytest.raises(ValueError, match=r"kv_a_proj_with_mqa\.weight_scale_inv: expected a scale grid of shape \(2, 2\).*found \(1, 2\)"):
        DeepseekV3ForCausalLM.from_pretrained(folder)


def test_truncated_shard_is_an_error_naming_the_file(fp8_checkpoint, tmp_path):
    folder = copy_checkpoint(fp8_checkpoint[0], tmp_path / "bad")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=shard.name):
        DeepseekV3ForCausalLM.from_pretrained(folder)


def test_index_naming_a_missing_file_is_an_error(fp8_checkpoint, tmp_path):
    folder = copy_checkpoint(fp8_checkpoint[0], tmp_path / "bad")
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"names shard files that do not exist: {shard.name}"):
        DeepseekV3ForCausalLM.from_pretrained(folder)


def test_source_folder_is_never_modified(fp8_checkpoint):
    fp8_dir = fp8_checkpoint[0]
    before = {p.name: p.stat().st_mtime_ns for p in fp8_dir.iterdir()}
    DeepseekV3ForCausalLM.from_pretrained(fp8_dir)
    assert {p.name: p.stat().st_mtime_ns for p in fp8_dir.iterdir()} == before


@pytest.mark.gpu
def test_fp8_load_on_gpu_equals_cpu_load(fp8_checkpoint):
    fp8_dir = fp8_checkpoint[0]
    cpu = DeepseekV3ForCausalLM.from_pretrained(fp8_dir, dtype=torch.bfloat16)
    gpu = DeepseekV3ForCausalLM.from_pretrained(fp8_dir, dtype=torch.bfloat16, device_map="cuda")
    assert gpu.model.layers[0].self_attn.q_b_proj.weight.is_cuda
    for key, tensor in cpu.state_dict().items():
        assert torch.equal(gpu.state_dict()[key].cpu(), tensor), key


def test_mtp_layer_can_be_skipped_or_missing(fp8_checkpoint, tmp_path):
    fp8_dir, _, _, twin = fp8_checkpoint
    without_mtp = DeepseekV3ForCausalLM.from_pretrained(fp8_dir, dtype=torch.float32, num_nextn_predict_layers=0)
    assert len(without_mtp.model.layers) == without_mtp.config.num_hidden_layers
    folder = copy_checkpoint(fp8_dir, tmp_path / "no_mtp")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    for shard in sorted(folder.glob("model-*.safetensors")):
        tensors = {k: v for k, v in load_file(shard).items() if not k.startswith("model.layers.2.")}
        save_file(tensors, str(shard), metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith("model.layers.2.")}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert torch.equal(loaded.model.layers[1].self_attn.o_proj.weight, twin["model.layers.1.self_attn.o_proj.weight"])
    eh_proj = loaded.model.layers[2].eh_proj.weight
    assert eh_proj.device.type == "cpu" and torch.isfinite(eh_proj).all() and eh_proj.std() > 0


@pytest.mark.parametrize("shape", [(576, 7168 // 8), (128, 128), (5, 300), (257, 129)])
def test_dequantize_matches_the_blockwise_reference_on_partial_blocks(shape):
    from _helpers import dequantize_by_blocks

    from modeling_deepseek_v3.fp8 import dequantize_fp8_block, quantize_fp8_block

    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05
    q, scale = quantize_fp8_block(weight)
    assert scale.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    reference = dequantize_by_blocks(q, scale)
    assert torch.equal(dequantize_fp8_block(q, scale, torch.float32), reference)
    assert torch.equal(dequantize_fp8_block(q, scale, torch.bfloat16), reference.to(torch.bfloat16))
    assert (reference - weight).abs().max() <= weight.abs().max() / 8  # fp8 keeps ~3 mantissa bits


def test_missing_routing_bias_is_an_error(fp8_checkpoint, tmp_path):
    folder = copy_checkpoint(fp8_checkpoint[0], tmp_path / "bad")
    rewrite_shard_without(folder, "model.layers.1.mlp.gate.e_score_correction_bias")
    with pytest.raises(CheckpointError, match=r"lacks 1 buffers of the model, e.g. \['model.layers.1.mlp.gate.e_score_correction_bias'\]"):
        DeepseekV3ForCausalLM.from_pretrained(folder)
