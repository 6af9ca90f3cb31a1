"""Loading the FP8 official layout across GPUs with `device_map`: equal greedy tokens, load time, per-GPU memory and
decode speed against the same checkpoint on one GPU.

Writes a random checkpoint of the preset (default: V3-Lite cut to 6 layers, ~3.5 GB in FP8 with 128x128 block
scales, MTP layer included) once to `--checkpoint-dir`, then, each in turn:

- one GPU: `from_pretrained(dir, dtype=bfloat16, device_map="cuda:0")`;
- split: `from_pretrained(dir, dtype=bfloat16, device_map="auto", max_memory={i: budget, ...})` with a per-GPU
  budget that forces the decoder layers across `--gpus` GPUs (accelerate places them; layers are never split);

and for each: load seconds, weights per GPU, greedy `generate()` of `--new-tokens` tokens after a `--prompt`-token
prompt with the default (dynamic) cache and with `cache_implementation="static"`, ms per token (from the
difference of two generation lengths), and whether the tokens equal the one-GPU run's.

    python benchmarks/bench_device_map.py --gpus 2 --checkpoint-dir /tmp/dm_ckpt --json dm.json
"""

import argparse
import gc
import json
import time
from collections import Counter
from pathlib import Path

import torch
import transformers

from modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM
from modeling_deepseek_v3.official_checkpoint import write_official_checkpoint

PRESETS = Path(__file__).resolve().parent.parent / "configuration"


def write_checkpoint(args) -> None:
    folder = Path(args.checkpoint_dir)
    if (folder / "model.safetensors.index.json").exists():
        return
    fields = json.loads((PRESETS / f"{args.preset}.json").read_text())
    fields["num_hidden_layers"] = args.layers
    config = DeepseekV3Config(**fields)
    torch.manual_seed(0)
    with torch.device("cuda:0"):
        model = DeepseekV3ForCausalLM._from_config(config, dtype=torch.bfloat16)
    start = time.perf_counter()
    write_official_checkpoint(model, folder, fp8=True, num_shards=args.layers + 2)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    print(f"wrote {folder}: {size / 1e9:.2f} GB FP8 in {time.perf_counter() - start:.1f} s", flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()


def per_gpu_gib() -> list:
    return [torch.cuda.memory_allocated(i) / 2**30 for i in range(torch.cuda.device_count())]


def ms_per_token(model, prompt, new_tokens: int, **kwargs) -> tuple[float, torch.Tensor]:
    def generate(n):
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0, **kwargs)

    generate(new_tokens + 1)  # warm-up at full length (a static cache sized once, the graph captured once)
    times = {}
    for n in (new_tokens + 1, 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = generate(n)
        torch.cuda.synchronize()
        times[n] = time.perf_counter() - start
    return (times[new_tokens + 1] - times[1]) / new_tokens * 1e3, out[:, prompt.shape[1]:]


def measure(args, device_map, max_memory=None) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    before = per_gpu_gib()
    start = time.perf_counter()
    model = DeepseekV3ForCausalLM.from_pretrained(args.checkpoint_dir, dtype=args.dtype, device_map=device_map,
                                                  max_memory=max_memory).eval()
    torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    weights = [after - b for after, b in zip(per_gpu_gib(), before)]
    placement = Counter(str(d) for d in (getattr(model, "hf_device_map", None) or {"": device_map}).values())
    prompt = torch.randint(2, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(model.get_input_embeddings().weight.device)
    row = {"device_map": str(device_map), "max_memory": max_memory, "load_s": load_s, "weights_gib_per_gpu": weights,
           "placement": dict(placement)}
    with torch.no_grad():
        row["dynamic_ms_per_token"], tokens = ms_per_token(model, prompt, args.new_tokens)
        row["tokens"] = tokens[0].tolist()
        try:
            row["static_ms_per_token"], static_tokens = ms_per_token(model, prompt, args.new_tokens,
                                                                      cache_implementation="static")
            row["static_tokens_equal_dynamic"] = torch.equal(static_tokens.cpu(), tokens.cpu())
        except Exception as error:  # reported, not fatal: the split row still has its dynamic-cache figures
            row["static_error"] = f"{type(error).__name__}: {error}"[:500]
            import traceback

            traceback.print_exc()
    row["peak_gib_per_gpu"] = [torch.cuda.max_memory_allocated(i) / 2**30 for i in range(torch.cuda.device_count())]
    print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
    del model
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="deepseek-v3-lite")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--checkpoint-dir", default="/tmp/bench_device_map_ckpt")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="float32 for the token comparison: random bf16 weights give nearly tied logits")
    parser.add_argument("--json")
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)
    if torch.cuda.device_count() < args.gpus:
        raise SystemExit(f"--gpus {args.gpus}: only {torch.cuda.device_count()} CUDA devices are visible")
    write_checkpoint(args)
    single = measure(args, "cuda:0")
    weights = sum(single["weights_gib_per_gpu"])
    # A per-GPU budget a bit above an even share forces the split (accelerate fills GPU 0 first).
    budget = f"{weights / args.gpus * 1.15 + 0.5:.1f}GiB"
    for i in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(i)
    split = measure(args, "auto", max_memory={i: budget for i in range(args.gpus)} | {"cpu": "64GiB"})

    print(f"\n{torch.cuda.get_device_name()} x {args.gpus}; torch {torch.__version__}; transformers "
          f"{transformers.__version__}; {args.preset} cut to {args.layers} layers (+ MTP), FP8 official layout -> {args.dtype}")
    print(f"{'':<38} {'one GPU':>16} {f'device_map=auto, {budget}/GPU':>32}")
    print(f"{'placement (modules per device)':<38} {str(single['placement']):>16} {str(split['placement']):>32}")
    print(f"{'load time, s':<38} {single['load_s']:16.1f} {split['load_s']:32.1f}")
    print(f"{'weights per GPU, GiB':<38} {' / '.join(f'{w:.2f}' for w in single['weights_gib_per_gpu'][:args.gpus]):>16} "
          f"{' / '.join(f'{w:.2f}' for w in split['weights_gib_per_gpu'][:args.gpus]):>32}")
    for key, label in (("dynamic_ms_per_token", "decode b1, dynamic cache, ms/token"),
                       ("static_ms_per_token", "decode b1, static cache, ms/token")):
        values = [f"{row[key]:.2f}" if key in row else row.get("static_error", "-")[:30] for row in (single, split)]
        print(f"{label:<38} {values[0]:>16} {values[1]:>32}")
    equal = single["tokens"] == split["tokens"]
    print(f"greedy tokens of the split model equal the one-GPU run's: {equal}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "gpus": args.gpus,
                                               "single": single, "split": split, "tokens_equal": equal}, indent=1))


if __name__ == "__main__":
    main()
