"""Where generate()'s time per token goes around the decode step: our loop against transformers' own loop.

Builds the preset (default V3-Lite) with random bf16 weights on the GPU and times greedy `generate()` on a static
cache, batch 1, in three ways, interleaved over `--rounds` rounds (the spread between rounds is the noise):

- `greedy in graph`: `sample_on_decode_graph` with the token picked inside the captured step (no processor);
- `min_new_tokens`: the same loop with a logits processor, so the processor, argmax and stopping criteria run
  between the graph replays;
- `transformers loop`: transformers' `_sample` (a host sync per token), each step still replaying our graph.

Per token: the difference of a `--tokens`-token call and a 1-token call, over tokens - 1 (median of `--repeats`).
"host waits" is the time the host spent blocked on the stop flags' events (our loops only): time per token minus
that is what the host was busy with, per token.

    python benchmarks/bench_generate_loop.py --preset deepseek-v3-lite --context 1024 --tokens 129 --rounds 3
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM
from modeling_deepseek_v3 import modeling_deepseek_v3 as modeling

PRESETS = Path(__file__).resolve().parent.parent / "configuration"
waits = [0.0]


class WaitTimedEvent(torch.cuda.Event):
    """The events `LaggedStopFlags` waits on, with the wait timed."""

    def synchronize(self):
        start = time.perf_counter()
        super().synchronize()
        waits[0] += time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="deepseek-v3-lite")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=129)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    config = DeepseekV3Config(**json.loads((PRESETS / f"{args.preset}.json").read_text()))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = DeepseekV3ForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    prompt = torch.randint(2, config.vocab_size, (1, args.context), device="cuda")

    def generate(n, **extra):
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                              pad_token_id=0, cache_implementation="static", **extra)

    def per_token(extra):
        medians = []
        for n in (args.tokens, 1):
            generate(n, **extra)
            torch.cuda.synchronize()
            times, waited = [], []
            for _ in range(args.repeats):
                waits[0] = 0.0
                start = time.perf_counter()
                out = generate(n, **extra)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
                waited.append(waits[0])
                if out.shape[1] != prompt.shape[1] + n:
                    raise RuntimeError("generate() stopped on an end-of-sequence id: pick another prompt seed")
            medians.append((statistics.median(times), statistics.median(waited)))
        (long, long_wait), (short, short_wait) = medians
        return ((long - short) / (args.tokens - 1) * 1e3, (long_wait - short_wait) / (args.tokens - 1) * 1e3)

    own_loop = modeling.DeepseekV3ForCausalLM._can_sample_on_graph
    modeling.torch.cuda.Event = WaitTimedEvent  # the package's loop creates its events through this name
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; preset {args.preset}, context {args.context}")
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, extra, transformers_loop in [("greedy in graph", {}, False),
                                                   ("min_new_tokens", {"min_new_tokens": args.tokens}, False),
                                                   ("transformers loop", {}, True)]:
                if transformers_loop:
                    modeling.DeepseekV3ForCausalLM._can_sample_on_graph = lambda *a: False
                try:
                    ms, wait = per_token(extra)
                finally:
                    modeling.DeepseekV3ForCausalLM._can_sample_on_graph = own_loop
                print(f"{name:20s} {ms:.3f} ms/token, host waits {wait:.3f} ms/token -> host busy {ms - wait:.3f}")


if __name__ == "__main__":
    main()
