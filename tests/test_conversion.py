"""`deepseek-v3-convert`: fp8-to-bf16, to-inference / from-inference, verify, and their failure behaviour."""

import errno
import hashlib
import json
import shutil
import subprocess
import sys

import pytest
import torch
from _helpers import block_crossing_config, random_model, tiny_config, write_dequantized_twin
from safetensors.torch import load_file, save_file

from modeling_deepseek_v3 import DeepseekV3ForCausalLM
from modeling_deepseek_v3 import convert as convert_module
from modeling_deepseek_v3.convert import main as convert_main
from modeling_deepseek_v3.convert import verify
from modeling_deepseek_v3.official_checkpoint import write_official_checkpoint
from modeling_deepseek_v3.safetensors_io import SafetensorsWriter

EXTRA_FILES = {"tokenizer.json": '{"version": "1.0"}', "tokenizer_config.json": "{}",
               "generation_config.json": '{"bos_token_id": 0, "eos_token_id": 1}',
               "modeling_deepseek.py": "# the release's own code file\n"}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """An FP8 release in the official layout (3 shards, partial blocks, MTP) with tokenizer and code files."""
    root = tmp_path_factory.mktemp("release")
    model = random_model(block_crossing_config(), seed=21)
    official = write_official_checkpoint(model, root / "fp8", fp8=True, num_shards=3, extra_files=EXTRA_FILES)
    twin = write_dequantized_twin(official, root / "fp8", root / "twin")
    return root / "fp8", official, twin


def tree_digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def read_all(folder):
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def run(*args):
    return convert_main([str(a) for a in args])


def test_fp8_to_bf16_equals_the_direct_fp8_load(release, tmp_path):
    src, _, _ = release
    before = tree_digest(src)
    assert run("fp8-to-bf16", src, tmp_path / "bf16", "--no-progress") == 0
    assert tree_digest(src) == before  # SRC untouched
    direct = DeepseekV3ForCausalLM.from_pretrained(src, dtype=torch.bfloat16).state_dict()
    converted = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16).state_dict()
    for key, tensor in direct.items():
        assert converted[key].dtype == tensor.dtype and torch.equal(converted[key], tensor), key
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
    assert not any(k.endswith("_scale_inv") for k in index["weight_map"])
    assert sorted(p.name for p in (tmp_path / "bf16").glob("*.safetensors")) == sorted(p.name for p in src.glob("*.safetensors"))
    for name, text in EXTRA_FILES.items():
        assert (tmp_path / "bf16" / name).read_text() == text
    assert verify(tmp_path / "bf16") == []
    assert not list(tmp_path.glob(".*partial*"))


def test_fp8_to_fp32_equals_the_exact_dequantization(release, tmp_path):
    src, _, twin = release
    assert run("fp8-to-bf16", src, tmp_path / "fp32", "--dtype", "fp32", "--workers", "2", "--no-progress") == 0
    written = read_all(tmp_path / "fp32")
    assert written.keys() == twin.keys()
    for key, tensor in twin.items():
        assert written[key].dtype == torch.float32 and torch.equal(written[key], tensor), key


def test_refuses_non_empty_destination_without_overwrite(release, tmp_path, capsys):
    src = release[0]
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert run("fp8-to-bf16", src, dst, "--no-progress") == 1
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    assert (dst / "keep.txt").read_text() == "mine"
    assert run("fp8-to-bf16", src, dst, "--overwrite", "--no-progress") == 0
    assert not (dst / "keep.txt").exists() and verify(dst) == []


def test_interrupted_conversion_resumes_and_skips_verified_shards(release, tmp_path, monkeypatch):
    src = release[0]
    dst = tmp_path / "bf16"
    original_write = SafetensorsWriter.write_part

    def failing_write(self, name, start, tensor):
        if "model-00002" in self.path.name:
            raise KeyboardInterrupt  # the user presses Ctrl-C during the second shard
        return original_write(self, name, start, tensor)

    monkeypatch.setattr(SafetensorsWriter, "write_part", failing_write)
    with pytest.raises(KeyboardInterrupt):
        convert_module.fp8_to_bf16(src, dst, workers=1, progress=False)
    assert not dst.exists()
    partial = tmp_path / ".bf16.partial"
    first = partial / "model-00001-of-00003.safetensors"
    assert first.exists() and not (partial / "model-00002-of-00003.safetensors").exists()
    stamp = first.stat().st_mtime_ns

    monkeypatch.setattr(SafetensorsWriter, "write_part", original_write)
    convert_module.fp8_to_bf16(src, dst, workers=1, progress=False)
    assert (dst / "model-00001-of-00003.safetensors").stat().st_mtime_ns == stamp  # kept, not redone
    assert verify(dst) == [] and not partial.exists()


