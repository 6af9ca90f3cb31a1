"""A/B of the captured batch-1 decode step (graph replay, greedy token picked inside the step), our model only.

Each variant undoes one of the decode step's choices in-process, then the step is captured afresh and timed; the
variants alternate over `--rounds` so that a drift of the machine shows up in every variant alike. The greedy
tokens of each run are compared with the first run's: `torch-argmax` picks the same tokens; the variants that
change a reduction order (tiles, the norm's sum of squares) move some bf16 roundings, which flips a nearly tied
token of the random weights after some steps.

- `current`: the package as it is;
- `h100-tiles`: the matrix-vector and MoE tiles swept on an H100 (before the H200 sweep);
- `torch-argmax`: the greedy token from torch's one-pass `argmax` of the float32 logits instead of `argmax_rows`,
  and the greedy bookkeeping in torch ops;
- `greedy-in-torch`: the greedy bookkeeping (token appended, mask, position, next input) as torch ops after
  `argmax_rows` instead of inside its second pass (`greedy_pick_`);
- `torch-prologue`: the embedding, rotary angles and attention bias as torch ops instead of `decode_prologue`;
- `separate-post-norm`: the MoE layer's residual add and post-attention norm as their own launch (`add_rms_norm`)
  instead of inside the router's pass;
- `separate-input-norm`: the layer's input RMSNorm as its own launch instead of inside the q_a/kv_a kernel;
- `separate-combine`: the attention's combine as its own launch before W_UV instead of inside it;
- `keys-after-wait`: the attention split kernel reads its first keys after the previous kernel instead of before;
- `down-tile-256`: the MoE down projection's tile before the change (8 rows, 256 columns a step), whose weight
  loads mostly wait for the previous kernel;
- `separate-latent-norm`: the latent norms and k_pe's RoPE as their own launch (`latent_norm_rope`) instead of
  q_a's norm inside q_b_proj's pass and the latent row written by the absorbed query's launch.
- `separate-moe-combine`: each MoE layer's output summed by its own launch (`moe_combine`) instead of inside the
  next layer's q_a/kv_a pass (`PendingMoEOutput`).

    python benchmarks/ab_decode_step.py --preset deepseek-v3-lite --context 1024 --rounds 2
"""

import argparse
import contextlib
import json
from pathlib import Path

import torch
from transformers import StaticCache

from modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM, decode_kernels, moe_kernels
from modeling_deepseek_v3 import modeling_deepseek_v3 as modeling

PRESETS = Path(__file__).resolve().parent.parent / "configuration"


@contextlib.contextmanager
def patched(obj, **values):
    saved = {name: getattr(obj, name) for name in values}
    for name, value in values.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(obj, name, value)


def h100_tiles():
    stack = contextlib.ExitStack()
    stack.enter_context(patched(decode_kernels, GEMV_TILE=(1, 2048, 4), NARROW_GEMV_TILE=(1, 2048, 4),
                                GATE_UP_TILE=(1, 2048, 8)))
    stack.enter_context(patched(moe_kernels, GATE_UP_TILE=(2, 2048, 2), DOWN_TILE=(2, 2048, 8)))
    return stack


def attention_config(**values):
    return patched(decode_kernels, ATTENTION_CONFIG={**decode_kernels.ATTENTION_CONFIG, **values})


VARIANTS = {  # name -> a context manager that applies the variant
    "current": contextlib.nullcontext,
    "h100-tiles": h100_tiles,
    "torch-argmax": lambda: patched(modeling, argmax_rows=lambda logits: logits.float().argmax(dim=-1),
                                    GREEDY_MAX_ROWS=0),
    "greedy-in-torch": lambda: patched(modeling, GREEDY_MAX_ROWS=0),
    "torch-prologue": lambda: patched(modeling.DeepseekV3Model, _decode_prologue=lambda *args: None),
    "separate-post-norm": lambda: patched(modeling.DeepseekV3MoE, routes_after_add_norm=lambda *args: False),
    "separate-input-norm": lambda: patched(modeling.DeepseekV3Attention, fuses_input_norm=lambda *args: False),
    "separate-combine": lambda: attention_config(fold_partials=0),
    "keys-after-wait": lambda: attention_config(early_keys=False),
    "down-tile-256": lambda: patched(moe_kernels, DOWN_TILE=(8, 256, 4)),
    "separate-latent-norm": lambda: patched(modeling.DeepseekV3Attention, _writes_latent_in_absorb=lambda *a: False),
    "separate-moe-combine": lambda: patched(modeling, _passes_moe_parts=lambda *args: False),
}


@torch.no_grad()
def greedy_graph(model, config, context: int, slots: int, batch: int = 1) -> "modeling.DecodeGraph":
    """A freshly captured greedy decode step (as generate() runs it) after a `context`-token prefill of random ids
    (seed 0), batch rows, with `slots` cache slots left for the steps."""
    cache = StaticCache(config=config, max_cache_len=context + slots)
    generator = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(2, config.vocab_size, (batch, context), device="cuda", generator=generator)
    logits = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    graph = modeling.DecodeGraph(model, cache, batch, greedy_eos=())
    graph.start(torch.ones(batch, context, dtype=torch.long, device="cuda"))
    graph.start_greedy(torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1),
                       torch.ones(batch, dtype=torch.long, device="cuda"), None)
    return graph


def replay_ms(graph: "modeling.DecodeGraph", steps: int, warmup: int = 5) -> float:
    """ms per replay of `graph` over `steps` replays after `warmup` untimed ones."""
    for _ in range(warmup):
        graph._run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        graph._run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / steps


def step_ms(model, config, context: int, steps: int) -> tuple[float, torch.Tensor]:
    """ms per replay of a freshly captured greedy decode step after a `context`-token prefill, and its tokens."""
    warmup = 5
    graph = greedy_graph(model, config, context, steps + 16)
    ms = replay_ms(graph, steps, warmup)
    return ms, graph.tokens[0, context + 1 : context + 1 + warmup + steps].clone()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="deepseek-v3-lite")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    config = DeepseekV3Config(**json.loads((PRESETS / f"{args.preset}.json").read_text()))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = DeepseekV3ForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.preset}, bf16, random weights, batch 1, "
          f"context {args.context}, {args.steps} replays a run")
    reference, times = None, {name: [] for name in args.variants}
    for round_ in range(args.rounds):
        for name in args.variants:
            with VARIANTS[name]():
                ms, tokens = step_ms(model, config, args.context, args.steps)
            reference = tokens if reference is None else reference
            times[name].append(ms)
            print(f"round {round_}: {name:20s} {ms:.3f} ms/step  tokens as the first run: "
                  f"{torch.equal(tokens, reference)}", flush=True)
    best = {name: min(values) for name, values in times.items()}
    base = best.get("current")
    for name, ms in best.items():
        print(f"{name:20s} best {ms:.3f} ms/step" + (f"  ({ms - base:+.3f} ms against current)" if base else ""))


if __name__ == "__main__":
    main()
