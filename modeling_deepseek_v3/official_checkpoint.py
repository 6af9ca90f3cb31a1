"""Reading and writing checkpoints in the official DeepSeek-V3 layout, FP8 release included.

- `CheckpointReader`: the tensors of a safetensors folder (single file or sharded with an index), opened lazily,
  with errors that name the file and the tensor.
- `load_fp8_checkpoint`: the streaming loader behind `DeepseekV3PreTrainedModel.from_pretrained` for the FP8
  release (`quantization_config.quant_method == "fp8"`). It builds the model on the meta device, then reads one
  shard at a time, dequantizes every FP8 weight exactly (fp8.py) on its target device and places it, so the host
  holds at most one tensor beyond what stays on it. transformers' own FP8 path is not used: it infers block sizes
  from grid shapes (wrong for partial edge blocks) and cannot produce float32.
- `write_official_checkpoint`: writes a model in the official layout, optionally block-quantized to FP8 (the
  tests' and benchmarks' fixtures: several shards, partial edge blocks, the MTP layer).
"""

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint_layout import is_mtp_shared_copy, official_key_to_parameter, official_tensor_specs
from .fp8 import BLOCK_SIZE, FP8_DTYPE, dequantize_fp8_block, quantize_fp8_block

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete, corrupt or does not match its config (the message names file/tensor)."""


def read_weight_map(folder) -> dict | None:
    """{tensor: shard file} from `folder`'s `model.safetensors.index.json` (None without one), checked to name
    only files that exist. Errors name the index file."""
    index_path = Path(folder) / INDEX_NAME
    if not index_path.exists():
        return None
    try:
        weight_map = dict(json.loads(index_path.read_text())["weight_map"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{index_path}: expected JSON with a 'weight_map' object ({error})") from None
    missing = sorted({f for f in weight_map.values() if not (Path(folder) / f).is_file()})
    if missing:
        raise CheckpointError(f"{index_path}: names shard files that do not exist: {', '.join(missing)}")
    return weight_map


class CheckpointReader:
    """Lazy access to the tensors of a safetensors checkpoint folder.

    `weight_map` maps every tensor name to its file (from `model.safetensors.index.json`, or from the headers of
    the `*.safetensors` files when there is no index). Files are memory-mapped on first use.
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: expected a checkpoint folder, found none")
        self._handles = {}
        weight_map = read_weight_map(self.folder)
        if weight_map is not None:
            self.weight_map = weight_map
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.folder}: no *.safetensors files and no {INDEX_NAME}")
            self.weight_map = {key: name for name in files for key in self._open(name).keys()}
        self.files = sorted(set(self.weight_map.values()))

    def _open(self, filename):
        if filename not in self._handles:
            path = self.folder / filename
            try:
                self._handles[filename] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as error:  # safetensors raises its own error types for truncated/corrupt headers
                raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {error}") from None
        return self._handles[filename]

    def keys_in(self, filename: str) -> list:
        """Tensor names the index assigns to `filename`, in file order of the index."""
        return [key for key, name in self.weight_map.items() if name == filename]

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor (on the CPU). Errors name the file and the tensor."""
        filename = self.weight_map.get(key)
        if filename is None:
            raise CheckpointError(f"{self.folder}: no tensor named {key}")
        path = self.folder / filename
        try:
            return self._open(filename).get_tensor(key)
        except CheckpointError:
            raise
        except Exception as error:
            raise CheckpointError(f"{path}: cannot read tensor {key} ({error})") from None

    def release(self, filename: str) -> None:
        """Unmap `filename` (its pages stop counting in this process's memory); it reopens on the next read."""
        self._handles.pop(filename, None)

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def close(self):
        self._handles.clear()


def fp8_quantization_config(config) -> dict | None:
    """The quantization_config of `config` (a config object, or the dict of a config.json) as a dict when it
    describes the official FP8 block format, else None. Raises ValueError naming the field when it claims FP8 in
    a form this package cannot read."""
    qc = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        qc = qc.to_dict()
    if qc.get("quant_method") != "fp8":
        return None
    block = qc.get("weight_block_size", [BLOCK_SIZE, BLOCK_SIZE])
    if list(block) != [BLOCK_SIZE, BLOCK_SIZE]:
        raise ValueError(f"quantization_config.weight_block_size: expected [128, 128], found {block}")
    if qc.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"quantization_config.fmt: expected 'e4m3', found {qc.get('fmt')!r}")
    if qc.get("scale_fmt") not in (None, "ue8m0"):
        raise ValueError(f"quantization_config.scale_fmt: expected None or 'ue8m0', found {qc.get('scale_fmt')!r}")
    return qc


