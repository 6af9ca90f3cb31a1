"""Pretraining demonstration: balancing and MTP on real text, one command, offline.

Trains one byte-level BPE tokenizer on the Python standard library's sources (the default corpus of
examples/pretrain.py, 5% of the files held out), then pretrains the same model from scratch three times with the
same data, seed and steps:

- `full`: MTP loss on (the preset's constant `mtp_loss_weight`, 0.1), auxiliary-loss-free bias update on (gamma =
  the preset's `bias_update_speed`, 0.001), sequence-wise balance loss on;
- `no-balancing`: the same with the bias update off (gamma = 0; the balance loss stays, as in the paper's ablation);
- `no-mtp`: the same without the MTP loss (the MTP module is not run);

evaluates each on the held-out files (examples/evaluate.py: main-head perplexity and expert load), and writes
`summary.json`, `summary.md` (the table) and, where matplotlib is installed, `curves.png` (LM and MTP loss, and
max/mean expert load over training) to `--output-dir`. `--plot-only` redraws the table and the plot from a finished
output folder (from its summary.json where present).

    python benchmarks/pretrain_demo.py --output-dir out/demo                  # on one GPU: a few minutes a run
    python benchmarks/pretrain_demo.py --output-dir out/demo --plot-only --png benchmarks/figures/pretrain_demo.png
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNS = {"full": [], "no-balancing": ["--no-balancing"], "no-mtp": ["--no-mtp"]}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="out/demo")
    parser.add_argument("--preset", default="deepseek-v3-small")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--logging-steps", type=int, default=20)
    parser.add_argument("--eval-blocks", type=int, default=400, help="held-out blocks for the perplexity")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--no-bf16", action="store_true", help="float32 training (default: bf16 autocast)")
    parser.add_argument("--torch-compile", action="store_true", help="pass --torch-compile to pretrain.py")
    parser.add_argument("--plot-only", action="store_true", help="only redraw summary.md and the plot")
    parser.add_argument("--png", help="where to write the plot (default: OUTPUT_DIR/curves.png)")
    return parser.parse_args()


def run(command: list) -> None:
    print("+", " ".join(map(str, command)), flush=True)
    subprocess.run([str(c) for c in command], check=True)


def train_tokenizer(folder: Path, vocab_size: int) -> None:
    from modeling_deepseek_v3.data import DEFAULT_SEED, DEFAULT_VALIDATION_FRACTION, split_documents, stdlib_files
    from modeling_deepseek_v3.data import TextFileCorpus, train_bpe_tokenizer

    train_files, _ = split_documents(stdlib_files(), DEFAULT_VALIDATION_FRACTION, DEFAULT_SEED)
    tokenizer = train_bpe_tokenizer(TextFileCorpus(train_files), vocab_size)
    tokenizer.save_pretrained(folder)


def summarize(output: Path, runs: list) -> dict:
    summary = {}
    for name in runs:
        folder = output / name
        history = json.loads((folder / "log_history.json").read_text())
        logged = [entry for entry in history if "lm_loss" in entry]
        train = json.loads((folder / "train_summary.json").read_text())
        evaluation = json.loads((folder / "eval.json").read_text())
        loads = [entry["expert_load/max_over_mean_load"] for entry in logged if "expert_load/max_over_mean_load" in entry]
        # The logged MTP loss is weighted (lambda / D * sum_k CE_k): divided by lambda it is the MTP cross-entropy
        # averaged over the depths, comparable with the LM loss.
        weight = json.loads((folder / "config.json").read_text()).get("mtp_loss_weight", 0.0)
        mtp = [entry["mtp_loss"] / weight if weight and "mtp_loss" in entry else None for entry in logged]
        summary[name] = {
            "steps": [entry["step"] for entry in logged],
            "lm_loss": [entry["lm_loss"] for entry in logged],
            "mtp_cross_entropy": mtp,
            "max_over_mean_load": loads,
            "final_lm_loss": logged[-1]["lm_loss"],
            "held_out_perplexity": evaluation["perplexity"],
            "held_out_max_over_mean_load": evaluation["expert_load"].get("max_over_mean_load"),
            "tokens": train["tokens"],
            "tokens_per_s": train["tokens_per_s"],
            "mfu": train["mfu"],
            "device": train["device"],
        }
    return summary


def table(summary: dict) -> str:
    lines = ["| run | final train LM loss | held-out perplexity | held-out max/mean load | max/mean load, last quarter "
             "of training | tokens | tokens/s | MFU |", "|---|---|---|---|---|---|---|---|"]
    for name, row in summary.items():
        loads = row["max_over_mean_load"]
        late = loads[len(loads) * 3 // 4:] or loads
        mfu = f"{row['mfu']:.1%}" if row["mfu"] else "-"
        lines.append(f"| {name} | {row['final_lm_loss']:.3f} | {row['held_out_perplexity']:.2f} | "
                     f"{row['held_out_max_over_mean_load']:.2f} | {sum(late) / len(late):.2f} | {row['tokens']:,} | "
                     f"{row['tokens_per_s']:,.0f} | {mfu} |")
    return "\n".join(lines)


def plot(summary: dict, path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib, then --plot-only)")
        return False
    fig, (loss_ax, load_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, row in summary.items():
        line, = loss_ax.plot(row["steps"], row["lm_loss"], label=f"{name}: LM loss")
        mtp = [(step, value) for step, value in zip(row["steps"], row["mtp_cross_entropy"]) if value is not None]
        if mtp:
            loss_ax.plot(*zip(*mtp), linestyle="--", color=line.get_color(), label=f"{name}: MTP loss (depth 1)")
        load_ax.plot(row["steps"][-len(row["max_over_mean_load"]):], row["max_over_mean_load"], label=name)
    loss_ax.set(xlabel="optimizer step", ylabel="training cross-entropy (nats/token)", title="Loss")
    loss_ax.set_yscale("log")
    loss_ax.legend(fontsize=8)
    load_ax.set(xlabel="optimizer step", ylabel="busiest expert / mean, mean over MoE layers",
                title="Expert load, max / mean (1.0 = balanced)")
    load_ax.axhline(1.0, color="gray", linewidth=0.5)
    load_ax.legend(fontsize=8)
    device = next(iter(summary.values()))["device"]
    fig.suptitle(f"{title} ({device})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
    return True


def main():
    args = parse_args()
    output = Path(args.output_dir)
    if not args.plot_only:
        output.mkdir(parents=True, exist_ok=True)
        tokenizer = output / "tokenizer"
        if not (tokenizer / "tokenizer.json").exists():
            train_tokenizer(tokenizer, args.vocab_size)
        for name in args.runs:
            run([sys.executable, REPO / "examples" / "pretrain.py", "--preset", args.preset,
                 "--tokenizer", tokenizer, "--vocab-size", args.vocab_size, "--block-size", args.block_size,
                 "--batch-size", args.batch_size, "--max-steps", args.max_steps, "--lr", args.lr,
                 "--warmup-steps", args.warmup_steps, "--logging-steps", args.logging_steps,
                 "--max-eval-blocks", "0", "--output-dir", output / name, *([] if args.no_bf16 else ["--bf16"]),
                 *(["--torch-compile"] if args.torch_compile else []),
                 *RUNS[name]])
            run([sys.executable, REPO / "examples" / "evaluate.py", "--model", output / name,
                 "--block-size", args.block_size, "--max-blocks", args.eval_blocks, "--batch-size", 16,
                 "--json", output / name / "eval.json"])
    if args.plot_only and (output / "summary.json").exists():
        summary = json.loads((output / "summary.json").read_text())
    else:
        summary = summarize(output, [name for name in RUNS if (output / name / "eval.json").exists()])
        (output / "summary.json").write_text(json.dumps(summary, indent=1))
    text = table(summary)
    (output / "summary.md").write_text(text + "\n")
    print(text)
    title = f"DeepSeek-V3 preset {args.preset} pretrained from scratch on the Python standard library"
    plot(summary, Path(args.png) if args.png else output / "curves.png", title)


if __name__ == "__main__":
    main()
