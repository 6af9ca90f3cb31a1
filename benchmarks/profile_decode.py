"""Where a decode step's time goes: kernel time of one eager static-cache step (torch.profiler), against the
replay of the captured CUDA graph of the same step, for a preset on one GPU.

    python benchmarks/profile_decode.py --preset deepseek-v3-lite --context 1024 --batch 1

With `--timeline`: the kernels of replays of the captured greedy step instead (`DecodeGraph`, as generate() runs
it). With programmatic dependent launch the kernels overlap, so their durations do not add up to the step; each
kernel's share of the step is how far it moves the latest end of the kernels before it (its critical-path
increment), summed per kernel name over the profiled replays.

    python benchmarks/profile_decode.py --preset deepseek-v3-lite --context 1024 --timeline
"""

import argparse
import collections
import json
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import StaticCache

from modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM

from ab_decode_step import greedy_graph, replay_ms  # (benchmarks/, the script's folder)

PRESETS = Path(__file__).resolve().parent.parent / "configuration"


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="deepseek-v3-lite")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--timeline", action="store_true", help="the captured greedy step's critical path instead")
    parser.add_argument("--replays", type=int, default=3, help="replays profiled with --timeline")
    args = parser.parse_args()
    config = DeepseekV3Config(**json.loads((PRESETS / f"{args.preset}.json").read_text()))
    with torch.device("cuda"):
        model = DeepseekV3ForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    B, C = args.batch, args.context
    if args.timeline:
        return graph_timeline(model, config, B, C, args.replays, args.top)
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


@torch.no_grad()
def graph_timeline(model, config, B: int, C: int, replays: int, top: int) -> None:
    graph = greedy_graph(model, config, C, 64, batch=B)
    ms = replay_ms(graph, 20)
    print(f"captured greedy step, batch {B}, context {C}: {ms:.3f} ms a replay (no profiler)")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph._run()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        kernels = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("cat") == "kernel"]
    kernels.sort(key=lambda e: e["ts"])
    span = max(e["ts"] + e["dur"] for e in kernels) - kernels[0]["ts"]
    share, duration, calls = collections.defaultdict(float), collections.defaultdict(float), collections.Counter()
    latest_end = kernels[0]["ts"]
    for event in kernels:
        name = event["name"][:60]
        share[name] += max(0.0, event["ts"] + event["dur"] - latest_end)
        duration[name] += event["dur"]
        calls[name] += 1
        latest_end = max(latest_end, event["ts"] + event["dur"])
    print(f"{replays} replays under the profiler: {span / replays:.1f} us a replay, {len(kernels) // replays} kernels")
    print(f"{'kernel':60s} {'calls':>6s} {'us a call':>10s} {'share/call':>10s} {'share/step':>10s}")
    for name in sorted(share, key=lambda n: -share[n])[:top]:
        print(f"{name:60s} {calls[name] // replays:6d} {duration[name] / calls[name]:10.2f} "
              f"{share[name] / calls[name]:10.2f} {share[name] / replays:10.1f}")


if __name__ == "__main__":
    main()