def drop_quantization_config(config) -> None:
    """Remove `quantization_config` so that the config describes the dequantized (BF16/FP32) model."""
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")


def read_official_tensor(reader: CheckpointReader, key: str, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """Tensor `key` of an official checkpoint in `dtype` on `device`: FP8 weights dequantized exactly with their
    `weight_scale_inv` (on `device`, in float32, rounded once), others cast. float32-only tensors stay float32."""
    tensor = reader.get(key)
    if tensor.dtype == FP8_DTYPE:
        scale_key = key + SCALE_SUFFIX
        if scale_key not in reader:
            raise CheckpointError(f"{reader.folder / reader.weight_map[key]}: FP8 tensor {key} has no {scale_key}")
        return dequantize_fp8_block(tensor.to(device), reader.get(scale_key).to(device), dtype, name=key)
    if key.endswith("e_score_correction_bias"):
        return tensor.to(device=device, dtype=torch.float32)
    if not tensor.is_floating_point():
        raise CheckpointError(f"{reader.folder / reader.weight_map[key]}: tensor {key} has unexpected dtype {tensor.dtype}")
    return tensor.to(device=device, dtype=dtype)


def _resolve_device_map(model, device_map, max_memory, dtype):
    """Module name -> device, like `from_pretrained(device_map=...)`: None, a device, "auto" / "balanced" /
    "balanced_low_0" / "sequential" (accelerate's planner, layers never split), or an explicit dict."""
    if device_map is None:
        return {"": "cpu"}
    if isinstance(device_map, (str, torch.device, int)) and str(device_map) not in (
        "auto", "balanced", "balanced_low_0", "sequential"
    ):
        device = torch.device(device_map if not isinstance(device_map, int) else f"cuda:{device_map}")
        return {"": str(device)}
    if isinstance(device_map, dict):
        resolved = dict(device_map)
    else:
        from accelerate.utils import get_balanced_memory, infer_auto_device_map

        no_split = model._no_split_modules
        if device_map != "sequential":
            max_memory = get_balanced_memory(
                model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype,
                low_zero=device_map == "balanced_low_0",
            )
        resolved = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    if "disk" in resolved.values():
        raise ValueError(
            "device_map: the FP8 loader places weights on GPUs and the CPU, not on disk; give more max_memory, or "
            "convert first with `deepseek-v3-convert fp8-to-bf16` and load the BF16 folder with disk offload"
        )
    return {name: (f"cuda:{dev}" if isinstance(dev, int) else str(dev)) for name, dev in resolved.items()}


def device_for(name: str, device_map: dict, default="cpu"):
    """The device a `device_map` ({module prefix: device}) gives to parameter/module `name` (longest prefix)."""
    best, best_len = device_map.get("", default), -1
    for prefix, device in device_map.items():
        if prefix and (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
            best, best_len = device, len(prefix)
    return best


def load_fp8_checkpoint(model_class, folder, config, dtype=torch.bfloat16, device_map=None, max_memory=None,
                        quantizer=None):
    """Instantiate `model_class` (DeepseekV3ForCausalLM or DeepseekV3Model) from the official FP8 checkpoint in
    `folder`, dequantized to `dtype` (bfloat16 or float32), placed by `device_map`.

    Streams shard by shard. Keys are checked strictly: a tensor the model does not have is an error (except the
    MTP layers' stored copies of the shared embedding/head, and MTP layers the config does not ask for), and so is
    a model tensor the checkpoint lacks (except whole MTP layers, which are then initialized and reported).
    `config.quantization_config` is removed: the loaded model is a plain BF16/FP32 model.

    With a `quantizer` (`quantization.BitsAndBytesQuantizer`) the folder may also be an unquantized checkpoint in
    the official layout: the quantizer swaps the meta model's linears and experts for bitsandbytes modules, and
    each weight is quantized on its device as it is read (the model keeps the quantizer's `quantization_config`).
    """
    from accelerate import dispatch_model
    from accelerate.utils import set_module_tensor_to_device

    fp8_quantization_config(config)
    drop_quantization_config(config)
    reader = CheckpointReader(folder)
    # Everything on the meta device, buffers included: accelerate's init_empty_weights would still allocate the
    # fused expert tensors (30 GB a layer for the 671B model) before moving them to meta.
    with torch.device("meta"):
        model = model_class(config)
    if quantizer is not None:
        quantizer.prepare(model)
    is_causal_lm = hasattr(model, "lm_head")
    placement = _resolve_device_map(model, device_map, max_memory, dtype)
    params = dict(model.named_parameters())
    fused_filled = {}  # fused expert parameter -> set of (expert, half) written
    skipped = []

    def model_key(key):
        if is_causal_lm:
            return key
        if key == "lm_head.weight":
            return None
        return key.removeprefix("model.")

    for filename in reader.files:
        for key in reader.keys_in(filename):
            if key.endswith(SCALE_SUFFIX):
                if key.removesuffix(SCALE_SUFFIX) not in reader:
                    raise CheckpointError(f"{reader.folder / filename}: scale {key} has no weight beside it")
                continue
            if is_mtp_shared_copy(key):
                continue
            name = model_key(key)
            if name is None:
                continue
            param_name, expert, half = official_key_to_parameter(name)
            if quantizer is not None:
                device = device_for(param_name, placement)
                read = lambda: read_official_tensor(reader, key, dtype, device)  # noqa: E731
                if quantizer.place(model, param_name, expert, half, read, device):
                    continue
            is_buffer = param_name.endswith("e_score_correction_bias")
            if param_name not in params and not (is_buffer and _has_buffer(model, param_name)):
                layer = layer_index(key)
                if layer is not None and layer >= config.num_hidden_layers:
                    skipped.append(key)
                    continue
                raise CheckpointError(f"{reader.folder / filename}: tensor {key} does not belong to the model of {config.__class__.__name__}")
            device = device_for(param_name, placement)
            value = read_official_tensor(reader, key, dtype, device)
            if expert is None:
                expected = tuple(params[param_name].shape) if param_name in params else tuple(model.get_buffer(param_name).shape)
                if tuple(value.shape) != expected:
                    raise CheckpointError(f"{reader.folder / filename}: tensor {key}: expected shape {expected}, found {tuple(value.shape)}")
                set_module_tensor_to_device(model, param_name, device, value=value, dtype=value.dtype)
                continue
            fused = model.get_parameter(param_name)
            if fused.device.type == "meta":
                set_module_tensor_to_device(
                    model, param_name, device, value=torch.empty(fused.shape, dtype=dtype, device=device), dtype=dtype
                )
                fused = model.get_parameter(param_name)
                fused_filled[param_name] = set()
            rows = fused.shape[1] // 2 if half is not None else fused.shape[1]
            target = fused.data[expert, half * rows : (half + 1) * rows] if half is not None else fused.data[expert]
            if tuple(value.shape) != tuple(target.shape):
                raise CheckpointError(f"{reader.folder / filename}: tensor {key}: expected shape {tuple(target.shape)}, found {tuple(value.shape)}")
            target.copy_(value)
            fused_filled[param_name].add((expert, half))
        reader.release(filename)
    reader.close()

    for param_name, filled in fused_filled.items():
        fused = model.get_parameter(param_name)
        halves = (0, 1) if param_name.endswith("gate_up_proj") else (None,)
        missing = [(e, h) for e in range(fused.shape[0]) for h in halves if (e, h) not in filled]
        if missing:
            raise CheckpointError(f"{folder}: {param_name} is missing experts {sorted({e for e, _ in missing})[:10]}")
    missing = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    mtp_missing = [name for name in missing if (layer_index(name) or -1) >= config.num_hidden_layers]
    if len(mtp_missing) != len(missing):
        other = [name for name in missing if name not in mtp_missing]
        raise CheckpointError(f"{folder}: the checkpoint lacks {len(other)} tensors of the model, e.g. {other[:5]}")
    if mtp_missing and quantizer is not None:
        raise CheckpointError(f"{folder}: the checkpoint has no MTP layer weights; load it with "
                              f"num_nextn_predict_layers=0 to quantize it")
    if mtp_missing:
        logger.warning("%s has no MTP layer weights: %d MTP tensors are freshly initialized", folder, len(mtp_missing))
        _initialize_missing(model, mtp_missing, placement, dtype)
    if skipped:
        logger.info("skipped %d tensors of MTP layers the config does not ask for (%s...)", len(skipped), skipped[0])
    _materialize_buffers(model, placement, folder, config)
    if quantizer is not None:
        quantizer.finish(model, folder)

    model.eval()
    model.config.dtype = dtype
    if len(set(placement.values())) > 1:
        model = dispatch_model(model, device_map=placement)
    if device_map is not None:  # as transformers does: only a load with a device_map records one
        model.hf_device_map = placement
    if (Path(folder) / "generation_config.json").exists():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model


def _materialize_buffers(model, placement, folder, config):
    """Put every buffer on its device: the loaded ones are there already; the rotary frequencies are computed,
    the expert-load counters start at zero. A persistent buffer the checkpoint lacks (the routing bias) is an
    error, except in MTP layers, whose missing weights were initialized."""
    from accelerate.utils import set_module_tensor_to_device

    from .modeling_deepseek_v3 import compute_rope_inv_freq

    missing = []
    for name, buffer in list(model.named_buffers()):
        device = device_for(name, placement)
        if buffer.device.type != "meta":
            if buffer.device != torch.device(device):
                set_module_tensor_to_device(model, name, device, value=buffer)
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "inv_freq":
            value = compute_rope_inv_freq(config)[0]
        elif leaf == "expert_load" or (layer_index(name) or -1) >= config.num_hidden_layers:
            value = torch.zeros(buffer.shape, dtype=buffer.dtype)
        else:
            missing.append(name)
            continue
        set_module_tensor_to_device(model, name, device, value=value, dtype=value.dtype)
    if missing:
        raise CheckpointError(f"{folder}: the checkpoint lacks {len(missing)} buffers of the model, e.g. {missing[:5]}")


def _has_buffer(model, name):
    try:
        model.get_buffer(name)
        return True
    except AttributeError:
        return False


def layer_index(key: str) -> int | None:
    """The decoder-layer index in a tensor or module name (`...layers.{L}...`), or None."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def _initialize_missing(model, names, placement, dtype):
    from accelerate.utils import set_module_tensor_to_device

    for name in names:
        param = model.get_parameter(name)
        device = device_for(name, placement)
        set_module_tensor_to_device(
            model, name, device, value=torch.empty(param.shape, dtype=dtype, device=device), dtype=dtype
        )
    modules = {name.rsplit(".", 1)[0] for name in names}
    for module_name in sorted(modules):
        module = model.get_submodule(module_name)
        for param in module.parameters(recurse=False):
            param._is_hf_initialized = False
        model._init_weights(module)


def write_official_checkpoint(model, folder, fp8: bool = False, num_shards: int = 1, extra_files: dict | None = None):
    """Write `model` (a DeepseekV3ForCausalLM) in the official layout: config.json, sharded safetensors with
    `model.safetensors.index.json`, per-expert keys, the MTP layers with their stored copies.

    With `fp8=True` every tensor the official release quantizes is block-quantized (float8_e4m3fn + float32
    `weight_scale_inv`, partial edge blocks included) and config.json gets the official `quantization_config`.
    Returns the dict of tensors written (the exact on-disk values). `extra_files` maps file names to text
    (tokenizer files, say) to write beside them.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    official = {}
    specs = official_tensor_specs(config)
    for key, spec in specs.items():
        tensor = _official_value(state, key, config)
        if tuple(tensor.shape) != spec.shape:
            raise ValueError(f"{key}: model tensor has shape {tuple(tensor.shape)}, the layout says {spec.shape}")
        if fp8 and spec.fp8:
            official[key], official[key + SCALE_SUFFIX] = quantize_fp8_block(tensor)
        elif spec.float32:
            official[key] = tensor.to(torch.float32).contiguous()
        else:
            official[key] = tensor.clone()  # a clone: safetensors refuses aliased tensors (the MTP copies)

    # Round-robin over the weights, each scale in its weight's shard (as in the release).
    num_shards = max(1, num_shards)
    shards = [[] for _ in range(num_shards)]
    for i, key in enumerate(k for k in official if not k.endswith(SCALE_SUFFIX)):
        shards[i % num_shards].append(key)
        if key + SCALE_SUFFIX in official:
            shards[i % num_shards].append(key + SCALE_SUFFIX)
    weight_map = {}
    total = len(shards)
    for i, shard_keys in enumerate(shards):
        filename = "model.safetensors" if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        save_file({k: official[k] for k in shard_keys}, str(folder / filename), metadata={"format": "pt"})
        weight_map.update({k: filename for k in shard_keys})
    if total > 1:
        size = sum(t.numel() * t.element_size() for t in official.values())
        (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}, indent=2))
    config_dict = config.to_dict()
    config_dict.pop("auto_map", None)
    if fp8:
        config_dict["quantization_config"] = {
            "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]
        }
    else:
        config_dict.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True))
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text)
    return official


def _official_value(state: dict, key: str, config) -> torch.Tensor:
    if is_mtp_shared_copy(key):
        source = "lm_head.weight" if key.endswith("shared_head.head.weight") else "model.embed_tokens.weight"
        return state[source]
    param_name, expert, half = official_key_to_parameter(key)
    tensor = state[param_name]
    if expert is None:
        return tensor
    if half is None:
        return tensor[expert]
    rows = tensor.shape[1] // 2
    return tensor[expert, half * rows : (half + 1) * rows]


__all__ = [
    "CheckpointError",
    "CheckpointReader",
    "device_for",
    "drop_quantization_config",
    "fp8_quantization_config",
    "layer_index",
    "load_fp8_checkpoint",
    "read_weight_map",
    "read_official_tensor",
    "write_official_checkpoint",
]
