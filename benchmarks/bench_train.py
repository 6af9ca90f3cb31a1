"""Training step speed and memory: this package's DeepseekV3ForCausalLM against transformers' built-in, same weights.

Builds the preset (default: V3-Lite cut to 8 layers) with random bf16 weights on the GPU, and times forward +
backward of one batch (`--batch` x `--seq` random tokens, labels = inputs, no optimizer step; gradients are bf16
like the weights and set to None after each step) with and without gradient checkpointing. Then moves the weights to
host memory, builds transformers' built-in `DeepseekV3ForCausalLM` from the same state dict and measures it the
same way. Prints tokens/s, peak GPU memory (weights and gradients included), MFU and the ratios. `--compile model|layers`
applies the same `torch.compile` to both models; `--cuda-graph` replays both models' forward + backward as CUDA graphs
(`training.GraphedTrainingStep`; its peak includes the warm-up and the capture).

Both models train as they would in a real run: ours computes the LM loss, the sequence-wise balance loss and counts
the routed tokens for the bias update (and the MTP loss with `--mtp`; the built-in has no MTP module, so the
default compares without it); the built-in computes the LM loss.

    python benchmarks/bench_train.py --preset deepseek-v3-lite --layers 8 --seq 4096 --batch 1 [--compile layers]
        [--no-training-kernels] [--cuda-graph]
"""

import argparse
import gc
import json
from pathlib import Path

import torch
import transformers
from bench_generate import timed

from modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM
from modeling_deepseek_v3.training import (
    GraphedTrainingStep,
    peak_bf16_flops,
    set_activation_checkpointing,
    training_flops_per_token,
)

PRESETS = Path(__file__).resolve().parent.parent / "configuration"


