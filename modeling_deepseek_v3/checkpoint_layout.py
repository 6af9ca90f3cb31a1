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

import re
from dataclasses import dataclass

import torch
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

# Keys of the MTP layers that hold copies of weights shared with the main model (regex, matched on load).
MTP_SHARED_COPY_PATTERN = r"(^|\.)layers\.\d+\.(embed_tokens|shared_head\.head)\.weight$"

# Official per-expert projection -> (fused in-memory parameter, half of gate_up_proj: 0 gate rows, 1 up rows).
EXPERT_PROJECTIONS = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", None)}
_EXPERT_KEY = re.compile(r"(?P<prefix>.*\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the official checkpoint: its shape, whether the FP8 release block-quantizes it (and so stores
    a `weight_scale_inv` beside it), and whether it is kept in float32."""

    shape: tuple
    fp8: bool = False
    float32: bool = False


def official_tensor_specs(config) -> dict:
    """Every tensor of an official-layout checkpoint for `config`, by name (REFERENCE.md sections 1-2), without
    the `weight_scale_inv` companions. Quantized (`fp8=True`): every nn.Linear inside decoder and MTP layers
    except `eh_proj`; embeddings, heads, norms, the router and its bias stay high precision."""
    D, V = config.hidden_size, config.vocab_size
    H = config.num_attention_heads
    qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
    specs = {
        "model.embed_tokens.weight": TensorSpec((V, D)),
        "model.norm.weight": TensorSpec((D,)),
        "lm_head.weight": TensorSpec((V, D)),
    }

    def mlp(prefix, width):
        specs[f"{prefix}.gate_proj.weight"] = TensorSpec((width, D), fp8=True)
        specs[f"{prefix}.up_proj.weight"] = TensorSpec((width, D), fp8=True)
        specs[f"{prefix}.down_proj.weight"] = TensorSpec((D, width), fp8=True)

    for layer in range(config.num_hidden_layers + config.num_nextn_predict_layers):
        p = f"model.layers.{layer}"
        specs[f"{p}.input_layernorm.weight"] = TensorSpec((D,))
        specs[f"{p}.post_attention_layernorm.weight"] = TensorSpec((D,))
        a = f"{p}.self_attn"
        if config.q_lora_rank is None:
            specs[f"{a}.q_proj.weight"] = TensorSpec((H * qk_head_dim, D), fp8=True)
        else:
            specs[f"{a}.q_a_proj.weight"] = TensorSpec((config.q_lora_rank, D), fp8=True)
            specs[f"{a}.q_a_layernorm.weight"] = TensorSpec((config.q_lora_rank,))
            specs[f"{a}.q_b_proj.weight"] = TensorSpec((H * qk_head_dim, config.q_lora_rank), fp8=True)
        specs[f"{a}.kv_a_proj_with_mqa.weight"] = TensorSpec((config.kv_lora_rank + config.qk_rope_head_dim, D), fp8=True)
        specs[f"{a}.kv_a_layernorm.weight"] = TensorSpec((config.kv_lora_rank,))
        specs[f"{a}.kv_b_proj.weight"] = TensorSpec(
            (H * (config.qk_nope_head_dim + config.v_head_dim), config.kv_lora_rank), fp8=True
        )
        specs[f"{a}.o_proj.weight"] = TensorSpec((D, H * config.v_head_dim), fp8=True)
        if config.is_moe_layer(layer):
            specs[f"{p}.mlp.gate.weight"] = TensorSpec((config.n_routed_experts, D))
            if config.topk_method == "noaux_tc":
                specs[f"{p}.mlp.gate.e_score_correction_bias"] = TensorSpec((config.n_routed_experts,), float32=True)
            for e in range(config.n_routed_experts):
                mlp(f"{p}.mlp.experts.{e}", config.moe_intermediate_size)
            if config.n_shared_experts:
                mlp(f"{p}.mlp.shared_experts", config.moe_intermediate_size * config.n_shared_experts)
        else:
            mlp(f"{p}.mlp", config.intermediate_size)
        if layer >= config.num_hidden_layers:
            specs[f"{p}.enorm.weight"] = TensorSpec((D,))
            specs[f"{p}.hnorm.weight"] = TensorSpec((D,))
            specs[f"{p}.eh_proj.weight"] = TensorSpec((D, 2 * D))
            specs[f"{p}.embed_tokens.weight"] = TensorSpec((V, D))
            specs[f"{p}.shared_head.norm.weight"] = TensorSpec((D,))
            specs[f"{p}.shared_head.head.weight"] = TensorSpec((V, D))
    return specs


def is_mtp_shared_copy(key: str) -> bool:
    return re.search(MTP_SHARED_COPY_PATTERN, key) is not None


def official_key_to_parameter(key: str) -> tuple:
    """Map an official key to (in-memory parameter name, expert index or None, gate_up half or None):
    `...mlp.experts.17.up_proj.weight` -> (`...mlp.experts.gate_up_proj`, 17, 1); other keys map to themselves."""
    match = _EXPERT_KEY.fullmatch(key)
    if match is None:
        return key, None, None
    param, half = EXPERT_PROJECTIONS[match["proj"]]
    return f"{match['prefix']}.{param}", int(match["expert"]), half


# The official inference ("mp") format of deepseek-ai/DeepSeek-V3 `inference/convert.py` (REFERENCE.md section 6):
# module leaf -> (name in that format, dim split across model-parallel ranks or None for replicated). Routed
# experts are never split: expert e goes whole to rank e // (E / MP).
INFERENCE_LEAVES = {
    "embed_tokens": ("embed", 0), "input_layernorm": ("attn_norm", None), "post_attention_layernorm": ("ffn_norm", None),
    "q_proj": ("wq", 0), "q_a_proj": ("wq_a", None), "q_a_layernorm": ("q_norm", None), "q_b_proj": ("wq_b", 0),
    "kv_a_proj_with_mqa": ("wkv_a", None), "kv_a_layernorm": ("kv_norm", None), "kv_b_proj": ("wkv_b", 0),
    "o_proj": ("wo", 1), "gate": ("gate", None), "gate_proj": ("w1", 0), "down_proj": ("w2", 1), "up_proj": ("w3", 0),
    "norm": ("norm", None), "lm_head": ("head", 0),
}
INFERENCE_CONTAINERS = {"self_attn": "attn", "mlp": "ffn"}
INFERENCE_TENSORS = {"weight": "weight", "weight_scale_inv": "scale", "e_score_correction_bias": "bias"}


def to_inference_name(key: str) -> tuple:
    """Official HF key -> (inference-format name, split dim or None, routed expert index or None)."""
    parts = key.removeprefix("model.").split(".")
    leaf = parts[-2]
    if leaf not in INFERENCE_LEAVES or parts[-1] not in INFERENCE_TENSORS:
        raise KeyError(f"{key}: no name in the official inference format")
    new_leaf, dim = INFERENCE_LEAVES[leaf]
    expert = None
    if "experts" in parts and "shared_experts" not in parts:
        expert, dim = int(parts[parts.index("experts") + 1]), None
    renamed = [INFERENCE_CONTAINERS.get(p, p) for p in parts[:-2]] + [new_leaf, INFERENCE_TENSORS[parts[-1]]]
    return ".".join(renamed), dim, expert


def from_inference_name(name: str) -> str:
    """Inference-format name -> official HF key (inverse of `to_inference_name`)."""
    leaves = {v[0]: k for k, v in INFERENCE_LEAVES.items()}
    containers = {v: k for k, v in INFERENCE_CONTAINERS.items()}
    tensors = {v: k for k, v in INFERENCE_TENSORS.items()}
    parts = name.split(".")
    if len(parts) < 2 or parts[-2] not in leaves or parts[-1] not in tensors:
        raise KeyError(f"{name}: not a name of the official inference format")
    key = ".".join([containers.get(p, p) for p in parts[:-2]] + [leaves[parts[-2]], tensors[parts[-1]]])
    return key if key.startswith("lm_head.") else "model." + key


def official_expert_layout() -> list:
    """The routed-expert merge of the table above, as transformers `WeightConverter`s (checkpoint -> memory)."""
    gate_up = sorted((half, proj) for proj, (param, half) in EXPERT_PROJECTIONS.items() if param == "gate_up_proj")
    return [
        WeightConverter(
            source_patterns=[f"mlp.experts.*.{proj}.weight" for _, proj in gate_up],
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


__all__ = [
    "EXPERT_PROJECTIONS",
    "INFERENCE_LEAVES",
    "from_inference_name",
    "to_inference_name",
    "MTP_SHARED_COPY_PATTERN",
    "TensorSpec",
    "is_mtp_shared_copy",
    "mtp_shared_copies",
    "official_expert_layout",
    "official_key_to_parameter",
    "official_tensor_specs",
    "register_official_layout",
]
