"""examples/pretrain.py, finetune.py and evaluate.py run end to end, offline, on a corpus the test writes."""

import json
import math

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import modeling_deepseek_v3
from _helpers import run_example


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    words = "each token goes to a few routed experts while the shared expert sees every token".split()
    for i in range(6):
        lines = [" ".join(words[(i * 7 + j * 3 + k) % len(words)] for k in range(10)) for j in range(30)]
        (root / f"notes{i}.txt").write_text("\n".join(lines))
    return root


@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory):
    output = tmp_path_factory.mktemp("pretrained")
    stdout = run_example(
        "pretrain.py", "--train-files", corpus, "--validation-fraction", "0.2", "--vocab-size", "300",
        "--block-size", "32", "--batch-size", "4", "--max-steps", "10", "--logging-steps", "2",
        "--max-eval-blocks", "4", "--output-dir", output,
    )
    return output, stdout


def test_pretrain_saves_a_loadable_model_tokenizer_and_log_history(pretrained):
    output, stdout = pretrained
    model = AutoModelForCausalLM.from_pretrained(output)
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert isinstance(model, modeling_deepseek_v3.DeepseekV3ForCausalLM)
    assert len(tokenizer) <= model.config.vocab_size == 300
    assert model.config.eos_token_id == tokenizer.eos_token_id

    history = json.loads((output / "log_history.json").read_text())
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) >= 5 and all(math.isfinite(loss) for loss in losses)
    assert any("eval_loss" in entry for entry in history)
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["steps"] == 10 and summary["tokens"] == 10 * 4 * 32
    assert summary["tokens_per_s"] == pytest.approx(summary["tokens"] / summary["seconds"])
    assert max(entry.get("step", 0) for entry in history) == 10
    assert "tokens/s" in stdout.splitlines()[-1]


def test_finetune_continues_from_a_checkpoint_with_mtp_off(pretrained, corpus, tmp_path):
    # --cuda-graph-step: DeepseekV3Trainer's graphed step, in its eager form on the CPU.
    source, _ = pretrained
    run_example("finetune.py", "--model", source, "--train-files", corpus, "--block-size", "32", "--batch-size", "4",
                "--max-steps", "3", "--logging-steps", "1", "--max-eval-blocks", "0", "--no-mtp", "--cuda-graph-step",
                "--output-dir", tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.mtp_loss_weight == 0.0
    history = json.loads((tmp_path / "log_history.json").read_text())
    assert [entry["step"] for entry in history if "loss" in entry] == [1, 2, 3]
    assert all("mtp_loss" not in entry for entry in history)
    assert AutoTokenizer.from_pretrained(tmp_path).get_vocab() == AutoTokenizer.from_pretrained(source).get_vocab()


def test_evaluate_prints_a_finite_perplexity_and_expert_load(pretrained, corpus, tmp_path):
    source, _ = pretrained
    stdout = run_example("evaluate.py", "--model", source, "--files", corpus, "--block-size", "32",
                         "--batch-size", "4", "--max-blocks", "6", "--json", tmp_path / "eval.json")
    perplexity = float(next(line.split()[1] for line in stdout.splitlines() if line.startswith("perplexity")))
    assert math.isfinite(perplexity) and 1.0 < perplexity < 300  # below uniform over the 300-token vocabulary

    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["blocks"] == 6 and results["predictions"] == 6 * 31
    assert results["perplexity"] == pytest.approx(perplexity, rel=1e-3)
    assert results["expert_load"]["max_over_mean_load"] >= 1.0
    assert "layer_1/max_over_mean_load" in results["expert_load"]
