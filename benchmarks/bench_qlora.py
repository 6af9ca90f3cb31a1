"""QLoRA fine-tuning memory and speed: this package against transformers' built-in + bitsandbytes + PEFT.

Writes a random-weight checkpoint of the preset in the official layout once (bf16, one shard per layer, reused from
`--checkpoint-dir`), then fine-tunes it twice on the same random batch, each in a fresh subprocess (a clean
allocator, and an out-of-memory in one does not end the other):

- ours: `AutoModelForCausalLM.from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True, nf4,
  double quantization, bf16 compute))` -- every linear and the routed experts in 4-bit --, LoRA through
  `peft_experts.lora_config` on the MLA projections and the routed experts (`LoraExperts`: per-expert adapters
  on the routed tokens only); `--moe-implementation` picks the 4-bit experts' compute (auto: chunks of experts
  dequantized at once and grouped GEMMs on CUDA; eager: the per-expert loop);
- theirs: `transformers.DeepseekV3ForCausalLM.from_pretrained` with the same `BitsAndBytesConfig` (its fused routed
  experts stay bf16), LoRA with the same rank on the same MLA projections plus
  `target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]` for the experts (PEFT's way for fused
  experts: `W + B @ A` of the whole stack at every forward).

Both: `peft.prepare_model_for_kbit_training` (gradient checkpointing unless `--no-gradient-checkpointing`), AdamW
on the adapters, bf16 autocast on CUDA, no MTP and no balance loss (the built-in has neither), the same
`--batch-size` x `--seq-len` token batch every step (the loss falls as the adapters memorize it). Measured: peak
allocated GPU memory during loading and during training (weights included), tokens/s over the steps after
`--warmup`, first and last loss, trainable parameters. Prints a table with the ratio and writes `--out` (JSON).

    python benchmarks/bench_qlora.py --out qlora.json                                   # V3-Lite on one GPU
    python benchmarks/bench_qlora.py --num-layers 8 --seq-len 2048 --out qlora8.json
    python benchmarks/bench_qlora.py --preset deepseek-v3-tiny --device cpu --steps 3 --out /tmp/qlora-cpu.json
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PRESETS = Path(__file__).resolve().parent.parent / "configuration"
# bitsandbytes' CPU kernels (0.50) need in_features % 64 == 0 and out_features % 32 == 0 (tests/test_quantization.py)
CPU_SAFE_DIMS = dict(moe_intermediate_size=64, q_lora_rank=64, kv_lora_rank=64, qk_rope_head_dim=32)


def bench_config(args):
    from modeling_deepseek_v3 import DeepseekV3Config

    fields = json.loads((PRESETS / f"{args.preset}.json").read_text())
    fields.update(num_nextn_predict_layers=0, aux_loss_alpha=0.0)
    if args.num_layers is not None:
        fields["num_hidden_layers"] = args.num_layers
    if args.device == "cpu":
        fields.update(CPU_SAFE_DIMS)
    return DeepseekV3Config(**fields)


def write_random_checkpoint(config, folder: Path, device: str) -> None:
    """Official-layout bf16 checkpoint with N(0, 0.02) weights, unit norms and a zero routing bias, one shard per
    layer (generated on `device`, so the host holds one layer at a time)."""
    from safetensors.torch import save_file

    from modeling_deepseek_v3.checkpoint_layout import official_tensor_specs
    from modeling_deepseek_v3.official_checkpoint import INDEX_NAME, layer_index

    specs = official_tensor_specs(config)
    shards = {}
    for key in specs:
        layer = layer_index(key)
        shards.setdefault("globals" if layer is None else f"layer{layer:03d}", []).append(key)
    generator = torch.Generator(device=device).manual_seed(0)
    weight_map = {}
    for shard, keys in shards.items():
        tensors = {}
        for key in keys:
            spec = specs[key]
            if spec.float32:
                tensors[key] = torch.zeros(spec.shape, dtype=torch.float32)
            elif "norm" in key:
                tensors[key] = torch.ones(spec.shape, dtype=torch.bfloat16)
            else:
                value = torch.randn(spec.shape, device=device, generator=generator, dtype=torch.float32) * 0.02
                tensors[key] = value.to(torch.bfloat16).cpu()
        filename = f"model-{shard}.safetensors"
        save_file(tensors, str(folder / filename), metadata={"format": "pt"})
        weight_map.update({key: filename for key in keys})
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config_dict = config.to_dict()
    config_dict.pop("auto_map", None)
    config_dict["torch_dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config_dict, indent=1))


def bnb_config(device: str):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16 if device != "cpu" else torch.float32)


def load_and_wrap(which: str, args):
    """The 4-bit model with LoRA adapters, ready to train."""
    import peft
    import transformers

    import modeling_deepseek_v3  # noqa: F401  (registers the Auto classes)
    from modeling_deepseek_v3.peft_experts import ATTENTION_TARGETS, lora_config

    device_map = {"": 0} if args.device == "cuda" else {"": "cpu"}
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    attention = list(ATTENTION_TARGETS)
    if which == "ours":
        model = transformers.AutoModelForCausalLM.from_pretrained(
            args.checkpoint_dir, quantization_config=bnb_config(args.device), dtype=dtype, device_map=device_map)
        model.config.moe_implementation = args.moe_implementation  # the experts read this config object
        config = lora_config(r=args.rank, lora_alpha=2 * args.rank, target_modules=attention + ["experts"])
    else:
        model = transformers.DeepseekV3ForCausalLM.from_pretrained(
            args.checkpoint_dir, quantization_config=bnb_config(args.device), dtype=dtype, device_map=device_map)
        config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, task_type="CAUSAL_LM",
                                 target_modules=attention,
                                 target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model = peft.prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=not args.no_gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False})
    return peft.get_peft_model(model, config)


def run_one(which: str, args) -> dict:
    """Load, fine-tune `--steps` steps, measure. Runs in its own process."""
    cuda = args.device == "cuda"
    result = {"implementation": which, "status": "ok"}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        model = load_and_wrap(which, args)
    except torch.OutOfMemoryError as error:
        result.update(status="oom while loading", error=str(error).splitlines()[0])
        return result
    result["load_seconds"] = time.perf_counter() - start
    if cuda:
        result["load_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["weights_gib"] = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    result["footprint_gib"] = model.get_memory_footprint() / 2**30
    result["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    vocab = model.config.vocab_size
    generator = torch.Generator(device=args.device).manual_seed(0)
    ids = torch.randint(2, vocab, (args.batch_size, args.seq_len), device=args.device, generator=generator)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    losses, times = [], []
    try:
        for _ in range(args.steps):
            step_start = time.perf_counter()
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=cuda):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())  # synchronizes
            times.append(time.perf_counter() - step_start)
    except torch.OutOfMemoryError as error:
        result.update(status=f"oom at training step {len(losses) + 1}", error=str(error).splitlines()[0])
    if cuda:
        result["train_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    timed = times[args.warmup:]
    if timed:
        result["tokens_per_s"] = args.batch_size * args.seq_len * len(timed) / sum(timed)
    result["losses"] = losses
    if losses:
        result.update(first_loss=losses[0], last_loss=losses[-1])
    return result


def run_in_subprocess(which: str, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = Path(handle.name)
    command = [sys.executable, __file__, "--_child", which, "--_child-out", str(out)] + args.forwarded
    process = subprocess.run(command, capture_output=True, text=True)
    if process.returncode != 0 or out.stat().st_size == 0:
        tail = (process.stdout + process.stderr)[-3000:]
        return {"implementation": which, "status": f"failed (exit {process.returncode})", "error": tail}
    result = json.loads(out.read_text())
    out.unlink()
    return result


def environment(args) -> dict:
    import peft
    import transformers

    try:
        import bitsandbytes
        bnb_version = bitsandbytes.__version__
    except ImportError:
        bnb_version = None
    return {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "bitsandbytes": bnb_version,
    }


def print_table(report: dict) -> None:
    ours, theirs = report["results"]["ours"], report["results"]["theirs"]
    shape = report["shape"]
    print(f"\nQLoRA, {report['environment']['device']}, {shape['preset']} ({shape['layers']} layers, "
          f"{shape['experts']} experts), NF4 + double quant, LoRA r={shape['rank']}, batch "
          f"{shape['batch_size']} x {shape['seq_len']} tokens, gradient checkpointing {shape['gradient_checkpointing']}, "
          f"ours with moe_implementation={shape['moe_implementation']}")

    def cell(result, key, fmt):
        value = result.get(key)
        if value is not None:
            return fmt.format(value)
        return result["status"] if result["status"] != "ok" and key == "train_peak_gib" else "-"

    rows = [("peak memory in training, GiB", "train_peak_gib", "{:.2f}"),
            ("peak memory while loading, GiB", "load_peak_gib", "{:.2f}"),
            ("weights on the GPU after loading, GiB", "weights_gib", "{:.2f}"),
            ("get_memory_footprint(), GiB", "footprint_gib", "{:.3f}"),
            ("tokens/s", "tokens_per_s", "{:,.0f}"),
            ("loss first -> last", None, None),
            ("trainable parameters", "trainable_parameters", "{:,}")]
    print("(GPU memory rows: CUDA only; the last column is built-in / ours)")
    print(f"| {'':40s} | {'ours':>14s} | {'built-in':>22s} | {'built-in / ours':>15s} |")
    print(f"|{'-' * 42}|{'-' * 16}|{'-' * 24}|{'-' * 17}|")
    for label, key, fmt in rows:
        if key is None:
            a = f"{ours['first_loss']:.3f} -> {ours['last_loss']:.3f}" if "last_loss" in ours else ours["status"]
            b = f"{theirs['first_loss']:.3f} -> {theirs['last_loss']:.3f}" if "last_loss" in theirs else theirs["status"]
            print(f"| {label:40s} | {a:>14s} | {b:>22s} | {'':>15s} |")
            continue
        ratio = ""
        if ours.get(key) and theirs.get(key) is not None:
            ratio = f"{theirs[key] / ours[key]:.2f}x"
        print(f"| {label:40s} | {cell(ours, key, fmt):>14s} | {cell(theirs, key, fmt):>22s} | {ratio:>15s} |")
    for result in (ours, theirs):
        if result["status"] != "ok":
            print(f"{result['implementation']}: {result['status']}: {result.get('error', '')[-500:]}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="deepseek-v3-lite", help="config in configuration/ (default: %(default)s)")
    parser.add_argument("--num-layers", type=int, help="cut the preset to this many decoder layers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of tokens/s (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--moe-implementation", default="auto", choices=["auto", "eager", "grouped_mm"],
                        help="ours: the 4-bit experts' compute, 'eager' = the per-expert loop (default: %(default)s)")
    parser.add_argument("--implementations", default="ours,theirs", help="comma-separated subset of ours,theirs")
    parser.add_argument("--checkpoint-dir", help="random checkpoint folder, written once and reused (default: a "
                                                 "folder under the system temp dir named by preset and layers)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    parser.add_argument("--_child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    raw = list(sys.argv[1:] if argv is None else argv)
    args.forwarded = [a for i, a in enumerate(raw) if not a.startswith("--_child")
                      and not (i > 0 and raw[i - 1].startswith("--_child"))]
    return args


def main():
    args = parse_args()
    config = bench_config(args)
    if args.checkpoint_dir is None:
        args.checkpoint_dir = str(Path(tempfile.gettempdir()) /
                                  f"bench_qlora_{args.preset}_{config.num_hidden_layers}l_{args.device}")
        args.forwarded += ["--checkpoint-dir", args.checkpoint_dir]
    if args._child:
        Path(args._child_out).write_text(json.dumps(run_one(args._child, args)))
        return
    folder = Path(args.checkpoint_dir)
    if not (folder / "config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        print(f"writing a random {args.preset} checkpoint ({config.num_hidden_layers} layers) to {folder}")
        write_random_checkpoint(config, folder, args.device)
        if args.device == "cuda":
            torch.cuda.empty_cache()  # the measured runs are subprocesses sharing this GPU
        print(f"  {time.perf_counter() - start:.0f} s")
    results = {}
    for which in ("ours", "theirs"):
        if which in args.implementations.split(","):
            print(f"running {which} ...", flush=True)
            results[which] = run_in_subprocess(which, args)
        else:
            results[which] = {"implementation": which, "status": "not run"}
    report = {
        "environment": environment(args),
        "shape": {"preset": args.preset, "layers": config.num_hidden_layers, "experts": config.n_routed_experts,
                  "hidden_size": config.hidden_size, "batch_size": args.batch_size, "seq_len": args.seq_len,
                  "rank": args.rank, "steps": args.steps, "gradient_checkpointing": not args.no_gradient_checkpointing,
                  "moe_implementation": args.moe_implementation},
        "results": results,
    }
    print_table(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
