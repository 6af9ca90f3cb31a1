"""The README's run command works offline."""

from _helpers import run_example


def test_generate_example_builds_saves_reloads_and_generates(tmp_path):
    stdout = run_example("generate.py", "--max-new-tokens", "6", "--save-dir", tmp_path)
    assert (tmp_path / "config.json").exists() and (tmp_path / "modeling_deepseek_v3.py").exists()
    assert "loaded modeling_deepseek_v3.modeling_deepseek_v3.DeepseekV3ForCausalLM" in stdout
    greedy = [line for line in stdout.splitlines() if line.startswith("[greedy] ")]
    assert len(greedy[0].split()) == 1 + 6  # six token ids after the tag
    assert "[sampled]" in stdout
