"""Where a decode step's time goes: kernel time of one eager static-cache step (torch.profiler), against the
replay of the captured CUDA graph of the same step, for a preset on one GPU.

    python benchmarks/profile_decode.py --preset deepseek-v3-lite --context 1024 --batch 1
"""

import argparse
import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import StaticCache

from modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM

PRESETS = Path(__file__).resolve().parent.parent / "configuration"


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="deepseek-v3-lite")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    config = DeepseekV3Config(**json.loads((PRESETS / f"{args.preset}.json").read_text()))
    with torch.device("cuda"):
        model = DeepseekV3ForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    B, C = args.batch, args.context
    cache = StaticCache(config=config, max_cache_len=C + 64)
    mask = torch.ones(B, C, dtype=torch.long, device="cuda")
    ids = torch.randint(2, config.vocab_size, (B, C), device="cuda")
    token = model(ids, attention_mask=mask, past_key_values=cache).logits[:, -1:].argmax(-1)

    def step(graph: bool):
        nonlocal mask, token
        model.config.cuda_graph_decode = graph
        mask = torch.cat([mask, mask[:, -1:]], dim=1)
        token = model(token, attention_mask=mask, past_key_values=cache).logits[:, -1:].argmax(-1)

    for _ in range(3):
        step(False)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        step(False)
        torch.cuda.synchronize()
    events = prof.key_averages()
    cuda_total = sum(e.self_device_time_total for e in events) / 1e3
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"eager static step: {cuda_total:.2f} ms of kernel time in {kernels} kernels "
          f"(decode_kernels={config.decode_kernels})")
    print(events.table(sort_by="self_device_time_total", row_limit=args.top, max_name_column_width=60))

    for _ in range(3):
        step(True)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        step(True)
    end.record()
    end.synchronize()
    print(f"graph step (replay + input copies + argmax): {start.elapsed_time(end) / 20:.2f} ms")


if __name__ == "__main__":
    main()