def test_resume_redoes_a_shard_whose_source_changed(release, tmp_path):
    src = shutil.copytree(release[0], tmp_path / "src")
    dst = tmp_path / "bf16"
    partial = tmp_path / ".bf16.partial"
    partial.mkdir()
    # A shard left by an earlier run from a different source: same name, wrong content.
    save_file({"bogus": torch.zeros(2)}, str(partial / "model-00001-of-00003.safetensors"))
    convert_module.fp8_to_bf16(src, dst, progress=False)
    assert verify(dst) == []


@pytest.mark.parametrize("defect, message", [
    ("truncate", "truncated"),
    ("drop_scale", "has no model.layers.0.self_attn.o_proj.weight_scale_inv"),
    ("bad_grid", "o_proj.weight_scale_inv: expected a float32 scale grid of shape (2, 1)"),
    ("missing_file", "names shard files that do not exist"),
    ("int8_weight", "tensor model.layers.0.self_attn.o_proj.weight has unexpected dtype torch.int8"),
])
def test_bad_input_stops_with_a_message_and_no_complete_looking_output(release, tmp_path, capsys, defect, message):
    src = shutil.copytree(release[0], tmp_path / "src")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    key = "model.layers.0.self_attn.o_proj.weight"
    shard = src / index["weight_map"][key]
    tensors = load_file(shard)
    if defect == "truncate":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) - 1000])
    elif defect == "drop_scale":
        del tensors[key + "_scale_inv"], index["weight_map"][key + "_scale_inv"]
    elif defect == "bad_grid":
        tensors[key + "_scale_inv"] = torch.ones(1, 1)
    elif defect == "missing_file":
        shard.unlink()
    elif defect == "int8_weight":
        tensors[key] = tensors[key].view(torch.int8)
    if defect in ("drop_scale", "bad_grid", "int8_weight"):
        save_file(tensors, str(shard), metadata={"format": "pt"})
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
    before = tree_digest(src)
    assert run("fp8-to-bf16", src, tmp_path / "out", "--no-progress") == 1
    err = capsys.readouterr().err
    assert message in err
    if defect != "missing_file":
        assert shard.name in err or key in err
    assert not (tmp_path / "out").exists()
    assert tree_digest(src) == before


def test_disk_full_is_reported_and_leaves_no_destination(release, tmp_path, monkeypatch, capsys):
    def no_space(self, name, start, tensor):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(SafetensorsWriter, "write_part", no_space)
    assert run("fp8-to-bf16", release[0], tmp_path / "out", "--no-progress") == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "model-0000" in err
    assert not (tmp_path / "out").exists()


