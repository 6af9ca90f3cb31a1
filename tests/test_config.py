import json
import math

import pytest
from _helpers import PRESETS, tiny_config
from transformers import AutoConfig

from modeling_deepseek_v3 import DeepseekV3Config

OFFICIAL = PRESETS / "deepseek-v3-671b.json"


def test_official_config_reads_every_field_unchanged():
    raw = json.loads(OFFICIAL.read_text())
    config = DeepseekV3Config.from_pretrained(OFFICIAL)
    for key, value in raw.items():
        if key in ("auto_map", "torch_dtype", "transformers_version", "rope_scaling"):
            continue
        assert getattr(config, key) == value, key
    yarn = config.yarn_parameters
    for key, value in raw["rope_scaling"].items():
        assert yarn[key] == value, key
    assert config.quantization_config["weight_block_size"] == [128, 128]
    assert config.num_nextn_predict_layers == 1


def test_official_config_writes_back_in_official_form(tmp_path):
    config = DeepseekV3Config.from_pretrained(OFFICIAL)
    config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    raw = json.loads(OFFICIAL.read_text())
    assert "rope_parameters" not in written
    assert written["rope_theta"] == raw["rope_theta"]
    assert written["rope_scaling"] == raw["rope_scaling"]
    for key in ("num_nextn_predict_layers", "n_routed_experts", "topk_method", "scoring_func", "aux_loss_alpha",
                "seq_aux", "q_lora_rank", "kv_lora_rank", "quantization_config", "first_k_dense_replace"):
        assert written[key] == raw[key], key
    again = DeepseekV3Config.from_pretrained(tmp_path)
    assert again.to_dict() == config.to_dict()


def test_softmax_scale_includes_yarn_mscale_squared():
    config = DeepseekV3Config.from_pretrained(OFFICIAL)
    mscale = 0.1 * 1.0 * math.log(40) + 1.0
    assert config.softmax_scale == pytest.approx(192**-0.5 * mscale**2)
    assert config.softmax_scale == pytest.approx(0.1352338, abs=1e-6)
    assert tiny_config(rope_scaling=None).softmax_scale == pytest.approx(24**-0.5)


def test_auto_config_resolves_to_package_class():
    config = AutoConfig.from_pretrained(OFFICIAL)
    assert type(config) is DeepseekV3Config


def test_q_lora_rank_none_is_supported():
    config = tiny_config(q_lora_rank=None)
    assert config.q_lora_rank is None


def test_documented_training_defaults():
    config = DeepseekV3Config()
    assert config.mtp_loss_weight == 0.1
    assert config.bias_update_speed == 0.001
    assert config.aux_loss_alpha == 0.001 and config.seq_aux is True


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"n_routed_experts": 15}, "n_routed_experts"),
        ({"topk_group": 5}, "topk_group"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"scoring_func": "relu"}, "scoring_func"),
        ({"topk_method": "random"}, "topk_method"),
        ({"num_key_value_heads": 2}, "num_key_value_heads"),
        ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
        ({"attention_form": "fast"}, "attention_form"),
        ({"moe_implementation": "cutlass"}, "moe_implementation"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"first_k_dense_replace": 9}, "first_k_dense_replace"),
        ({"num_nextn_predict_layers": -1}, "num_nextn_predict_layers"),
    ],
)
def test_inconsistent_values_are_rejected_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"DeepseekV3Config.{field}"):
        tiny_config(**overrides)


@pytest.mark.parametrize("preset", sorted(p.name for p in PRESETS.glob("*.json")))
def test_every_preset_is_a_valid_config(preset):
    config = DeepseekV3Config.from_pretrained(PRESETS / preset)
    assert config.model_type == "deepseek_v3" and config.num_hidden_layers > config.first_k_dense_replace
