"""Tile sweep of the decode-sized MoE Triton kernels (moe_kernels.py) at a preset's shapes, on one GPU.

Each configuration runs the routed experts of every MoE layer of the preset (separate weight tensors per layer, as
in the model, so that L2 does not hold them between layers) for one token, K experts each, inside a CUDA graph,
and reports microseconds per layer and the bandwidth achieved on the chosen experts' bytes, against the
device-to-device copy bandwidth measured here.

    python benchmarks/tune_moe_kernels.py --preset deepseek-v3-lite
"""

import argparse
import itertools
import json
import statistics
from pathlib import Path

import torch

from modeling_deepseek_v3.moe_kernels import DOWN_TILE, GATE_UP_TILE, expert_down, expert_gate_up_act

PRESETS = Path(__file__).resolve().parent.parent / "configuration"


def copy_bandwidth(nbytes=2 * 1024**3) -> float:
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / statistics.median(times)


def graph_time(fn, repeats=10) -> float:
    """Seconds per call of `fn` replayed as a CUDA graph (median)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="deepseek-v3-lite")
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--json", help="write every configuration's figures here")
    args = parser.parse_args()
    config = json.loads((PRESETS / f"{args.preset}.json").read_text())
    E, D, I, K = config["n_routed_experts"], config["hidden_size"], config["moe_intermediate_size"], config["num_experts_per_tok"]
    layers = config["num_hidden_layers"] - config.get("first_k_dense_replace", 0)
    T = args.tokens
    torch.manual_seed(0)
    gate_up = [torch.randn(E, 2 * I, D, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(layers)]
    down = [torch.randn(E, D, I, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(layers)]
    x = torch.randn(T, D, dtype=torch.bfloat16, device="cuda")
    experts = [torch.randperm(E, device="cuda")[: T * K].view(T, K).reshape(-1) % E for _ in range(layers)]
    h = torch.randn(T * K, I, dtype=torch.bfloat16, device="cuda")
    bandwidth = copy_bandwidth()
    distinct = len(set(experts[0].tolist()))
    gate_up_bytes, down_bytes = distinct * 2 * I * D * 2, distinct * D * I * 2
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.preset}: {layers} MoE layers, E={E} D={D} "
          f"I={I} K={K}, {T} token(s); copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    results = {"gate_up": [], "down": []}

    for block_i, block_d, warps in itertools.product([4, 8, 16, 32], [128, 256, 512], [2, 4, 8]):
        tile = (block_i, block_d, warps)
        try:
            seconds = graph_time(lambda: [expert_gate_up_act(x, gate_up[i], experts[i], K, tile) for i in range(layers)])
        except Exception as error:  # a tile Triton cannot build (registers, shared memory)
            print(f"gate_up {tile}: {type(error).__name__}")
            continue
        per_layer = seconds / layers
        results["gate_up"].append({"tile": tile, "us": per_layer * 1e6, "TBps": gate_up_bytes / per_layer / 1e12})
    for block_d, block_i, warps in itertools.product([4, 8, 16, 32], [128, 256, 512], [2, 4, 8]):
        tile = (block_d, block_i, warps)
        try:
            seconds = graph_time(lambda: [expert_down(h, down[i], experts[i], tile) for i in range(layers)])
        except Exception as error:
            print(f"down {tile}: {type(error).__name__}")
            continue
        per_layer = seconds / layers
        results["down"].append({"tile": tile, "us": per_layer * 1e6, "TBps": down_bytes / per_layer / 1e12})

    for name, current in (("gate_up", GATE_UP_TILE), ("down", DOWN_TILE)):
        rows = sorted(results[name], key=lambda r: r["us"])
        now = next((r for r in rows if tuple(r["tile"]) == tuple(current)), None)
        print(f"\n{name}: current tile {current}: "
              + (f"{now['us']:.1f} us/layer, {now['TBps']:.2f} TB/s" if now else "not measured"))
        for r in rows[:8]:
            print(f"  {str(tuple(r['tile'])):>18}  {r['us']:7.1f} us/layer  {r['TBps']:.2f} TB/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"bandwidth": bandwidth, **results}, indent=1))


if __name__ == "__main__":
    main()
