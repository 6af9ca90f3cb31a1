"""Prefill and decode speed: this package's DeepseekV3ForCausalLM against transformers' built-in, same weights.

Builds the preset (default: the V3-Lite shape) with random bf16 weights on the GPU, measures our model, moves its
weights to host memory, builds transformers' built-in `DeepseekV3ForCausalLM` from the same state dict, measures
it, and prints both with the ratio and the hardware floor. Rows:

- prefill T tokens, batch 1: tokens/s (CUDA events, median of `--repeats`) and the peak memory beyond the weights;
- decode batch B at context C (batch 1 at each `--context`, larger batches at `--batch-context`): ms per generated
  token in a greedy loop over `model(...)` with a cache (the loop `generate()` runs), after a prefill of C tokens,
  with the default dynamic cache and with a static cache (ours then replays its captured CUDA graph; the built-in
  runs its eager forward: no torch.compile), and the weight bandwidth of the static rows: the bytes a step reads
  (the routed experts its tokens chose, counted in one eager step of ours) over the step time;
- `generate()` end to end, batch 1, greedy, static cache: per-token time from the difference of two lengths,
  `--generate-tokens` + 1 and 1 new tokens, each the median of `--generate-repeats` calls (a call's host work before
  its first token varies by several ms between calls: short calls and few repeats make this row noisy); ours also
  with a logits processor, `min_new_tokens`, and in transformers' own sampling loop instead of
  `sample_on_decode_graph`; the 1-token call's time (the prompt's prefill and generate()'s set-up: the time to the
  first token); and the wall time of the first call (warm-up: our graph capture);
- the floor: bytes of the active parameters per token (attention, dense/shared MLPs, K routed experts per MoE
  layer, the LM head) read once, over the device-to-device copy bandwidth measured here.

    python benchmarks/bench_generate.py --preset deepseek-v3-lite --prefill 4096 32768 --context 1024 32768 \
        --batch 1 32 --batch-context 2048
"""

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import StaticCache

from modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM
from modeling_deepseek_v3.modeling_deepseek_v3 import CACHE_FIELD, DecodeGraph

PRESETS = Path(__file__).resolve().parent.parent / "configuration"


def copy_bandwidth(nbytes=2 * 1024**3) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    return 2 * nbytes / statistics.median(times)


def active_bytes_per_token(config: DeepseekV3Config, model) -> int:
    """Parameter bytes one decode token must read: everything except the routed experts not chosen."""
    total = 0
    for name, p in model.named_parameters():
        if name.startswith(f"model.layers.{config.num_hidden_layers}") or "embed_tokens" in name:
            continue  # MTP layer (unused in decode), embedding (one row gathered)
        nbytes = p.numel() * p.element_size()
        if ".mlp.experts." in name:
            nbytes = nbytes * config.num_experts_per_tok // config.n_routed_experts
        total += nbytes
    return total


def weight_bytes_read(model, config: DeepseekV3Config, step) -> int:
    """Parameter bytes one decode step reads at its batch size: every parameter a decode step uses (not the MTP
    layer; one embedding row per token, left out) except the routed experts, plus the routed experts the step's
    tokens actually chose, counted by running `step()` once eagerly with `tracking_expert_load()`."""
    routers = model.expert_routers()
    for router in routers:
        router.expert_load.zero_()
    graph_setting, model.config.cuda_graph_decode = model.config.cuda_graph_decode, False  # the graph does not count
    with model.tracking_expert_load():
        step()
    model.config.cuda_graph_decode = graph_setting
    touched = sum(int((router.expert_load > 0).sum()) for router in routers)
    for router in routers:
        router.expert_load.zero_()
    dense, experts = 0, 0
    for name, p in model.named_parameters():
        if name.startswith(f"model.layers.{config.num_hidden_layers}") or "embed_tokens" in name:
            continue
        if ".mlp.experts." in name:
            experts += p.numel() * p.element_size()
        else:
            dense += p.numel() * p.element_size()
    moe_layers = sum(1 for i in range(config.num_hidden_layers) if config.is_moe_layer(i))
    return dense + touched * experts // (moe_layers * config.n_routed_experts)


def decode_rows(args) -> list[tuple[int, int]]:
    """(context, batch) of the decode rows: batch 1 at every --context, the other --batch sizes at --batch-context."""
    return [(c, 1) for c in args.context] + [(args.batch_context, b) for b in args.batch if b != 1]


