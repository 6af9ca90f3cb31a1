"""Fine-tune a DeepSeek-V3 checkpoint on local text, offline: `examples/pretrain.py` starting from `--model`.

The checkpoint (any folder the package loads: saved by this package, transformers' built-in format, the official
release) and its tokenizer are loaded, the documents are packed into `--block-size` blocks as in pretraining, and
`DeepseekV3Trainer` trains with the same options (MTP, bias update, bf16, gradient checkpointing).

    python examples/finetune.py --model out/tiny --train-files my_notes/ --max-steps 100 --output-dir out/tiny-ft
    python examples/finetune.py --model out/tiny --tokenizer out/tiny --lr 5e-5 --no-mtp --streaming
    python examples/evaluate.py --model out/tiny-ft --files my_notes/

Writes the fine-tuned model, the tokenizer and `log_history.json` to `--output-dir` and prints tokens/s. Uses the
training helpers of `examples/pretrain.py`, which must sit in the same folder.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, set_seed

import modeling_deepseek_v3  # noqa: F401  (registers the classes with the Auto API)
from modeling_deepseek_v3.data import add_data_arguments, check_tokenizer_fits, documents_from_args
from pretrain import (
    add_training_arguments,
    apply_training_switches,
    check_block_size,
    load_tokenizer_or_exit,
    train_and_save,
)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, help="checkpoint folder to start from")
    model.add_argument("--tokenizer", help="tokenizer folder (default: the one in --model)")
    add_data_arguments(parser)
    add_training_arguments(parser, lr=1e-4, output_dir="out/finetune")
    return parser.parse_args()


def main():
    args = parse_args()
    set_seed(args.seed)
    tokenizer_path = args.tokenizer or args.model
    tokenizer = load_tokenizer_or_exit(tokenizer_path)
    # float32 master weights; --bf16 autocasts the compute.
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    check_tokenizer_fits(tokenizer, model.config.vocab_size, source=f"the tokenizer in {tokenizer_path!r}")
    apply_training_switches(model.config, args)
    check_block_size(model.config, args.block_size)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.model} ({n_params / 1e6:.2f}M parameters), MTP weight {model.config.mtp_loss_weight}, "
          f"bias update speed {model.config.bias_update_speed}")
    train_documents, validation_documents, description = documents_from_args(args)
    train_and_save(args, model, tokenizer, description, train_documents, validation_documents)


if __name__ == "__main__":
    main()
