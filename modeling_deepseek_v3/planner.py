"""`deepseek-v3-plan`: where `from_pretrained(device_map=...)` will put each layer, and whether it fits.

The plan is computed the way `from_pretrained` computes it: the model is built on the meta device (no memory)
and handed to transformers' own device-map resolution (accelerate's planner, decoder and MTP layers never split),
so the printed map is the one a load with the same `max_memory` gets (a test holds them equal). On top of the
weights it adds the latent KV cache each device holds for a context and batch: (kv_lora_rank + qk_rope_head_dim)
values per token per decoder layer.

    deepseek-v3-plan --config configuration/deepseek-v3-671b.json --gpus 8 --gpu-memory 141GiB --dtype bf16 \\
        --context 32768 --batch 4
"""

import argparse
import json
import logging
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

from .configuration_deepseek_v3 import DeepseekV3Config
from .modeling_deepseek_v3 import DeepseekV3ForCausalLM
from .official_checkpoint import device_for

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'141GiB' / '80GB' / '300KB' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"memory size: expected a number with a unit such as 141GiB or 80GB, found {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def meta_model(config: DeepseekV3Config, dtype: torch.dtype) -> DeepseekV3ForCausalLM:
    """The model on the meta device in `dtype` (routing bias kept float32, as a load keeps it)."""
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config).to(dtype)
    for router in model.expert_routers():
        if router.e_score_correction_bias is not None:
            router.e_score_correction_bias.data = router.e_score_correction_bias.data.float()
    return model


def plan(config: DeepseekV3Config, max_memory: dict, dtype: torch.dtype = torch.bfloat16, device_map: str = "auto",
         context: int = 0, batch: int = 1) -> dict:
    """Placement of `config`'s model under `max_memory` ({device: bytes or size string}).

    Returns {"device_map": {module: device}, "devices": {device: {"weights": bytes, "cache": bytes,
    "layers": [indices], "budget": bytes or None}}, "fits": bool} where cache is the latent cache of
    `context` x `batch` tokens for the decoder layers on that device and fits means every device's weights + cache
    stay within its budget and nothing lands on "disk".
    """
    from transformers.integrations.accelerate import _get_device_map

    config = DeepseekV3Config.from_dict(config.to_dict())
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # loads dequantize FP8 to `dtype`
    model = meta_model(config, dtype)
    budgets = {k: parse_size(v) if isinstance(v, str) else int(v) for k, v in max_memory.items()}
    accelerate_logger = logging.getLogger("accelerate")
    level = accelerate_logger.level
    accelerate_logger.setLevel(logging.ERROR)  # "Device 3 is not available": planning for another machine
    try:
        resolved = _get_device_map(model, device_map, dict(budgets), None)
    finally:
        accelerate_logger.setLevel(level)

    devices = defaultdict(lambda: {"weights": 0, "cache": 0, "layers": []})
    cache_per_layer = (config.kv_lora_rank + config.qk_rope_head_dim) * torch.empty((), dtype=dtype).element_size()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        device = device_for(name, resolved, default=None)
        devices[device]["weights"] += tensor.numel() * tensor.element_size()
    for layer in range(config.num_hidden_layers + config.num_nextn_predict_layers):
        device = device_for(f"model.layers.{layer}", resolved, default=None)
        devices[device]["layers"].append(layer)
        if layer < config.num_hidden_layers:  # the MTP layers hold no cache in decoding
            devices[device]["cache"] += cache_per_layer * context * batch
    for device, stats in devices.items():
        stats["budget"] = budgets.get(device)
        stats["layers"].sort()
    fits = all(d != "disk" and (s["budget"] is None or s["weights"] + s["cache"] <= s["budget"])
               for d, s in devices.items())
    return {"device_map": resolved, "devices": dict(devices), "fits": fits}


def _layers_text(layers: list) -> str:
    if not layers:
        return "-"
    ranges, start = [], layers[0]
    for prev, cur in zip(layers, layers[1:] + [None]):
        if cur != prev + 1:
            ranges.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ",".join(ranges)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="deepseek-v3-plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config.json (e.g. configuration/deepseek-v3-671b.json)")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--gpu-memory", default="80GiB", help="per GPU (default: %(default)s)")
    parser.add_argument("--cpu-memory", default=None, help="host memory for offload (default: none)")
    parser.add_argument("--dtype", default="bf16", help="bf16 or fp32 (FP8 releases are dequantized on load)")
    parser.add_argument("--device-map", default="auto", choices=["auto", "balanced", "balanced_low_0", "sequential"])
    parser.add_argument("--context", type=int, default=0, help="tokens of latent cache per sequence")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        if args.dtype not in DTYPES:
            raise ValueError(f"--dtype: expected bf16 or fp32, found {args.dtype!r} (this package dequantizes FP8 "
                             "checkpoints on load; FP8 weights in memory are not supported yet)")
        config = DeepseekV3Config.from_dict(json.loads(Path(args.config).read_text()))
        budget = {i: args.gpu_memory for i in range(args.gpus)}
        if args.cpu_memory:
            budget["cpu"] = args.cpu_memory
        result = plan(config, budget, DTYPES[args.dtype], args.device_map, args.context, args.batch)
    except (OSError, ValueError) as error:
        print(f"deepseek-v3-plan: error: {error}", file=sys.stderr)
        return 1
    gib = 2**30
    print(f"{args.config}: {config.num_hidden_layers} layers + {config.num_nextn_predict_layers} MTP, {args.dtype}, "
          f"{args.gpus} x {args.gpu_memory}" + (f" + cpu {args.cpu_memory}" if args.cpu_memory else "")
          + f", latent cache for {args.batch} x {args.context} tokens")
    print(f"{'device':<8} {'layers':<16} {'weights GiB':>12} {'cache GiB':>10} {'total GiB':>10} {'budget GiB':>11}")
    order = sorted(result["devices"], key=lambda d: (isinstance(d, str), str(d)))
    for device in order:
        s = result["devices"][device]
        budget_text = f"{s['budget'] / gib:11.1f}" if s["budget"] is not None else f"{'-':>11}"
        print(f"{str(device):<8} {_layers_text(s['layers']):<16} {s['weights'] / gib:12.1f} {s['cache'] / gib:10.2f} "
              f"{(s['weights'] + s['cache']) / gib:10.1f} {budget_text}")
    total = sum(s["weights"] for s in result["devices"].values())
    host = result["devices"].get("cpu", {}).get("weights", 0)
    if not result["fits"]:
        verdict = "does NOT fit (layers spill to disk or a device exceeds its budget)"
    elif host:
        verdict = f"fits, with {host / gib:.1f} GiB offloaded to the CPU (slow: weights cross PCIe every step)"
    else:
        verdict = "fits on the GPUs"
    print(f"weights {total / gib:.1f} GiB; {verdict}")
    return 0


__all__ = ["main", "parse_size", "plan"]