def timed(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds of `fn()` over `repeats` runs after `warmup` untimed ones, CUDA-event timed."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


@torch.no_grad()
def measure(model, args, vocab) -> dict:
    generator = torch.Generator(device="cuda").manual_seed(0)
    results = {}
    for length in args.prefill:
        prompt = torch.randint(2, vocab, (1, length), device="cuda", generator=generator)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        seconds = timed(lambda: model(prompt, use_cache=False, logits_to_keep=1), args.repeats)
        results[f"prefill_{length}"] = {"tokens_per_s": length / seconds, "ms": seconds * 1e3,
                                        "peak_extra_gib": (torch.cuda.max_memory_allocated() - base) / 2**30}
        del prompt
    torch.cuda.reset_peak_memory_stats()

    # End to end: greedy generate() with a static cache, batch 1, per-token time from two lengths.
    prompt = torch.randint(2, vocab, (1, args.context[0]), device="cuda", generator=generator)

    def generate(n, **extra):
        def run():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                                 pad_token_id=0, cache_implementation="static", **extra)
            if out.shape[1] != prompt.shape[1] + n:  # the per-token time assumes every call runs to the limit
                raise RuntimeError(f"generate() stopped after {out.shape[1] - prompt.shape[1]} of {n} tokens "
                                   "(end-of-sequence id): pick another prompt seed")
        return run

    def ms_per_token(**extra) -> tuple[float, float]:
        # A call of generate_tokens + 1 tokens against a 1-token call (the prefill and the first token cancel out)
        # -> (ms a token, ms of the 1-token call: the prefill and generate()'s own set-up).
        n = args.generate_tokens + 1
        long, short = timed(generate(n, **extra), args.generate_repeats), timed(generate(1), args.generate_repeats)
        return (long - short) / args.generate_tokens * 1e3, short * 1e3

    start = time.perf_counter()
    generate(2)()
    torch.cuda.synchronize()
    results["generate_first_call_s"] = time.perf_counter() - start
    captures = getattr(DecodeGraph, "captures", 0)
    per_token, first_token = ms_per_token()
    results["generate_b1_static"] = {"ms_per_token": per_token, "first_token_ms": first_token,
                                     "graph_captures": getattr(DecodeGraph, "captures", 0) - captures}
    if hasattr(type(model), "_can_sample_on_graph"):
        # Ours with a logits processor (min_new_tokens: the processor, argmax and criteria run between replays),
        # and in transformers' own loop (a host sync per token; each step still replays the graph).
        results["generate_b1_static_processor"] = {"ms_per_token": ms_per_token(min_new_tokens=args.generate_tokens + 1)[0]}
        model._can_sample_on_graph = lambda *args: False
        results["generate_b1_static_transformers_loop"] = {"ms_per_token": ms_per_token()[0]}
        del model._can_sample_on_graph
    for context_len, batch in decode_rows(args):
        context = torch.randint(2, vocab, (batch, context_len), device="cuda", generator=generator)
        for cache_kind in ("dynamic", "static"):
            # One static cache for the warm-up and the timed runs (reset in between), as generate() reuses its
            # cache: our CUDA graph is captured once, in the warm-up.
            static = StaticCache(config=model.config, max_cache_len=context_len + args.decode_steps + 1)

            def decode(static=static):  # bound now: the name is deleted after the row
                cache = None
                if cache_kind == "static":
                    static.reset()
                    cache = static
                mask = torch.ones(batch, context_len, dtype=torch.long, device="cuda")
                out = model(context, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
                cache, token = getattr(out, CACHE_FIELD), out.logits[:, -1].argmax(-1, keepdim=True)
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(args.decode_steps):
                    mask = torch.cat([mask, mask[:, -1:]], dim=1)
                    out = model(token, attention_mask=mask, past_key_values=cache, use_cache=True)
                    token = out.logits[:, -1].argmax(-1, keepdim=True)
                torch.cuda.synchronize()
                return (time.perf_counter() - start) / args.decode_steps

            decode()
            step = statistics.median(decode() for _ in range(args.repeats))
            results[f"decode_b{batch}_c{context_len}_{cache_kind}"] = {"ms_per_token": step * 1e3, "tokens_per_s": batch / step}
            del static
        if hasattr(model, "expert_routers"):  # ours: the weight bytes one decode step at this batch reads
            mask = torch.ones(batch, context_len + 1, dtype=torch.long, device="cuda")
            out = model(context, attention_mask=mask[:, :-1], use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            results[f"weight_bytes_b{batch}_c{context_len}"] = weight_bytes_read(
                model, model.config, lambda: model(token, attention_mask=mask, past_key_values=getattr(out, CACHE_FIELD))
            )
            del out

    results["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="deepseek-v3-lite")
    parser.add_argument("--layers", type=int, default=None, help="cut the preset to this many layers")
    parser.add_argument("--prefill", type=int, nargs="+", default=[4096])
    parser.add_argument("--context", type=int, nargs="+", default=[1024],
                        help="decode contexts of the batch-1 rows (the first also for generate())")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--batch-context", type=int, default=2048, help="context of the rows with batch > 1")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--generate-tokens", type=int, default=64, help="new tokens of the long generate() call")
    parser.add_argument("--generate-repeats", type=int, default=5, help="calls per generate() length (median)")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()

    fields = json.loads((PRESETS / f"{args.preset}.json").read_text())
    if args.layers:
        fields["num_hidden_layers"] = args.layers
    config = DeepseekV3Config(**fields)
    torch.manual_seed(0)
    with torch.device("cuda"):
        ours = DeepseekV3ForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    floor_bytes = active_bytes_per_token(config, ours)
    bandwidth = copy_bandwidth()
    rows = {"ours": measure(ours, args, config.vocab_size)}
    state = {k: v.to("cpu") for k, v in ours.state_dict().items()}
    del ours
    gc.collect()
    torch.cuda.empty_cache()

    builtin_config = transformers.DeepseekV3Config.from_dict(config.to_dict())
    with torch.device("cuda"):
        theirs = transformers.DeepseekV3ForCausalLM._from_config(builtin_config, dtype=torch.bfloat16).eval()
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert not missing, f"built-in lacks weights: {missing[:5]}"
    assert all(k.startswith(f"model.layers.{config.num_hidden_layers}.") for k in unexpected), unexpected[:5]
    del state
    rows["transformers"] = measure(theirs, args, config.vocab_size)

    device = torch.cuda.get_device_name()
    print(f"\n{device}; torch {torch.__version__}; transformers {transformers.__version__}; preset {args.preset}"
          f" ({config.num_hidden_layers} layers), bf16, random weights")
    print(f"measured copy bandwidth {bandwidth / 1e12:.2f} TB/s; active bytes per decode step {floor_bytes / 1e9:.2f} GB"
          f" -> floor {floor_bytes / bandwidth * 1e3:.2f} ms/token at batch 1")
    print(f"{'workload':<40} {'ours':>12} {'transformers':>14} {'ratio':>8}")
    o, t = rows["ours"], rows["transformers"]
    for length in args.prefill:
        key = f"prefill_{length}"
        print(f"{f'prefill {length} tok, tokens/s':<40} {o[key]['tokens_per_s']:12.0f} {t[key]['tokens_per_s']:14.0f} "
              f"{o[key]['tokens_per_s'] / t[key]['tokens_per_s']:7.2f}x")
        print(f"{f'prefill {length} tok, peak extra GiB':<40} {o[key]['peak_extra_gib']:12.2f} {t[key]['peak_extra_gib']:14.2f}")
    for context_len, batch in decode_rows(args):
        for cache_kind in ("dynamic", "static"):
            key = f"decode_b{batch}_c{context_len}_{cache_kind}"
            label = f"decode b{batch} ctx {context_len} {cache_kind}, ms/tok"
            print(f"{label:<40} {o[key]['ms_per_token']:12.2f} {t[key]['ms_per_token']:14.2f} "
                  f"{t[key]['ms_per_token'] / o[key]['ms_per_token']:7.2f}x")
        # Weight bandwidth of the static rows: the bytes our step reads (experts counted in a step of ours; the
        # built-in routes the same tokens on the same weights) over each step's time.
        nbytes = o[f"weight_bytes_b{batch}_c{context_len}"]
        key = f"decode_b{batch}_c{context_len}_static"
        ours_bw, theirs_bw = (nbytes / (r[key]["ms_per_token"] / 1e3) / 1e9 for r in (o, t))
        label = f"  weights {nbytes / 1e9:.1f} GB/step, GB/s"
        print(f"{label:<40} {ours_bw:12.0f} {theirs_bw:14.0f}   ({ours_bw * 1e9 / bandwidth:.0%} of copy bandwidth)")
    label = f"generate() b1 ctx {args.context[0]} static, ms/tok"
    print(f"{label:<40} {o['generate_b1_static']['ms_per_token']:12.2f} {t['generate_b1_static']['ms_per_token']:14.2f} "
          f"{t['generate_b1_static']['ms_per_token'] / o['generate_b1_static']['ms_per_token']:7.2f}x")
    if "generate_b1_static_transformers_loop" in o:
        label = "  ours with min_new_tokens, ms/tok"
        print(f"{label:<40} {o['generate_b1_static_processor']['ms_per_token']:12.2f}")
        label = "  ours in transformers' loop, ms/tok"
        print(f"{label:<40} {o['generate_b1_static_transformers_loop']['ms_per_token']:12.2f}")
    label = f"generate() 1 token after {args.context[0]}, ms"
    ours_first, theirs_first = (r["generate_b1_static"]["first_token_ms"] for r in (o, t))
    print(f"{label:<40} {ours_first:12.2f} {theirs_first:14.2f} {theirs_first / ours_first:7.2f}x")
    print(f"ours: {o['generate_b1_static']['graph_captures']} graph captures during the timed generate() calls")
    print(f"{'generate() first call (warm-up), s':<40} {o['generate_first_call_s']:12.2f} {t['generate_first_call_s']:14.2f}")
    if 1 in args.batch:
        best = min(o[f"decode_b1_c{args.context[0]}_static"]["ms_per_token"], o["generate_b1_static"]["ms_per_token"])
        print(f"ours at batch 1, ctx {args.context[0]}: {best:.2f} ms/token = {best / (floor_bytes / bandwidth * 1e3):.2f}x the floor")
    print(f"{'peak GPU memory in decode rows, GiB':<40} {o['peak_gib']:12.2f} {t['peak_gib']:14.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "rows": rows, "bandwidth": bandwidth,
                                               "floor_bytes": floor_bytes, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
