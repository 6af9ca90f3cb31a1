"""Batch-1 decode with and without the Triton decode kernels (`config.decode_kernels`), our model only.

Builds the preset with random bf16 weights on the GPU and, for `decode_kernels` False (the eager reference ops)
and True, measures:

- ms per token of a greedy decode loop on a static cache after a prefill of C tokens (the steps replay the
  captured CUDA graph), for each `--context`;
- kernels per decode step: CUDA kernels (and copies) of one eager static-cache step, from torch.profiler;
- peak GPU memory of the prefill + decode of each context beyond the weights and the latent cache;
- greedy `generate()` with a static cache: ms per token (difference of two lengths) and the first call's wall
  time (warm-up: Triton compilation and the graph capture);
- how many greedy tokens agree with the eager static-cache run before the first difference, with the kernels and
  with the eager forward on a dynamic cache (other GEMM shapes: the bf16 rounding noise of random weights, whose
  logits are nearly tied), and the floor (active weight bytes over the measured
  copy bandwidth, as in bench_generate.py).

    python benchmarks/bench_decode.py --preset deepseek-v3-lite --context 1024 32768
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from bench_generate import active_bytes_per_token, copy_bandwidth, timed
from torch.profiler import ProfilerActivity, profile
from transformers import StaticCache

from modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM

PRESETS = Path(__file__).resolve().parent.parent / "configuration"


@torch.no_grad()
def decode_ms(model, context, steps: int, repeats: int) -> tuple[float, float]:
    """Median ms/token of `steps` greedy steps after a prefill of `context` [1, C], static cache (graph replay),
    and the peak GPU memory of the first prefill + decode beyond what was allocated before it (the weights) and
    the latent cache, in GiB."""
    cache = StaticCache(config=model.config, max_cache_len=context.shape[1] + steps + 1)

    def run():
        cache.reset()
        mask = torch.ones_like(context)
        token = model(context, attention_mask=mask, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            mask = torch.cat([mask, mask[:, -1:]], dim=1)
            token = model(token, attention_mask=mask, past_key_values=cache).logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps * 1e3

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    cache_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    peak_extra = (torch.cuda.max_memory_allocated() - base - cache_bytes) / 2**30
    return statistics.median(run() for _ in range(repeats)), peak_extra


@torch.no_grad()
def kernels_per_step(model, context) -> int:
    """CUDA kernels and copies launched by one eager static-cache decode step."""
    graph_setting = model.config.cuda_graph_decode
    model.config.cuda_graph_decode = False
    cache = StaticCache(config=model.config, max_cache_len=context.shape[1] + 4)
    mask = torch.ones_like(context)
    token = model(context, attention_mask=mask, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
    mask = torch.cat([mask, mask[:, -1:]], dim=1)
    model(token, attention_mask=mask, past_key_values=cache)  # warm-up
    mask = torch.cat([mask, mask[:, -1:]], dim=1)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(token, attention_mask=mask, past_key_values=cache)
        torch.cuda.synchronize()
    model.config.cuda_graph_decode = graph_setting
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def same_prefix(a: torch.Tensor, b: torch.Tensor, start: int) -> int:
    """How many generated tokens (after `start`) of two [1, T] sequences agree before the first difference."""
    differ = (a[0, start:] != b[0, start:]).nonzero()
    return int(differ[0, 0]) if len(differ) else a.shape[1] - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="deepseek-v3-lite")
    parser.add_argument("--context", type=int, nargs="+", default=[1024])
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()

    config = DeepseekV3Config(**json.loads((PRESETS / f"{args.preset}.json").read_text()))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = DeepseekV3ForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    floor_ms = active_bytes_per_token(config, model) / copy_bandwidth() * 1e3
    generator = torch.Generator(device="cuda").manual_seed(0)
    contexts = {c: torch.randint(2, config.vocab_size, (1, c), device="cuda", generator=generator) for c in args.context}
    prompt = contexts[args.context[0]]

    def generate(n):
        return lambda: model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, pad_token_id=0, cache_implementation="static")

    rows, tokens = {}, {}
    for setting in (False, True):
        config.decode_kernels = setting
        model.__dict__.pop("_generate_static_cache", None)  # a fresh cache: the first call captures again
        model.__dict__.pop("_decode_graphs", None)
        row = rows[setting] = {}
        start = time.perf_counter()
        tokens[setting] = generate(args.decode_steps)()
        torch.cuda.synchronize()
        row["generate_first_call_s"] = time.perf_counter() - start
        long, short = timed(generate(args.decode_steps + 1), args.repeats), timed(generate(1), args.repeats)
        row["generate_ms_per_token"] = (long - short) / args.decode_steps * 1e3
        for c, context in contexts.items():
            row[f"decode_c{c}_ms"], row[f"peak_extra_c{c}_gib"] = decode_ms(model, context, args.decode_steps, args.repeats)
        row["kernels_per_step"] = kernels_per_step(model, prompt)

    print(f"\n{torch.cuda.get_device_name()}; torch {torch.__version__}; preset {args.preset} "
          f"({config.num_hidden_layers} layers), bf16, random weights, batch 1; floor {floor_ms:.2f} ms/token")
    print(f"{'workload':<44} {'eager ops':>10} {'kernels':>10} {'ratio':>7}")
    for key, label in [(f"decode_c{c}_ms", f"decode ctx {c}, static cache (graph), ms/tok") for c in args.context] + [
        ("generate_ms_per_token", f"generate() ctx {args.context[0]}, ms/tok"),
        ("generate_first_call_s", "generate() first call (warm-up), s"),
        ("kernels_per_step", "CUDA kernels per eager decode step"),
    ] + [(f"peak_extra_c{c}_gib", f"peak GiB beyond weights + cache, ctx {c}") for c in args.context]:
        off, on = rows[False][key], rows[True][key]
        print(f"{label:<44} {off:10.2f} {on:10.2f} {off / on:6.2f}x")
    config.decode_kernels = False
    dynamic = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.decode_steps,
                             min_new_tokens=args.decode_steps, do_sample=False, pad_token_id=0)
    print(f"greedy tokens equal to the eager static-cache run's, of {args.decode_steps}: with the kernels "
          f"{same_prefix(tokens[True], tokens[False], prompt.shape[1])}, eager on a dynamic cache "
          f"{same_prefix(dynamic, tokens[False], prompt.shape[1])}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": {str(k): v for k, v in rows.items()}, "floor_ms": floor_ms,
                                               "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