def measure(model, args, vocab: int) -> dict:
    generator = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(2, vocab, (args.batch, args.seq), device="cuda", generator=generator)
    model.train()
    results = {}
    for checkpointing in (False, True):
        kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}} if checkpointing else {}
        set_activation_checkpointing(model, checkpointing, **kwargs)
        step_fn = model
        if args.compile == "model":
            step_fn = torch.compile(model)
        elif args.compile == "layers":
            # Regional: each decoder layer compiled in place (identical layers share the compiled code); the
            # checkpointing wrapper stays outside the compiled region, so it still frees the layer's activations.
            for layer in model.model.layers:
                layer.compile()

        def step():
            loss = step_fn(input_ids=ids, labels=ids).loss
            loss.backward()
            model.zero_grad(set_to_none=True)

        key = "checkpointing" if checkpointing else "plain"
        if args.cuda_graph:
            # The eager loss of the same batch, to check the replay against.
            eager_loss = step_fn(input_ids=ids, labels=ids).loss.item()
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()  # the graph's memory is allocated while capturing
            graphed = GraphedTrainingStep(model, forward=None if step_fn is model else step_fn)
            try:
                graphed_loss = graphed(ids, ids).loss.item()
                model.zero_grad(set_to_none=True)  # each timed step writes the gradients, as the eager steps do
            except Exception as error:  # report and go on with the other rows
                print(f"  {key}: capture failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
                continue
            print(f"  {key}: loss eager {eager_loss:.6f}, graphed {graphed_loss:.6f}", flush=True)

            def step():  # noqa: F811 (the graphed form of the step above)
                graphed(ids, ids)
                model.zero_grad(set_to_none=True)

        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        if not args.cuda_graph:
            torch.cuda.reset_peak_memory_stats()  # the peak of the timed steps, after the warm-ups' compilation
        seconds = timed(step, args.steps, warmup=0)
        results[key] = {"tokens_per_s": args.batch * args.seq / seconds, "step_ms": seconds * 1e3,
                        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                        "reserved_gib": torch.cuda.memory_reserved() / 2**30}
        if args.cuda_graph:
            del graphed, step
            gc.collect()
            torch.cuda.empty_cache()
        print(f"  {key}: {results[key]}", flush=True)
    set_activation_checkpointing(model, False)
    return results


def builtin_from_state(config: DeepseekV3Config, state: dict) -> transformers.DeepseekV3ForCausalLM:
    """transformers' built-in DeepseekV3ForCausalLM on the GPU in bf16 with our model's state dict `state` (every
    weight it has must be there; only our MTP layer's may be left over)."""
    builtin_config = transformers.DeepseekV3Config.from_dict(config.to_dict())
    with torch.device("cuda"):
        theirs = transformers.DeepseekV3ForCausalLM._from_config(builtin_config, dtype=torch.bfloat16)
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert not missing, f"built-in lacks weights: {missing[:5]}"
    assert all(k.startswith(f"model.layers.{config.num_hidden_layers}.") for k in unexpected), unexpected[:5]
    return theirs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="deepseek-v3-lite")
    parser.add_argument("--layers", type=int, default=8, help="cut the preset to this many layers")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--mtp", action="store_true", help="keep the preset's MTP module (ours only)")
    parser.add_argument("--compile", choices=["model", "layers"],
                        help="torch.compile both models: the whole model, or each decoder layer (regional)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="both models' forward + backward replayed as CUDA graphs (GraphedTrainingStep)")
    parser.add_argument("--skip-builtin", action="store_true")
    parser.add_argument("--training-kernels", action=argparse.BooleanOptionalAction, default=True,
                        help="ours with config.training_kernels (the default; --no-training-kernels: the eager ops)")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()

    fields = json.loads((PRESETS / f"{args.preset}.json").read_text())
    fields["num_hidden_layers"] = args.layers
    if not args.mtp:
        fields["num_nextn_predict_layers"] = 0
    config = DeepseekV3Config(**fields, training_kernels=args.training_kernels)
    torch.manual_seed(0)
    with torch.device("cuda"):
        ours = DeepseekV3ForCausalLM._from_config(config, dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"ours ({n_params / 1e9:.2f}B parameters):", flush=True)
    rows = {"ours": measure(ours, args, config.vocab_size)}
    state = {k: v.to("cpu") for k, v in ours.state_dict().items()}
    del ours
    gc.collect()
    torch.cuda.empty_cache()

    if not args.skip_builtin:
        theirs = builtin_from_state(config, state)
        del state
        print("transformers:", flush=True)
        try:
            rows["transformers"] = measure(theirs, args, config.vocab_size)
        except torch.OutOfMemoryError as error:
            print(f"  built-in ran out of memory: {error}")

    device = torch.cuda.get_device_name()
    flops = training_flops_per_token(config, args.seq) * args.batch * args.seq
    peak = peak_bf16_flops(device)
    print(f"\n{device}; torch {torch.__version__}; transformers {transformers.__version__}; preset {args.preset} cut to "
          f"{config.num_hidden_layers} layers{' + MTP' if args.mtp else ''}, {n_params / 1e9:.2f}B parameters, bf16 "
          f"weights and gradients, batch {args.batch} x {args.seq} tokens, forward + backward"
          f"{f', torch.compile ({args.compile})' if args.compile else ', eager'}"
          f"{', CUDA graphs' if args.cuda_graph else ''}"
          f"{', ours with training_kernels' if args.training_kernels else ', ours without training_kernels'}")
    print(f"{'workload':<34} {'ours':>10} {'transformers':>13} {'ratio':>7}")
    for key in ("plain", "checkpointing"):
        o, t = rows["ours"].get(key), rows.get("transformers", {}).get(key)
        label = "grad checkpointing" if key == "checkpointing" else "no checkpointing"
        if o is None:
            print(f"{label + ': ours has no result':<34}")
            continue
        theirs_tps = f"{t['tokens_per_s']:13.0f}" if t else f"{'-':>13}"
        ratio = f"{o['tokens_per_s'] / t['tokens_per_s']:6.2f}x" if t else ""
        print(f"{label + ', tokens/s':<34} {o['tokens_per_s']:10.0f} {theirs_tps} {ratio}")
        theirs_mem = f"{t['peak_gib']:13.2f}" if t else f"{'-':>13}"
        print(f"{label + ', peak GiB':<34} {o['peak_gib']:10.2f} {theirs_mem}")
        theirs_reserved = f"{t['reserved_gib']:13.2f}" if t else f"{'-':>13}"
        print(f"{label + ', reserved GiB':<34} {o['reserved_gib']:10.2f} {theirs_reserved}")
        if peak:
            mfu = lambda r: flops / (r["step_ms"] / 1e3) / peak  # noqa: E731
            theirs_mfu = f"{mfu(t):13.1%}" if t else f"{'-':>13}"
            print(f"{label + ', MFU':<34} {mfu(o):10.1%} {theirs_mfu}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "rows": rows, "flops_per_step": flops,
                                               "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
