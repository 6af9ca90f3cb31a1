"""Fine-tune a DeepSeek-V3 checkpoint with LoRA, or QLoRA (`--qlora`: the base model in bitsandbytes 4-bit), offline.

Same data and Trainer as `examples/finetune.py` (local text packed into `--block-size` blocks, `DeepseekV3Trainer`),
but only low-rank adapters train. `--targets` picks the modules (`modeling_deepseek_v3.peft_experts.TARGET_PRESETS`):

    attention       the MLA projections q_a_proj, q_b_proj (or q_proj), kv_a_proj_with_mqa, kv_b_proj, o_proj
    attention+mlp   plus gate_proj / up_proj / down_proj of the dense layers and the shared experts
    all             plus the routed experts: per-expert adapters applied only to each expert's routed tokens

    python examples/finetune_lora.py --model out/tiny --train-files my_notes/ --max-steps 100 --output-dir out/lora
    python examples/finetune_lora.py --model DeepSeek-V3 --qlora --targets all --rank 16 --bf16 --gradient-checkpointing

With `--qlora` every linear and the routed experts are loaded in 4-bit NF4 (straight from the FP8 release too) and
`peft.prepare_model_for_kbit_training` runs first. Writes the adapter (`adapter_model.safetensors`,
`adapter_config.json`), the tokenizer and `log_history.json` to `--output-dir`; `--merge` also writes the base model
with the adapter merged in, in the official layout, to `--output-dir/merged` (not with `--qlora`: load the base
model unquantized and merge there). The routing bias is not an adapter weight, so the auxiliary-loss-free bias
update is off unless `--bias-update-speed` is given. Uses the training helpers of `examples/pretrain.py`.
"""

import argparse
from pathlib import Path

import torch
from peft import get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, set_seed

import modeling_deepseek_v3  # noqa: F401  (registers the classes with the Auto API)
from modeling_deepseek_v3.data import add_data_arguments, check_tokenizer_fits, documents_from_args
from modeling_deepseek_v3.peft_experts import TARGET_PRESETS, lora_config
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
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--targets", default="all", choices=sorted(TARGET_PRESETS), help="default: %(default)s")
    lora.add_argument("--rank", type=int, default=16, help="LoRA rank r (default: %(default)s)")
    lora.add_argument("--alpha", type=int, help="LoRA alpha (default: 2 r)")
    lora.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (default: %(default)s)")
    lora.add_argument("--qlora", action="store_true", help="base model in bitsandbytes 4-bit NF4 (QLoRA)")
    lora.add_argument("--bias-update-speed", type=float, default=0.0,
                      help="routing-bias update gamma (default 0: the adapter does not carry the bias)")
    lora.add_argument("--merge", action="store_true", help="also save the merged model to OUTPUT_DIR/merged")
    add_data_arguments(parser)
    add_training_arguments(parser, lr=2e-4, output_dir="out/finetune-lora")
    return parser.parse_args()


def main():
    args = parse_args()
    if args.merge and args.qlora:
        raise SystemExit("--merge with --qlora: a 4-bit model has no official-layout form; merge the saved adapter "
                         "into the unquantized model instead (peft_experts.load_lora_adapter, merge_and_unload)")
    set_seed(args.seed)
    tokenizer_path = args.tokenizer or args.model
    tokenizer = load_tokenizer_or_exit(tokenizer_path)
    if args.qlora:
        compute = torch.bfloat16 if args.bf16 else torch.float32
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=compute)
        model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quantization, dtype=compute)
        # Freezes the base, casts the remaining bf16 weights to float32, enables input gradients for checkpointing.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)  # --bf16 autocasts
    check_tokenizer_fits(tokenizer, model.config.vocab_size, source=f"the tokenizer in {tokenizer_path!r}")
    apply_training_switches(model.config, args)
    model.config.bias_update_speed = args.bias_update_speed
    check_block_size(model.config, args.block_size)
    if args.gradient_checkpointing and not args.qlora:
        model.enable_input_require_grads()  # the frozen embedding's output must carry gradients into checkpoints
    model = get_peft_model(model, lora_config(args.targets, r=args.rank, lora_alpha=args.alpha,
                                              lora_dropout=args.dropout))
    trainable, total = model.get_nb_trainable_parameters()
    print(f"model: {args.model}{' (4-bit NF4)' if args.qlora else ''}, LoRA r={args.rank} on {args.targets}: "
          f"{trainable / 1e6:.2f}M trainable of {total / 1e6:.2f}M parameters")
    train_documents, validation_documents, description = documents_from_args(args)
    train_and_save(args, model, tokenizer, description, train_documents, validation_documents)
    if args.merge:
        merged_dir = Path(args.output_dir) / "merged"
        model.merge_and_unload().save_pretrained(merged_dir)
        tokenizer.save_pretrained(merged_dir)
        print(f"saved the merged model (official layout) to {merged_dir}")


if __name__ == "__main__":
    main()
