"""Tile sweep of the decode matrix-vector kernels at a preset's shapes, batch 1, on one GPU.

Kernels: the routed and shared experts' gate/up and down (moe_kernels.py, K + S experts of one token), `linear_pair` /
`silu_gate_up` (decode_kernels.py) at every dense decode shape of the preset: q_a + kv_a, q_b, o_proj, the router,
the shared experts' gate/up and down; and the split-key absorbed attention (split kernel + combine) over a latent
cache of each `--context` (bytes: the cache read). Each case runs once per layer on separate weight tensors (as in the model,
so that L2 does not hold them from one call to the next), inside a CUDA graph; reported: microseconds per call and
the bandwidth achieved on the weight bytes read, against the device-to-device copy bandwidth measured here.

    python benchmarks/tune_decode_kernels.py --preset deepseek-v3-lite [--only moe|gemv|attention] [--context 1024 32768]
"""

import argparse
import itertools
import json
from pathlib import Path

import torch
from bench_generate import copy_bandwidth, timed

from modeling_deepseek_v3 import decode_kernels, moe_kernels

PRESETS = Path(__file__).resolve().parent.parent / "configuration"


def graph_time(fn, repeats=10) -> float:
    """Seconds per replay of `fn` captured as a CUDA graph (median)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return timed(graph.replay, repeats)


def sweep(name, run, nbytes, tiles, calls, current):
    """Time `run(tile)` (which makes `calls` kernel calls) for every tile; print the best few and the current."""
    rows = []
    for tile in tiles:
        try:
            seconds = graph_time(lambda: run(tile)) / calls
        except Exception as error:  # a tile Triton cannot build (registers, shared memory)
            print(f"{name} {tile}: {type(error).__name__}")
            continue
        rows.append({"tile": tile, "us": seconds * 1e6, "TBps": nbytes / seconds / 1e12})
    rows.sort(key=lambda r: r["us"])
    now = next((r for r in rows if tuple(r["tile"]) == tuple(current)), None)
    print(f"\n{name} ({nbytes / 1e6:.1f} MB a call): current {current}: "
          + (f"{now['us']:.1f} us, {now['TBps']:.2f} TB/s" if now else "not measured"))
    for r in rows[:5]:
        print(f"  {str(tuple(r['tile'])):>18}  {r['us']:7.1f} us  {r['TBps']:.2f} TB/s")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="deepseek-v3-lite")
    parser.add_argument("--only", choices=["moe", "gemv", "attention"])
    parser.add_argument("--context", type=int, nargs="+", default=[1024, 32768])
    parser.add_argument("--json", help="write every configuration's figures here")
    args = parser.parse_args()
    c = json.loads((PRESETS / f"{args.preset}.json").read_text())
    E, D, I, K = c["n_routed_experts"], c["hidden_size"], c["moe_intermediate_size"], c["num_experts_per_tok"]
    H, Q, L, R = c["num_attention_heads"], c["q_lora_rank"], c["kv_lora_rank"], c["qk_rope_head_dim"]
    N, V = c["qk_nope_head_dim"], c["v_head_dim"]
    shared = I * c["n_shared_experts"]
    layers = c["num_hidden_layers"] - c.get("first_k_dense_replace", 0)
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.preset}: {layers} MoE layers; copy "
          f"bandwidth {copy_bandwidth() / 1e12:.2f} TB/s")
    results = {}

    def weights(*shape):
        return [torch.randn(*shape, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(layers)]

    if args.only in (None, "moe"):
        # As the model runs them at decode: the K routed experts and the S expert-width parts of the shared experts
        # in the same two launches (K + S rows of one token).
        S = c["n_shared_experts"] or 0
        gate_up, down = weights(E, 2 * I, D), weights(E, D, I)
        shared_gate, shared_up = (weights(S * I, D), weights(S * I, D)) if S else ([None] * layers,) * 2
        shared_down = weights(D, S * I) if S else [None] * layers
        x = torch.randn(1, D, dtype=torch.bfloat16, device="cuda")
        h = torch.randn(K + S, I, dtype=torch.bfloat16, device="cuda")
        experts = [torch.randperm(E, device="cuda")[:K] for _ in range(layers)]
        tiles = list(itertools.product([2, 4, 8, 16], [512, 1024, 2048], [2, 4, 8]))
        # down: a row is I columns (1,408 for V3-Lite), so narrower steps and more rows per program are in the sweep.
        down_tiles = list(itertools.product([1, 2, 4, 8, 16, 32], [256, 512, 1024, 2048], [2, 4, 8]))
        results["moe_gate_up"] = sweep(
            f"routed + shared gate/up ({K} + {S} experts)",
            lambda t: [moe_kernels.expert_gate_up_act(x, gate_up[i], experts[i], K, t, shared_gate=shared_gate[i],
                                                      shared_up=shared_up[i]) for i in range(layers)],
            (K + S) * 2 * I * D * 2, tiles, layers, moe_kernels.GATE_UP_TILE)
        results["moe_down"] = sweep(
            f"routed + shared down ({K} + {S} experts)",
            lambda t: [moe_kernels.expert_down(h, down[i], experts[i], t, shared_down=shared_down[i])
                       for i in range(layers)],
            (K + S) * D * I * 2, down_tiles, layers, moe_kernels.DOWN_TILE)
        del gate_up, down, shared_gate, shared_up, shared_down

    if args.only in (None, "gemv"):
        tiles = list(itertools.product([1, 2, 4, 8], [512, 1024, 2048, 4096], [4, 8]))
        cases = {  # name: (w1 [N1, D_in], w2 [N2, D_in] or None, D_in, sigmoid)
            "q_a + kv_a": (Q, L + R, D, False),
            "q_b": (H * (N + R), None, Q, False),
            "o_proj": (D, None, H * V, False),
            "router": (E, None, D, True),
            "shared down": (D, None, shared, False),
        }
        for name, (n1, n2, d_in, sigmoid) in cases.items():
            w1, w2 = weights(n1, d_in), (weights(n2, d_in) if n2 else [None] * layers)
            x = torch.randn(1, d_in, dtype=torch.bfloat16, device="cuda")
            out_dtype = torch.float32 if sigmoid else None
            results[name] = sweep(
                name, lambda t: [decode_kernels.linear_pair(x, w1[i], w2[i], sigmoid, out_dtype, t) for i in range(layers)],
                (n1 + (n2 or 0)) * d_in * 2, tiles, layers, decode_kernels.GEMV_TILE)
            del w1, w2
        gate, up = weights(shared, D), weights(shared, D)
        x = torch.randn(1, D, dtype=torch.bfloat16, device="cuda")
        results["shared gate/up"] = sweep(
            "shared gate/up", lambda t: [decode_kernels.silu_gate_up(x, gate[i], up[i], t) for i in range(layers)],
            2 * shared * D * 2, tiles, layers, decode_kernels.GATE_UP_TILE)
    if args.only in (None, "attention"):
        keys = ("block_s", "warps", "stages", "programs", "max_splits")
        tiles = list(itertools.product([32, 64], [4, 8], [2, 3, 4], [132, 264, 528], [128, 256]))
        current = tuple(decode_kernels.ATTENTION_CONFIG[k] for k in keys)
        q = torch.randn(H, 1, L + R, dtype=torch.bfloat16, device="cuda")
        for context in args.context:
            S = context + 1
            c_kv, k_pe = weights(1, S, L), weights(1, S, R)
            bias = torch.zeros(1, S, dtype=torch.bfloat16, device="cuda")
            results[f"attention {context}"] = sweep(
                f"attention, {context} keys (split + combine)",
                lambda t: [decode_kernels.absorbed_decode_attention(
                    q[..., :L], q[..., L:], c_kv[i], k_pe[i], bias, 0.1, config=dict(zip(keys, t)))
                    for i in range(layers)],
                S * (L + R) * 2, tiles, layers, current)
            del c_kv, k_pe
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
