"""Pretrain DeepSeek-V3 from scratch on local text, offline, with the transformers Trainer.

A preset from `configuration/` (optionally resized), a byte-level BPE tokenizer trained on the training documents
(or `--tokenizer PATH`), documents packed into `--block-size` blocks with EOS between them, and
`DeepseekV3Trainer`: the LM + MTP + balance loss, the auxiliary-loss-free bias update after every optimizer step,
and `lm_loss` / `mtp_loss` / `aux_loss` / expert-load statistics in the logs. The default corpus is the Python
standard library's own sources (5% of the files held out), so nothing is downloaded.

    python examples/pretrain.py --max-steps 200 --output-dir out/tiny
    python examples/pretrain.py --train-files "docs/**/*.md" notes.txt --block-size 128 --streaming
    python examples/pretrain.py --preset deepseek-v3-tiny --hidden-size 128 --num-layers 4 --vocab-size 1024 \\
        --batch-size 16 --grad-accum 2 --lr 1e-3 --no-mtp --no-balancing --bf16 --gradient-checkpointing
    python examples/evaluate.py --model out/tiny

Writes to `--output-dir`: the model (`save_pretrained`, official layout), its tokenizer, the Trainer's
`log_history.json` and `train_summary.json` (tokens/s, MFU on a known GPU). Prints tokens/s at the end. `examples/finetune.py` reuses this file's training helpers.
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, TrainingArguments, default_data_collator, set_seed

import modeling_deepseek_v3  # registers the classes with the Auto API
from modeling_deepseek_v3.data import (
    add_data_arguments,
    block_datasets_from_args,
    check_tokenizer_fits,
    documents_from_args,
    train_bpe_tokenizer,
)
from modeling_deepseek_v3.training import (
    DeepseekV3Trainer,
    peak_bf16_flops,
    set_activation_checkpointing,
    training_flops_per_token,
)

PRESETS = Path(__file__).resolve().parent.parent / "configuration"


def add_training_arguments(parser: argparse.ArgumentParser, lr: float, output_dir: str) -> None:
    """Options shared by pretrain.py and finetune.py: optimization, precision, the DeepSeek-V3 switches, output."""
    group = parser.add_argument_group("training")
    group.add_argument("--max-steps", type=int, default=200, help="optimizer steps (default: %(default)s)")
    group.add_argument("--batch-size", type=int, default=8, help="blocks per micro-batch (default: %(default)s)")
    group.add_argument("--grad-accum", type=int, default=1,
                       help="micro-batches per optimizer step (default: %(default)s)")
    group.add_argument("--lr", type=float, default=lr, help="peak learning rate, cosine decay (default: %(default)s)")
    group.add_argument("--warmup-steps", type=int, default=0, help="linear warmup (default: %(default)s)")
    group.add_argument("--weight-decay", type=float, default=0.1,
                       help="AdamW, betas (0.9, 0.95) (default: %(default)s)")
    group.add_argument("--logging-steps", type=int, default=10, help="log every N steps (default: %(default)s)")
    group.add_argument("--output-dir", default=output_dir,
                       help="model, tokenizer, log_history.json (default: %(default)s)")
    group.add_argument("--no-mtp", action="store_true", help="train without the MTP loss (config.mtp_loss_weight = 0)")
    group.add_argument("--no-balancing", action="store_true",
                       help="no auxiliary-loss-free bias update (config.bias_update_speed = 0)")
    group.add_argument("--bf16", action="store_true", help="bfloat16 autocast (weights stay float32)")
    group.add_argument("--gradient-checkpointing", action="store_true", help="recompute layer activations in backward")
    group.add_argument("--torch-compile", action="store_true",
                       help="torch.compile the model (TrainingArguments.torch_compile): fuses the elementwise work; "
                            "a one-off compile before the first step")
    group.add_argument("--cuda-graph-step", action="store_true",
                       help="replay each micro-batch's forward + backward as a CUDA graph (DeepseekV3Trainer's "
                            "cuda_graph_step): one launch a step instead of thousands; one GPU, full blocks")


def apply_training_switches(config, args: argparse.Namespace) -> None:
    """`--no-mtp` and `--no-balancing` on a model config (the MTP layers stay; they are just not trained)."""
    if args.no_mtp:
        config.mtp_loss_weight = 0.0
    if args.no_balancing:
        config.bias_update_speed = 0.0


def load_tokenizer_or_exit(path: str) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained(path)`, or exit with a message naming the folder."""
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise SystemExit(f"no tokenizer could be loaded from {path!r} ({error}); pass --tokenizer PATH")


def check_block_size(config, block_size: int) -> None:
    """Stop with a message when a block is longer than the model's positions."""
    if block_size > config.max_position_embeddings:
        raise SystemExit(f"--block-size {block_size} exceeds the model's max_position_embeddings "
                         f"{config.max_position_embeddings}")