def test_verify_names_each_planted_defect(release, tmp_path, capsys):
    src = release[0]
    assert verify(src) == []
    bad = shutil.copytree(src, tmp_path / "bad")
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    first, second = sorted(bad.glob("model-*.safetensors"))[:2]
    tensors = load_file(first)
    removed = next(k for k in tensors if k.endswith("input_layernorm.weight"))
    del tensors[removed]
    del index["weight_map"][removed]
    tensors["model.layers.0.self_attn.surprise.weight"] = torch.zeros(2)
    index["weight_map"]["model.layers.0.self_attn.surprise.weight"] = first.name
    reshaped = next(k for k in tensors if k.endswith("post_attention_layernorm.weight"))
    tensors[reshaped] = torch.zeros(3)
    fp8_key = next(k for k in tensors if k.endswith("kv_b_proj.weight"))
    tensors[fp8_key] = tensors[fp8_key].to(torch.bfloat16)
    grid_key = next(k for k in tensors if k.endswith("_scale_inv") and k != fp8_key + "_scale_inv")
    weight_shape = tensors[grid_key.removesuffix("_scale_inv")].shape
    grid = (-(-weight_shape[0] // 128), -(-weight_shape[1] // 128))
    tensors[grid_key] = torch.ones(7, 7)
    save_file(tensors, str(first), metadata={"format": "pt"})
    index["weight_map"]["model.layers.9.ghost.weight"] = "model-00009-of-00009.safetensors"
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({"x": torch.zeros(1)}, str(bad / "stray.safetensors"))
    data = second.read_bytes()
    second.write_bytes(data[:-100])
    problems = "\n".join(verify(bad))
    for expected in [f"missing tensor {removed}", "unknown tensor model.layers.0.self_attn.surprise.weight",
                     f"{reshaped}: expected shape (160,), found (3,)",
                     f"{fp8_key}: expected dtype torch.float8_e4m3fn",
                     f"{grid_key}: expected scale grid {grid}, found (7, 7)",
                     "model.layers.9.ghost.weight is listed in model-00009-of-00009.safetensors, which does not exist",
                     "stray.safetensors: not referenced", f"{second.name}", "truncated"]:
        assert expected in problems, expected
    assert run("verify", bad) == 1
    assert run("verify", src) == 0


@pytest.fixture(scope="module")
def mp_release(tmp_path_factory):
    """A release whose split dims hold whole 128-blocks per rank at model parallel 2 (like the real model)."""
    root = tmp_path_factory.mktemp("mp")
    config = tiny_config(hidden_size=256, q_lora_rank=256, kv_lora_rank=256, num_attention_heads=4, num_key_value_heads=4,
                         qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64, intermediate_size=512,
                         moe_intermediate_size=256, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2,
                         num_hidden_layers=2, first_k_dense_replace=1, vocab_size=320)
    model = random_model(config, seed=31)
    write_official_checkpoint(model, root / "fp8", fp8=True, num_shards=2, extra_files={"tokenizer.json": "{}"})
    write_official_checkpoint(model, root / "bf16", fp8=False, num_shards=2)
    return root


@pytest.mark.parametrize("flavour", ["fp8", "bf16"])
def test_to_inference_and_back_round_trips_the_main_model_bit_exactly(mp_release, tmp_path, flavour, capsys):
    src = mp_release / flavour
    assert run("to-inference", src, tmp_path / "mp2", "--model-parallel", "2", "--no-progress") == 0
    assert run("from-inference", tmp_path / "mp2", tmp_path / "hf", "--config", src / "config.json", "--no-progress") == 0
    assert "no MTP layer" in capsys.readouterr().err
    original, back = read_all(src), read_all(tmp_path / "hf")
    main_model = {k: v for k, v in original.items() if not k.startswith("model.layers.2.")}
    assert back.keys() == main_model.keys()
    for key, tensor in main_model.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0
    assert ("quantization_config" in config) == (flavour == "fp8")
    assert verify(tmp_path / "hf") == []


def test_inference_format_names_and_shards_follow_the_official_script(mp_release, tmp_path):
    src = mp_release / "fp8"
    assert run("to-inference", src, tmp_path / "mp2", "--model-parallel", "2", "--no-progress") == 0
    assert sorted(p.name for p in (tmp_path / "mp2").iterdir()) == ["model0-mp2.safetensors", "model1-mp2.safetensors", "tokenizer.json"]
    rank0, rank1 = load_file(tmp_path / "mp2" / "model0-mp2.safetensors"), load_file(tmp_path / "mp2" / "model1-mp2.safetensors")
    original = read_all(src)
    assert rank0["embed.weight"].shape == (160, 256) and rank0["head.weight"].shape == (160, 256)
    assert torch.equal(torch.cat([rank0["layers.0.attn.wq_b.weight"].view(torch.uint8), rank1["layers.0.attn.wq_b.weight"].view(torch.uint8)]),
                       original["model.layers.0.self_attn.q_b_proj.weight"].view(torch.uint8))
    assert rank0["layers.0.attn.wq_b.scale"].shape == (2, 2)  # 512x256 weight, 256 rows per rank
    assert rank0["layers.0.attn.wo.weight"].shape == (256, 128)  # split along dim 1
    assert torch.equal(rank0["layers.0.attn.wkv_a.weight"].view(torch.uint8), rank1["layers.0.attn.wkv_a.weight"].view(torch.uint8))
    for name in ("layers.0.attn_norm.weight", "layers.0.ffn_norm.weight", "layers.0.attn.q_norm.weight",
                 "layers.0.attn.kv_norm.weight", "layers.1.ffn.gate.weight", "layers.1.ffn.gate.bias", "norm.weight",
                 "layers.0.ffn.w1.weight", "layers.0.ffn.w2.scale", "layers.1.ffn.shared_experts.w3.weight"):
        assert name in rank0 and name in rank1, name
    assert {k for k in rank0 if ".experts." in k and "shared" not in k} == {
        f"layers.1.ffn.experts.{e}.{w}.{t}" for e in range(4) for w in ("w1", "w2", "w3") for t in ("weight", "scale")}
    assert "layers.1.ffn.experts.4.w1.weight" in rank1
    assert not any(k.startswith("layers.2.") for k in rank0)  # the MTP layer is dropped


def test_to_inference_rejects_a_split_that_breaks_128_blocks_or_does_not_divide(mp_release, tmp_path, capsys):
    assert run("to-inference", mp_release / "fp8", tmp_path / "mp4", "--model-parallel", "4", "--no-progress") == 1
    assert "splits a 128-block" in capsys.readouterr().err
    assert run("to-inference", mp_release / "bf16", tmp_path / "mp3", "--model-parallel", "3", "--no-progress") == 1
    assert "--model-parallel 3 does not divide" in capsys.readouterr().err
    assert not (tmp_path / "mp4").exists() and not (tmp_path / "mp3").exists()


def test_console_script_help_lists_examples_for_every_subcommand():
    for command in ("fp8-to-bf16", "to-inference", "from-inference", "verify"):
        result = subprocess.run([sys.executable, "-m", "modeling_deepseek_v3.convert_cli", command, "--help"],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "examples:" in result.stdout and "deepseek-v3-convert " + command in result.stdout
