"""Evaluate a DeepSeek-V3 checkpoint on held-out text: perplexity and expert-load balance, offline.

The text is packed into `--block-size` blocks exactly as in training (EOS between documents) and streamed, so only
the `--max-blocks` blocks evaluated are ever tokenized. Perplexity is exp of the token-weighted mean next-token
cross-entropy over all blocks (the main head only; MTP modules do not run). Expert load: for every MoE layer, the
busiest expert's routed-token count over the mean count (1.0 is perfect balance), measured over the same tokens.

    python examples/evaluate.py --model out/tiny
    python examples/evaluate.py --model out/tiny --files "held_out/*.txt" --block-size 512 --max-blocks 200 \\
        --json out/tiny/eval.json

Without `--files`, the text is the held-out split of the Python standard library that examples/pretrain.py leaves
out with the same `--validation-fraction` and `--seed`.
"""

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, default_data_collator

import modeling_deepseek_v3  # noqa: F401  (registers the classes with the Auto API)
from modeling_deepseek_v3.data import (
    DEFAULT_SEED,
    DEFAULT_VALIDATION_FRACTION,
    StreamingBlockDataset,
    TextFileCorpus,
    check_tokenizer_fits,
    resolve_files,
    split_documents,
    stdlib_files,
)
from pretrain import load_tokenizer_or_exit


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the one in --model)")
    parser.add_argument("--files", nargs="+", metavar="PATH",
                        help="text files, directories or glob patterns (default: the held-out standard library split)")
    parser.add_argument("--validation-fraction", type=float, default=DEFAULT_VALIDATION_FRACTION,
                        help="held-out share of the default corpus (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help="seed of the default split (default: %(default)s)")
    parser.add_argument("--block-size", type=int, default=256, help="tokens per block (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="blocks per forward (default: %(default)s)")
    parser.add_argument("--max-blocks", type=int, default=64, help="blocks evaluated at most (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers to this JSON file")
    return parser.parse_args()


def main():
    args = parse_args()
    if args.files:
        files, source = resolve_files(args.files), " ".join(args.files)
    else:
        _, files = split_documents(stdlib_files(), args.validation_fraction, args.seed)
        source = f"the held-out standard library split (fraction {args.validation_fraction}, seed {args.seed})"

    tokenizer_path = args.tokenizer or args.model
    tokenizer = load_tokenizer_or_exit(tokenizer_path)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    check_tokenizer_fits(tokenizer, model.config.vocab_size, source=f"the tokenizer in {tokenizer_path!r}")
    if args.block_size > model.config.max_position_embeddings:
        raise SystemExit(f"--block-size {args.block_size} exceeds the model's max_position_embeddings "
                         f"{model.config.max_position_embeddings}")

    dataset = StreamingBlockDataset(TextFileCorpus(files), tokenizer, args.block_size, max_blocks=args.max_blocks)
    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=default_data_collator)
    total_nll, total_predictions, blocks = 0.0, 0, 0
    start = time.perf_counter()
    with torch.no_grad(), model.tracking_expert_load():
        for batch in tqdm(loader, desc="evaluating", unit="batch",
                          total=math.ceil(args.max_blocks / args.batch_size)):
            input_ids_BT = batch["input_ids"].to(args.device)
            labels_BT = batch["labels"].to(args.device)
            logits_BTV = model(input_ids=input_ids_BT, attention_mask=batch["attention_mask"].to(args.device),
                               use_cache=False).logits
            # Position t predicts token t + 1; cross-entropy in float32 whatever the model dtype.
            nll = F.cross_entropy(logits_BTV[:, :-1].float().flatten(0, 1), labels_BT[:, 1:].flatten(),
                                  ignore_index=-100, reduction="sum")
            total_nll += nll.item()
            total_predictions += int((labels_BT[:, 1:] != -100).sum())
            blocks += input_ids_BT.shape[0]
    elapsed = time.perf_counter() - start
    if blocks == 0:
        raise SystemExit(f"{source}: the {len(files)} files hold fewer than one block of {args.block_size} tokens; "
                         "give more text or a smaller --block-size")
    stats = model.expert_load_statistics(reset=True)

    cross_entropy = total_nll / total_predictions
    results = {
        "model": args.model,
        "source": source,
        "files": len(files),
        "blocks": blocks,
        "block_size": args.block_size,
        "predictions": total_predictions,
        "cross_entropy": cross_entropy,
        "perplexity": math.exp(cross_entropy),
        "tokens_per_second": blocks * args.block_size / elapsed,
        "expert_load": stats,
    }
    print_table(results, model.config.num_hidden_layers)
    if args.json:
        # NaN (an MTP layer that routed nothing) becomes null: strict JSON has no NaN.
        results["expert_load"] = {key: None if value != value else value for key, value in stats.items()}
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")


def print_table(results: dict, num_hidden_layers: int) -> None:
    rows = [
        ("model", results["model"]),
        ("text", f"{results['source']} ({results['files']} files)"),
        ("blocks", f"{results['blocks']} x {results['block_size']} tokens "
                   f"({results['predictions']:,} next-token predictions)"),
        ("cross-entropy", f"{results['cross_entropy']:.4f} nats/token"),
        ("perplexity", f"{results['perplexity']:.3f}"),
        ("speed", f"{results['tokens_per_second']:,.0f} tokens/s"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")

    stats = results["expert_load"]
    layers = sorted({key.split("/")[0] for key in stats if key.startswith("layer_")}, key=lambda k: int(k[6:]))
    if not layers:
        print("expert load: the model has no MoE layer")
        return
    columns = sorted({key.split("/", 1)[1] for key in stats if key.startswith("layer_")})
    print("\nexpert load per MoE layer (max_over_mean_load: busiest expert / mean; 1.0 = balanced)")
    print("  ".join(f"{name:>20}" for name in ["layer"] + columns))
    for layer in layers:
        index = int(layer[6:])
        # MTP layers (index >= num_hidden_layers) only run with labels, so they route nothing here: NaN.
        name = f"{index} (MTP)" if index >= num_hidden_layers else str(index)
        print("  ".join([f"{name:>20}"] + [f"{stats[f'{layer}/{column}']:>20.4f}" for column in columns]))
    overall = {key: value for key, value in stats.items() if "/" not in key}
    print("overall: " + ", ".join(f"{key} {value:.4g}" for key, value in overall.items()))


if __name__ == "__main__":
    main()
