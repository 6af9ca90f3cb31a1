"""The official DeepSeek-V3 checkpoint layout, and how it maps onto the in-memory modules.

On disk (official Hugging Face layout, REFERENCE.md section 1) every routed expert is three 2D weights:
`model.layers.{L}.mlp.experts.{e}.{gate_proj,up_proj,down_proj}.weight`. In memory the experts of a layer are two
fused 3D tensors so that they can run as grouped GEMMs:

| on disk (per expert e)                       | in memory                                  |
|----------------------------------------------|--------------------------------------------|
| mlp.experts.{e}.gate_proj.weight [I, D]      | mlp.experts.gate_up_proj [E, 2I, D] rows :I |
| mlp.experts.{e}.up_proj.weight   [I, D]      | mlp.experts.gate_up_proj [E, 2I, D] rows I: |
| mlp.experts.{e}.down_proj.weight [D, I]      | mlp.experts.down_proj    [E, D, I]          |

The MTP modules (`model.layers.{num_hidden_layers + k}`) also store copies of the shared embedding and output
head (`embed_tokens.weight`, `shared_head.head.weight`). The model shares them with the main model as in the
paper: the copies are skipped on load (`MTP_SHARED_COPY_PATTERN`) and written back on save (`mtp_shared_copies`).

Every other key is the same on disk and in memory. The table is handed to transformers' weight-conversion
machinery (the one its built-in MoE models use), which applies it on `from_pretrained` and reverses it on
`save_pretrained`, shard by shard and with `device_map`.
"""

import torch
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

# Keys of the MTP layers that hold copies of weights shared with the main model (regex, matched on load).
MTP_SHARED_COPY_PATTERN = r"(^|\.)layers\.\d+\.(embed_tokens|shared_head\.head)\.weight$"


def official_expert_layout() -> list:
    """The routed-expert merge of the table above, as transformers `WeightConverter`s (checkpoint -> memory)."""
    return [
        WeightConverter(
            source_patterns=["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"],
            target_patterns="mlp.experts.gate_up_proj",
            operations=[MergeModulelist(dim=0), Concatenate(dim=1)],
        ),
        WeightConverter(
            source_patterns="mlp.experts.*.down_proj.weight",
            target_patterns="mlp.experts.down_proj",
            operations=[MergeModulelist(dim=0)],
        ),
    ]


def register_official_layout(model_type: str = "deepseek_v3") -> None:
    """Register the layout for `model_type`.

    transformers skips its built-in conversions for custom-code models unless the user registered them, so this
    registration is what makes `from_pretrained`/`save_pretrained` of this package's classes use the official
    per-expert keys. The converters are the same ones transformers' built-in `deepseek_v3` uses (its fused
    parameters have the same names and shapes), so registering them under the shared model type leaves the
    built-in model's loading unchanged; the parity tests load both classes in one process and hold that.
    """
    register_checkpoint_conversion_mapping(model_type, official_expert_layout(), overwrite=True)


def mtp_shared_copies(model, state_dict: dict) -> dict:
    """Return `state_dict` plus the MTP layers' stored copies of the embedding and output head.

    `model` is a `DeepseekV3Model` or `DeepseekV3ForCausalLM`; keys follow the model's own prefix. The copies are
    clones: safetensors refuses aliased tensors. Weights offloaded to `meta` are left for the caller to report.
    """
    config = model.config
    prefix = "model." if hasattr(model, "lm_head") else ""
    embed = state_dict.get(f"{prefix}embed_tokens.weight")
    head = state_dict.get("lm_head.weight")
    out = dict(state_dict)
    for k in range(config.num_nextn_predict_layers):
        layer = f"{prefix}layers.{config.num_hidden_layers + k}"
        for key, tensor in ((f"{layer}.embed_tokens.weight", embed), (f"{layer}.shared_head.head.weight", head)):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                out[key] = tensor.detach().clone()
    return out


__all__ = ["MTP_SHARED_COPY_PATTERN", "mtp_shared_copies", "official_expert_layout", "register_official_layout"]