def train_and_save(args: argparse.Namespace, model, tokenizer: PreTrainedTokenizerBase, description: str,
                   train_documents, validation_documents) -> None:
    """Pack the documents, train with `DeepseekV3Trainer`, evaluate on the held-out blocks, save the model and
    the tokenizer to `--output-dir` with `log_history.json`, and print tokens/s."""
    print(f"data: {description}: {len(train_documents)} training documents, {len(validation_documents)} held out")
    train_dataset, eval_dataset = block_datasets_from_args(args, train_documents, validation_documents, tokenizer)
    if not args.streaming:
        print(f"train: {len(train_dataset)} blocks of {args.block_size} tokens "
              f"({train_dataset.dropped_tokens} tokens of the last incomplete block dropped); "
              f"{len(eval_dataset) if eval_dataset is not None else 0} held-out blocks for evaluation")
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.95,  # the paper's AdamW betas
        max_grad_norm=1.0,
        bf16=args.bf16,
        use_cpu=args.bf16 and not torch.cuda.is_available(),  # bf16 autocast off CUDA needs an explicit CPU device
        logging_steps=args.logging_steps,
        logging_first_step=True,
        save_strategy="no",  # the final model is saved below, in the official layout
        eval_strategy="no",
        prediction_loss_only=True,  # evaluation keeps no logits (vocab-sized per token)
        include_num_input_tokens_seen="all",
        report_to="none",
        dataloader_pin_memory=torch.cuda.is_available(),
        seed=args.seed,
        torch_compile=args.torch_compile,
    )
    if args.gradient_checkpointing:
        # On the model rather than through TrainingArguments: transformers 5.23 renamed the field too.
        set_activation_checkpointing(model, True)
    trainer = DeepseekV3Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=default_data_collator,
        processing_class=tokenizer,
        cuda_graph_step=args.cuda_graph_step,
    )
    result = trainer.train()
    if eval_dataset is not None:
        metrics = trainer.evaluate()
        print(f"held-out loss (LM + MTP + balance terms): {metrics['eval_loss']:.4f}; "
              f"examples/evaluate.py gives the LM perplexity")

    output_dir = Path(args.output_dir)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    (output_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    tokens = trainer.state.num_input_tokens_seen
    seconds = result.metrics["train_runtime"]
    # MFU: model FLOPs (6 per weight a token uses, plus causal attention; MTP only when trained) over the GPU's
    # dense bf16 peak. The Trainer's runtime includes data loading, logging and the bias update.
    config = model.config
    flops = training_flops_per_token(config, args.block_size, include_mtp=config.mtp_loss_weight > 0) * tokens
    peak = peak_bf16_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    summary = {"steps": trainer.state.global_step, "tokens": tokens, "seconds": seconds,
               "tokens_per_s": tokens / seconds, "model_flops": flops,
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "mfu": flops / seconds / peak if peak else None}
    (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
    print(f"saved the model, tokenizer, log_history.json and train_summary.json to {output_dir}")
    mfu = f", MFU {summary['mfu']:.1%} of the {summary['device']} bf16 peak" if summary["mfu"] else ""
    print(f"trained {trainer.state.global_step} steps, {tokens:,} tokens in {seconds:.1f} s: "
          f"{tokens / seconds:,.0f} tokens/s{mfu}")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--preset", default="deepseek-v3-tiny", help="config in configuration/ (default: %(default)s)")
    model.add_argument("--hidden-size", type=int, help="override the preset's hidden_size")
    model.add_argument("--num-layers", type=int, help="override the preset's num_hidden_layers")
    model.add_argument("--vocab-size", type=int,
                       help="model vocabulary, and the size of the trained BPE (default: the preset's, or the "
                            "size of --tokenizer)")
    model.add_argument("--tokenizer", help="a local tokenizer folder (default: train a byte-level BPE on the data)")
    add_data_arguments(parser)
    add_training_arguments(parser, lr=1e-3, output_dir="out/pretrain")
    return parser.parse_args()


def preset_fields(args: argparse.Namespace) -> dict:
    path = PRESETS / f"{args.preset}.json"
    if not path.exists():
        names = sorted(p.stem for p in PRESETS.glob("*.json"))
        raise SystemExit(f"unknown preset {args.preset!r}: expected one of {names}")
    fields = json.loads(path.read_text())
    overrides = {"hidden_size": args.hidden_size, "num_hidden_layers": args.num_layers}
    fields.update({name: value for name, value in overrides.items() if value is not None})
    return fields


def main():
    args = parse_args()
    set_seed(args.seed)
    fields = preset_fields(args)
    train_documents, validation_documents, description = documents_from_args(args)

    if args.tokenizer is not None:
        tokenizer = load_tokenizer_or_exit(args.tokenizer)
        fields["vocab_size"] = args.vocab_size or len(tokenizer)
    else:
        fields["vocab_size"] = args.vocab_size or fields["vocab_size"]
        print(f"training a byte-level BPE tokenizer (vocabulary {fields['vocab_size']}) on {description}")
        tokenizer = train_bpe_tokenizer(train_documents, fields["vocab_size"])
    check_tokenizer_fits(tokenizer, fields["vocab_size"], source=args.tokenizer or "the trained tokenizer")
    fields.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)

    config = modeling_deepseek_v3.DeepseekV3Config(**fields)
    apply_training_switches(config, args)
    check_block_size(config, args.block_size)
    model = modeling_deepseek_v3.DeepseekV3ForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.preset} ({n_params / 1e6:.2f}M parameters, hidden {config.hidden_size}, "
          f"{config.num_hidden_layers} layers, vocabulary {config.vocab_size}, MTP weight {config.mtp_loss_weight}, "
          f"bias update speed {config.bias_update_speed})")
    train_and_save(args, model, tokenizer, description, train_documents, validation_documents)


if __name__ == "__main__":
    main()
