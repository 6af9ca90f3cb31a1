"""Bytes autograd keeps for backward in one training forward (distinct storages, `saved_tensors_hooks`), with and
without `config.training_kernels`, on the CPU: the fused kernels run through Triton's interpreter, so set
TRITON_INTERPRET=1 (and DEEPSEEK_V3_PDL=0) in the environment; the CUDA-only switch is forced onto CPU tensors.

    TRITON_INTERPRET=1 DEEPSEEK_V3_PDL=0 python benchmarks/saved_bytes.py --preset deepseek-v3-lite --layers 2 --tokens 512
"""

import argparse
import json
import os
from pathlib import Path

import torch

import modeling_deepseek_v3.modeling_deepseek_v3 as modeling
from modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM

PRESETS = Path(__file__).resolve().parent.parent / "configuration"


def saved_mib(model, ids) -> tuple[float, float]:
    """(MiB of distinct storages saved for backward by one forward with labels, the loss)."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids).loss
    return sum(saved.values()) / 2**20, loss.item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="deepseek-v3-lite")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--moe-implementation", default="grouped_mm", choices=["grouped_mm", "eager"],
                        help="the routed experts' compute (grouped_mm: as in GPU training)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("saved_bytes.py: set TRITON_INTERPRET=1 (the fused kernels run in Triton's interpreter)")
    modeling.decode_kernels_available = lambda x: True  # the training switch on CPU tensors
    fields = json.loads((PRESETS / f"{args.preset}.json").read_text())
    fields.update(num_hidden_layers=args.layers, num_nextn_predict_layers=0, moe_implementation=args.moe_implementation)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM._from_config(DeepseekV3Config(**fields), dtype=torch.bfloat16).train()
    ids = torch.randint(2, model.config.vocab_size, (1, args.tokens))
    print(f"{args.preset} cut to {args.layers} layers, bf16, {args.tokens} tokens, {args.moe_implementation} experts")
    for setting in (False, True):
        model.config.training_kernels = setting
        mib, loss = saved_mib(model, ids)
        print(f"training_kernels={setting}: {mib:,.1f} MiB saved for backward (loss {loss:.4f})")


if __name__ == "__main__":
    main()
