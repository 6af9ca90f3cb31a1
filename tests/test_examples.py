"""The README's run command works offline."""

import subprocess
import sys

from _helpers import REPO


def test_generate_example_builds_saves_reloads_and_generates(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "generate.py"), "--max-new-tokens", "6", "--save-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "config.json").exists() and (tmp_path / "modeling_deepseek_v3.py").exists()
    assert "loaded modeling_deepseek_v3.modeling_deepseek_v3.DeepseekV3ForCausalLM" in result.stdout
    greedy = [line for line in result.stdout.splitlines() if line.startswith("[greedy] ")]
    assert len(greedy[0].split()) == 1 + 6  # six token ids after the tag
    assert "[sampled]" in result.stdout
