"""Official checkpoint layout on load and save, and loading the saved folder as Hub remote code."""

import json
import os
import subprocess
import sys
import textwrap

import torch
from _helpers import REPO, random_model, tiny_config
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from modeling_deepseek_v3 import DeepseekV3ForCausalLM


def official_keys(config):
    """Every tensor name of an official-layout checkpoint for `config` (REFERENCE.md section 1)."""
    keys = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for layer in range(config.num_hidden_layers + config.num_nextn_predict_layers):
        p = f"model.layers.{layer}."
        keys |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        attn = ["kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"]
        attn += ["q_a_proj", "q_a_layernorm", "q_b_proj"] if config.q_lora_rank else ["q_proj"]
        keys |= {f"{p}self_attn.{name}.weight" for name in attn}
        if layer < config.first_k_dense_replace:
            keys |= {f"{p}mlp.{name}.weight" for name in ("gate_proj", "up_proj", "down_proj")}
        else:
            keys |= {p + "mlp.gate.weight", p + "mlp.gate.e_score_correction_bias"}
            for e in range(config.n_routed_experts):
                keys |= {f"{p}mlp.experts.{e}.{name}.weight" for name in ("gate_proj", "up_proj", "down_proj")}
            keys |= {f"{p}mlp.shared_experts.{name}.weight" for name in ("gate_proj", "up_proj", "down_proj")}
        if layer >= config.num_hidden_layers:
            keys |= {p + name for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "embed_tokens.weight",
                                           "shared_head.norm.weight", "shared_head.head.weight")}
    return keys


def read_safetensors_dir(path):
    tensors = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
    return tensors


def to_official_state_dict(model):
    """Split the fused experts by hand, independently of the package's conversion table."""
    official = {}
    I = model.config.moe_intermediate_size
    for key, tensor in model.state_dict().items():
        if key.endswith("mlp.experts.gate_up_proj"):
            base = key[: -len("gate_up_proj")]
            for e in range(tensor.shape[0]):
                official[f"{base}{e}.gate_proj.weight"] = tensor[e, :I].clone()
                official[f"{base}{e}.up_proj.weight"] = tensor[e, I:].clone()
        elif key.endswith("mlp.experts.down_proj"):
            base = key[: -len("down_proj")]
            for e in range(tensor.shape[0]):
                official[f"{base}{e}.down_proj.weight"] = tensor[e].clone()
        else:
            official[key] = tensor.clone()
    for k in range(model.config.num_nextn_predict_layers):
        p = f"model.layers.{model.config.num_hidden_layers + k}."
        official[p + "embed_tokens.weight"] = official["model.embed_tokens.weight"].clone()
        official[p + "shared_head.head.weight"] = official["lm_head.weight"].clone()
    return official


def test_save_writes_exactly_the_official_keys_with_mtp_copies(tmp_path):
    config = tiny_config(num_nextn_predict_layers=1)
    model = random_model(config)
    model.save_pretrained(tmp_path)
    on_disk = read_safetensors_dir(tmp_path)
    assert set(on_disk) == official_keys(config)
    mtp = f"model.layers.{config.num_hidden_layers}."
    assert torch.equal(on_disk[mtp + "embed_tokens.weight"], on_disk["model.embed_tokens.weight"])
    assert torch.equal(on_disk[mtp + "shared_head.head.weight"], on_disk["lm_head.weight"])
    assert on_disk[mtp + "mlp.experts.0.gate_proj.weight"].shape == (config.moe_intermediate_size, config.hidden_size)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = random_model(tiny_config(), seed=3)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    expected, got = model.state_dict(), loaded.state_dict()
    assert set(expected) == set(got)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_loads_a_hand_written_official_checkpoint(tmp_path):
    model = random_model(tiny_config(), seed=4)
    save_file(to_official_state_dict(model), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((REPO / "configuration" / "deepseek-v3-tiny.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


def test_bf16_keeps_the_router_bias_in_float32(tmp_path):
    random_model(tiny_config()).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    bias = loaded.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32
    assert loaded.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    loaded.save_pretrained(tmp_path / "bf16")
    on_disk = read_safetensors_dir(tmp_path / "bf16")
    assert on_disk["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert on_disk["model.layers.1.mlp.experts.3.up_proj.weight"].dtype == torch.bfloat16


def test_saved_folder_loads_with_trust_remote_code_without_the_package(tmp_path):
    model = random_model(tiny_config(), seed=5)
    model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_deepseek_v3.DeepseekV3ForCausalLM"
    for name in ("modeling_deepseek_v3.py", "configuration_deepseek_v3.py", "checkpoint_layout.py"):
        assert (tmp_path / "ckpt" / name).exists(), name
    ids = torch.randint(2, 512, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["modeling_deepseek_v3"] = None  # the package must not be importable here
        sys.path = [p for p in sys.path if p not in ("", {str(REPO)!r})]
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r}, trust_remote_code=True,
                                                     dtype=torch.float32)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        with torch.no_grad():
            logits = model(expected["ids"]).logits
        assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
        out = model.generate(expected["ids"], max_new_tokens=4, do_sample=False)
        assert out.shape == (1, 12)
        print("remote code OK", type(model).__module__)
    """)
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote code OK" in result.stdout
