"""Where a training step's time goes: the CUDA kernels of one forward + backward (torch.profiler), for a preset on
one GPU, ours or transformers' built-in, grouped by kernel name. `--prefill` profiles an inference prefill of the
same tokens instead (eval, no autograd, no cache, logits of the last position only).

    python benchmarks/profile_train.py --preset deepseek-v3-lite --layers 8 --seq 4096 [--builtin]
    python benchmarks/profile_train.py --preset deepseek-v3-lite --layers 27 --seq 32768 --prefill [--builtin]
"""

import argparse
import json
from pathlib import Path

import torch
import transformers
from torch.profiler import ProfilerActivity, profile

from modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM

PRESETS = Path(__file__).resolve().parent.parent / "configuration"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="deepseek-v3-lite")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--builtin", action="store_true", help="profile transformers' built-in instead")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--prefill", action="store_true", help="profile an inference prefill instead")
    parser.add_argument("--training-kernels", action=argparse.BooleanOptionalAction, default=True,
                        help="ours with config.training_kernels (the default)")
    args = parser.parse_args()
    fields = json.loads((PRESETS / f"{args.preset}.json").read_text())
    fields.update(num_hidden_layers=args.layers, num_nextn_predict_layers=0)
    config = DeepseekV3Config(**fields, training_kernels=args.training_kernels)
    model_class = DeepseekV3ForCausalLM
    if args.builtin:
        config, model_class = transformers.DeepseekV3Config.from_dict(config.to_dict()), transformers.DeepseekV3ForCausalLM
    with torch.device("cuda"):
        model = model_class._from_config(config, dtype=torch.bfloat16).train(not args.prefill)
    ids = torch.randint(2, config.vocab_size, (1, args.seq), device="cuda")

    def step():
        if args.prefill:
            with torch.no_grad():
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
            return
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time for e in kernels) / 1e3
    print(f"{'ours' if not args.builtin else 'built-in'}: {len(kernels)} kernels, {total:.1f} ms of kernel time")
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=args.top, max_name_column_width=90))


if __name__ == "__main__":
    main()
