"""`deepseek-v3-plan`: the plan equals the placement `from_pretrained` makes with the same budget."""

import torch
from _helpers import PRESETS, random_model, tiny_config
from transformers import AutoModelForCausalLM

from modeling_deepseek_v3 import DeepseekV3Config
from modeling_deepseek_v3.planner import main, parse_size, plan


def test_plan_equals_from_pretrained_device_map_for_the_same_budget(tmp_path):
    config = tiny_config()
    random_model(config).save_pretrained(tmp_path / "ckpt")
    budget = {"cpu": 700_000}  # the tiny model is ~2 MB in float32: most layers go to disk
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32, device_map="auto",
                                                  max_memory=budget, offload_folder=str(tmp_path / "offload"))
    planned = plan(config, budget, dtype=torch.float32)
    assert planned["device_map"] == loaded.hf_device_map
    assert "disk" in planned["device_map"].values() and not planned["fits"]


def test_plan_counts_weights_and_latent_cache_per_device():
    config = DeepseekV3Config.from_pretrained(PRESETS / "deepseek-v3-671b.json")
    result = plan(config, {i: "141GiB" for i in range(8)} | {"cpu": "1000GiB"}, context=32768, batch=4)
    devices = result["devices"]
    assert sum(len(s["layers"]) for s in devices.values()) == 62  # 61 layers + the MTP layer
    total = sum(s["weights"] for s in devices.values())
    assert abs(total / 2**30 - 1271.5) < 1.0  # 682.6B bf16 parameters + float32 routing biases
    cache = sum(s["cache"] for s in devices.values())
    assert cache == 61 * (512 + 64) * 2 * 32768 * 4
    assert result["fits"] and "cpu" in devices


def test_cli_prints_a_table_and_rejects_fp8(capsys):
    assert main(["--config", str(PRESETS / "deepseek-v3-lite.json"), "--gpus", "1", "--gpu-memory", "78GiB"]) == 0
    out = capsys.readouterr().out
    assert "0-27" in out and "fits on the GPUs" in out
    assert main(["--config", str(PRESETS / "deepseek-v3-671b.json"), "--dtype", "fp8"]) == 1
    assert "FP8 weights in memory are not supported" in capsys.readouterr().err
    assert parse_size("141GiB") == 141 * 2**30 and parse_size("80GB") == 80 * 10**9
