"""Training-step variants on one machine, interleaved: ours with `training_kernels` (the default), ours with the
training kernels but the eager RoPE, ours with the eager ops (`training_kernels=False`), and transformers' built-in,
same random bf16 weights (V3-Lite cut to 8 layers, no MTP), batch 1 x 4096 tokens, forward + backward. Prints the
median step time of 10 steps per run (two runs each), the host time to enqueue one step (no sync: when it is close
to the step time, the step is bound by the CPU, not the GPU), tokens/s and the ratio to the built-in.

    python benchmarks/bench_train_variants.py
"""
import json
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import timed  # noqa: E402
from bench_train import builtin_from_state  # noqa: E402

from modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402
from modeling_deepseek_v3 import modeling_deepseek_v3 as m  # noqa: E402

PRESET = Path(__file__).resolve().parent.parent / "configuration" / "deepseek-v3-lite.json"
TOKENS = 4096


def eager_rope(q_THr, k_Tr, cos_Tr, sin_Tr):
    """The eager rotations in place of the training RoPE kernel (same signature as `rotate_pairs_training`)."""
    return (m.apply_rotary_interleaved(q_THr, cos_Tr[:, None], sin_Tr[:, None]),
            m.apply_rotary_interleaved(k_Tr, cos_Tr, sin_Tr))


def step_of(model, ids):
    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def enqueue_ms(step) -> float:
    """Host milliseconds to enqueue one step (synchronized before and after, not inside)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    torch.cuda.synchronize()
    return seconds * 1e3


def measure(step) -> tuple[float, float]:
    return round(timed(step, 10, warmup=3) * 1e3, 1), round(sorted(enqueue_ms(step) for _ in range(3))[1], 1)


def main():
    fields = json.loads(PRESET.read_text())
    fields.update(num_hidden_layers=8, num_nextn_predict_layers=0)
    config = DeepseekV3Config(**fields)
    torch.manual_seed(0)
    with torch.device("cuda"):
        ours = DeepseekV3ForCausalLM._from_config(config, dtype=torch.bfloat16).train()
    ids = torch.randint(2, config.vocab_size, (1, TOKENS), device="cuda")
    fused_rope = m.rotate_pairs_training
    variants = {"tk": (True, fused_rope), "tk_eager_rope": (True, eager_rope), "eager_ops": (False, fused_rope)}
    rows = {}
    for _ in range(2):
        for name, (training_kernels, rope) in variants.items():
            ours.config.training_kernels = training_kernels
            m.rotate_pairs_training = rope
            rows.setdefault(name, []).append(measure(step_of(ours, ids)))
    m.rotate_pairs_training = fused_rope
    state = {k: v.to("cpu") for k, v in ours.state_dict().items()}
    del ours
    torch.cuda.empty_cache()
    theirs = builtin_from_state(config, state).train()
    rows["builtin"] = [measure(step_of(theirs, ids)) for _ in range(2)]

    print(torch.cuda.get_device_name(), torch.__version__, transformers.__version__)
    print("variant: [(step ms, CPU enqueue ms)] x 2 runs; tokens/s of the best run; ratio to built-in")
    best_builtin = min(ms for ms, _ in rows["builtin"])
    for name, runs in rows.items():
        best = min(ms for ms, _ in runs)
        print(f"{name:<16} {runs}  {TOKENS / best * 1e3:8.0f} tok/s  {best_builtin / best:.2f}x")


if __name__ == "__main__":
    main()
