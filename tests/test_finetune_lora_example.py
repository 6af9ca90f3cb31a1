"""examples/finetune_lora.py runs end to end, offline: LoRA with a merged official-layout save, and QLoRA."""

import json

import pytest
from _helpers import random_model, run_example, tiny_config
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from modeling_deepseek_v3.data import train_bpe_tokenizer

pytest.importorskip("peft", reason="peft is a dev dependency (pip install -e '.[dev]')")

# bitsandbytes 0.50's CPU 4-bit kernels need in_features % 64 == 0 and out_features % 32 == 0 (test_quantization.py).
QUANTIZABLE = dict(moe_intermediate_size=64, q_lora_rank=64, kv_lora_rank=64, qk_rope_head_dim=32)


@pytest.fixture(scope="module")
def base_and_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_example")
    words = "each token goes to a few routed experts while the shared expert sees every token".split()
    corpus = root / "corpus"
    corpus.mkdir()
    documents = []
    for i in range(4):
        text = "\n".join(" ".join(words[(i * 5 + j * 3 + k) % len(words)] for k in range(10)) for j in range(30))
        (corpus / f"notes{i}.txt").write_text(text)
        documents.append(text)
    tokenizer = train_bpe_tokenizer(documents, 300, show_progress=False)
    model = random_model(tiny_config(vocab_size=300, eos_token_id=tokenizer.eos_token_id,
                                     bos_token_id=tokenizer.bos_token_id, **QUANTIZABLE), seed=4)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    return root / "base", corpus


def common_args(corpus, output):
    return ["--train-files", corpus, "--validation-fraction", "0", "--block-size", "32", "--batch-size", "4",
            "--max-steps", "4", "--logging-steps", "1", "--max-eval-blocks", "0", "--lr", "5e-3",
            "--output-dir", output]


def test_lora_on_all_targets_saves_the_adapter_and_a_merged_official_checkpoint(base_and_corpus, tmp_path):
    base, corpus = base_and_corpus
    stdout = run_example("finetune_lora.py", "--model", base, "--targets", "all", "--rank", "4", "--merge",
                               "--gradient-checkpointing", *common_args(corpus, tmp_path))
    assert "trainable" in stdout and "tokens/s" in stdout
    adapter_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "experts" in adapter_config["target_modules"]
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as handle:
        assert any(key.endswith("mlp.experts.lora_gate_up_A") for key in handle.keys())
    history = json.loads((tmp_path / "log_history.json").read_text())
    assert [entry["step"] for entry in history if "loss" in entry] == [1, 2, 3, 4]

    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in keys and not any("lora" in key for key in keys)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    original = AutoModelForCausalLM.from_pretrained(base)
    assert not merged.model.layers[1].mlp.experts.down_proj.equal(original.model.layers[1].mlp.experts.down_proj)


def test_qlora_trains_a_4bit_base_and_saves_the_adapter(base_and_corpus, tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is a dev dependency (pip install -e '.[dev]')")
    base, corpus = base_and_corpus
    stdout = run_example("finetune_lora.py", "--model", base, "--qlora", "--targets", "all", "--rank", "4",
                               "--gradient-checkpointing", *common_args(corpus, tmp_path))
    assert "(4-bit NF4)" in stdout
    assert (tmp_path / "adapter_model.safetensors").exists()
    history = json.loads((tmp_path / "log_history.json").read_text())
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 4 and all(loss == loss for loss in losses)
