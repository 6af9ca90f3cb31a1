"""Generate text with DeepSeek-V3.

With no arguments: builds a small random model from a preset in `configuration/`, saves it in the official
checkpoint layout, reloads it with `AutoModelForCausalLM`, and runs greedy and sampled `generate()` (no download;
the tokens are random-model output, shown as ids).

    python examples/generate.py
    python examples/generate.py --preset deepseek-v3-tiny --max-new-tokens 32
    python examples/generate.py --model /path/to/checkpoint --prompt "The capital of France is" --dtype bfloat16

With `--model`, a tokenizer in the checkpoint folder is used to encode the prompt and stream the answer to the
terminal (`TextStreamer`); without one, the prompt is read as space-separated token ids.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

import modeling_deepseek_v3  # registers the classes with the Auto API
from modeling_deepseek_v3.modeling_deepseek_v3 import CACHE_FIELD

PRESETS = Path(__file__).resolve().parent.parent / "configuration"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder (official layout); default: a random model from --preset")
    parser.add_argument("--preset", default="deepseek-v3-tiny", help="config in configuration/ (default: %(default)s)")
    parser.add_argument("--prompt", default=None, help="prompt text (or token ids without a tokenizer)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=0.7, help="for the sampled run")
    parser.add_argument("--top-p", type=float, default=0.95, help="for the sampled run")
    parser.add_argument("--greedy-only", action="store_true", help="skip the sampled run")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-dir", help="where to save the random model (default: a temporary folder)")
    return parser.parse_args()


def build_random_checkpoint(preset: str, save_dir: str, seed: int) -> None:
    path = PRESETS / f"{preset}.json"
    if not path.exists():
        names = sorted(p.stem for p in PRESETS.glob("*.json"))
        raise SystemExit(f"unknown preset {preset!r}: expected one of {names}")
    config = modeling_deepseek_v3.DeepseekV3Config(**json.loads(path.read_text()))
    torch.manual_seed(seed)
    model = modeling_deepseek_v3.DeepseekV3ForCausalLM(config)
    model.save_pretrained(save_dir)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"built a random {preset} model ({n_params / 1e6:.2f}M parameters) and saved it to {save_dir}")


def main():
    args = parse_args()
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            path = args.save_dir or tmp
            build_random_checkpoint(args.preset, path, args.seed)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
        print(f"loaded {type(model).__module__}.{type(model).__name__} from {path} ({args.dtype}, {args.device})")

        tokenizer = None
        if args.model is not None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(args.model)
            except (OSError, ValueError):
                print("no tokenizer in the checkpoint folder: reading the prompt as token ids")
        if tokenizer is not None:
            input_ids = tokenizer(args.prompt or "Hello", return_tensors="pt").input_ids
        elif args.prompt:
            input_ids = torch.tensor([[int(tok) for tok in args.prompt.split()]])
        else:
            input_ids = torch.randint(2, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
        input_ids = input_ids.to(args.device)
        streamer = TextStreamer(tokenizer, skip_prompt=True) if tokenizer is not None else None
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
        common = dict(max_new_tokens=args.max_new_tokens, attention_mask=torch.ones_like(input_ids),
                      pad_token_id=pad, streamer=streamer)

        runs = [("greedy", dict(do_sample=False))]
        if not args.greedy_only:
            runs.append(("sampled", dict(do_sample=True, temperature=args.temperature, top_p=args.top_p)))
        for name, kwargs in runs:
            torch.manual_seed(args.seed)
            start = time.perf_counter()
            out = model.generate(input_ids, return_dict_in_generate=True, **common, **kwargs)
            elapsed = time.perf_counter() - start
            new_tokens = out.sequences[0, input_ids.shape[1]:]
            text = tokenizer.decode(new_tokens) if tokenizer is not None else " ".join(map(str, new_tokens.tolist()))
            if streamer is None:
                print(f"[{name}] {text}")
            cache = getattr(out, CACHE_FIELD)  # `cache` in newer transformers, `past_key_values` in 5.17
            cache_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
            print(f"[{name}] {len(new_tokens)} tokens in {elapsed:.2f} s; latent cache {cache_bytes / 1024:.1f} KiB "
                  f"for {cache.get_seq_length()} tokens x {len(cache.layers)} layers")


if __name__ == "__main__":
    main()
