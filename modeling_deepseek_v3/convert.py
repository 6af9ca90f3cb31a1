"""Checkpoint conversions of the official DeepSeek-V3 release, and `deepseek-v3-convert`, their command line.

- `fp8_to_bf16`: the FP8 release -> a BF16 (or FP32) checkpoint in the same official layout.
- `to_inference` / `from_inference`: the official HF layout <-> the official inference ("mp") format of
  deepseek-ai/DeepSeek-V3 `inference/convert.py` (REFERENCE.md section 6).
- `verify`: checks a folder against its config.json (index, shards, every expected key, shapes, dtypes, scales).

Every conversion streams one tensor at a time (safetensors_io.py), never touches SRC, refuses a non-empty DST
without `overwrite`, and builds its output in a hidden sibling `.DST.partial` that is renamed to DST only once
complete, so a failure never leaves a DST that looks complete. `fp8_to_bf16` resumes from that sibling: shards
already converted from the same source file (size and mtime recorded beside them, header re-checked) are kept.
"""

import argparse
import json
import math
import os
import re
import shutil
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .checkpoint_layout import from_inference_name, official_tensor_specs, to_inference_name
from .configuration_deepseek_v3 import DeepseekV3Config
from .fp8 import BLOCK_SIZE, FP8_DTYPE, SCALE_DTYPES, dequantize_fp8_block, scale_grid_shape
from .official_checkpoint import INDEX_NAME, SCALE_SUFFIX, CheckpointError, fp8_quantization_config, layer_index, read_weight_map
from .safetensors_io import SafetensorsFormatError, SafetensorsWriter, nbytes_of, read_bytes, read_header, read_tensor

OUTPUT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class ConversionError(Exception):
    """A conversion cannot proceed; the message names the file, tensor or option at fault."""


# ----------------------------------------------------------------------------------------------------------------
# Reading a source folder
# ----------------------------------------------------------------------------------------------------------------


class SourceCheckpoint:
    """Headers of a safetensors checkpoint folder and per-thread plain-read access to its tensors."""

    def __init__(self, folder):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConversionError(f"{self.folder}: no such checkpoint folder")
        try:
            self.weight_map = read_weight_map(self.folder)
        except CheckpointError as error:
            raise ConversionError(str(error)) from None
        if self.weight_map is None:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not files:
                raise ConversionError(f"{self.folder}: no *.safetensors files")
            self.weight_map = {}
        self.files = sorted(set(self.weight_map.values())) or files
        self.headers = {}
        for name in self.files:
            try:
                self.headers[name] = read_header(self.folder / name)[0]
            except SafetensorsFormatError as error:
                raise ConversionError(str(error)) from None
        if not self.weight_map:
            self.weight_map = {key: name for name in self.files for key in self.headers[name]}
        for key, name in self.weight_map.items():
            if key not in self.headers[name]:
                raise ConversionError(f"{self.folder / INDEX_NAME}: tensor {key} is listed in {name}, which does not hold it")
        self._local = threading.local()

    def entry(self, key):
        return self.headers[self.weight_map[key]][key]

    def _handle(self, key):
        filename = self.weight_map[key]
        handles = self._local.__dict__.setdefault("handles", {})
        if filename not in handles:
            handles[filename] = open(self.folder / filename, "rb")
        return handles[filename], self.folder / filename

    def read(self, key) -> torch.Tensor:
        handle, path = self._handle(key)
        try:
            return read_tensor(handle, path, key, self.entry(key))
        except SafetensorsFormatError as error:
            raise ConversionError(str(error)) from None

    def convert_in_parts(self, key, dtype_out, writer: SafetensorsWriter, part_bytes: int = 32 * 1024**2):
        """Write tensor `key` to `writer` in `dtype_out`, reading and converting a slice of rows at a time
        (FP8 weights: one 128-row block row, dequantized with its scales), so a thread holds a few MB however large
        the tensor. Yields the source bytes done after each part."""
        entry = self.entry(key)
        handle, path = self._handle(key)
        shape = entry.shape
        row_bytes = entry.nbytes // shape[0] if shape and shape[0] else entry.nbytes
        if entry.dtype == FP8_DTYPE:
            scale = self.read(key + SCALE_SUFFIX)  # its grid was checked against the weight by the plan
            rows_per_part = BLOCK_SIZE
        else:
            rows_per_part = max(1, part_bytes // max(1, row_bytes))
        out_row_bytes = nbytes_of(dtype_out, shape[1:]) if shape else nbytes_of(dtype_out, ())
        buffer = _thread_buffer(self._local, "read", min(entry.nbytes, rows_per_part * row_bytes) or 1)
        n_rows = shape[0] if shape else 1
        try:
            for first in range(0, n_rows, rows_per_part):
                rows = min(rows_per_part, n_rows - first)
                raw = read_bytes(handle, path, key, entry, first * row_bytes, buffer[: rows * row_bytes])
                part = raw.view(entry.dtype).view((rows,) + tuple(shape[1:])) if shape else raw.view(entry.dtype).view(())
                if entry.dtype == FP8_DTYPE:
                    part = dequantize_fp8_block(part, scale[first // BLOCK_SIZE : first // BLOCK_SIZE + 1], dtype_out, name=key)
                elif part.dtype != dtype_out:
                    part = part.to(dtype_out)
                writer.write_part(key, first * out_row_bytes, part)
                yield rows * row_bytes
        except SafetensorsFormatError as error:
            raise ConversionError(str(error)) from None

    def close_thread_handles(self):
        for handle in self._local.__dict__.pop("handles", {}).values():
            handle.close()
        self._local.__dict__.pop("buffers", None)

    def config(self) -> dict:
        path = self.folder / "config.json"
        if not path.exists():
            raise ConversionError(f"{path}: missing (the conversion needs the model's config.json)")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ConversionError(f"{path}: not valid JSON ({error})") from None


def _thread_buffer(local, name: str, nbytes: int) -> torch.Tensor:
    """A per-thread uint8 buffer of at least `nbytes`, grown (by 25% steps) and reused across tensors."""
    buffers = local.__dict__.setdefault("buffers", {})
    if name not in buffers or buffers[name].numel() < nbytes:
        buffers[name] = torch.empty(int(nbytes * 1.25) + 64, dtype=torch.uint8)
    return buffers[name][:nbytes]


def _model_config(config_dict: dict, source) -> DeepseekV3Config:
    try:
        return DeepseekV3Config(**{k: v for k, v in config_dict.items() if k != "auto_map"})
    except (TypeError, ValueError) as error:
        raise ConversionError(f"{source}: {error}") from None


# ----------------------------------------------------------------------------------------------------------------
# Output folders: non-empty check, hidden partial sibling, rename at the end
# ----------------------------------------------------------------------------------------------------------------


def _partial_dir(src: Path, dst: Path, overwrite: bool, keep_existing_partial: bool) -> Path:
    src, dst = src.resolve(), dst.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise ConversionError(f"{dst}: the output folder must not be the source folder, inside it or around it")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise ConversionError(f"{dst}: exists and is not empty; pass --overwrite to replace it")
    partial = dst.parent / f".{dst.name}.partial"
    if partial.exists() and not keep_existing_partial:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    return partial


def _publish(partial: Path, dst: Path) -> None:
    dst = dst.resolve()
    if dst.exists():
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    os.replace(partial, dst)


def _copy_non_weight_files(src: Path, dst: Path, skip=("config.json",)) -> None:
    """Tokenizer, generation config, code, docs: every file of SRC that is not a weight file or the index."""
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if path.is_dir() or path.suffix == ".safetensors" or rel.name == INDEX_NAME or str(rel) in skip:
            continue
        if any(part.startswith(".") for part in rel.parts):
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dst / rel)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _progress(total_bytes: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not enabled)


# ----------------------------------------------------------------------------------------------------------------
# fp8-to-bf16
# ----------------------------------------------------------------------------------------------------------------


def fp8_to_bf16(src, dst, dtype: str = "bf16", overwrite: bool = False, workers: int | None = None,
                progress: bool = True) -> Path:
    """Dequantize the official FP8 checkpoint in `src` into `dst` (official layout, same shard names).

    FP8 weights become `fp8 * weight_scale_inv` on the 128x128 ceil grid, in float32, rounded once to `dtype`
    ("bf16" or "fp32"); the scale tensors disappear from shards and index; config.json loses
    `quantization_config`; every other file of `src` is copied. With "fp32" every floating tensor is float32.
    Shards are converted by `workers` threads (default: one per core, at most 8). Returns `dst`.
    """
    src, dst = Path(src), Path(dst)
    if dtype not in OUTPUT_DTYPES:
        raise ConversionError(f"--dtype: expected one of {sorted(OUTPUT_DTYPES)}, found {dtype!r}")
    out_dtype = OUTPUT_DTYPES[dtype]
    source = SourceCheckpoint(src)
    config = source.config()
    try:
        qc = fp8_quantization_config(config)
    except ValueError as error:
        raise ConversionError(f"{src / 'config.json'}: {error}") from None
    if qc is None:
        raise ConversionError(f"{src / 'config.json'}: expected an FP8 checkpoint (quantization_config.quant_method "
                              f"'fp8'), found quantization_config={config.get('quantization_config')!r}")
    plan = _plan_dequantization(source, out_dtype)
    partial = _partial_dir(src, dst, overwrite, keep_existing_partial=True)

    total = sum((src / f).stat().st_size for f in source.files)
    bar = _progress(total, progress, f"fp8-to-bf16 {src.name}")
    lock = threading.Lock()

    def convert(filename):
        try:
            nbytes = (src / filename).stat().st_size
            if _shard_done(src / filename, partial / filename, plan[filename], out_dtype):
                with lock:
                    bar.update(nbytes)
                return
            tmp = partial / f"{filename}.tmp"
            writer = SafetensorsWriter(tmp, plan[filename], metadata={"format": "pt"})
            try:
                for key, (dtype_out, shape) in plan[filename].items():
                    for nbytes in source.convert_in_parts(key, dtype_out, writer):
                        with lock:
                            bar.update(nbytes)
                writer.close()
            except BaseException:
                writer.abort()
                tmp.unlink(missing_ok=True)
                raise
            os.replace(tmp, partial / filename)
            _write_json(_sidecar(partial / filename), _source_stamp(src / filename, out_dtype))
            with lock:
                bar.update(nbytes - sum(source.entry(k).nbytes for k in plan[filename]))
        finally:
            source.close_thread_handles()

    workers = workers or min(8, os.cpu_count() or 1, len(source.files))
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for future in [pool.submit(convert, f) for f in source.files]:
                future.result()
    except OSError as error:
        raise ConversionError(f"writing {partial}: {error}") from None
    finally:
        bar.close()

    weight_map = {key: f for f, keys in plan.items() for key in keys}
    size = sum(math.prod(shape) * torch.empty((), dtype=dt).element_size() for keys in plan.values() for dt, shape in keys.values())
    if len(source.files) > 1 or (src / INDEX_NAME).exists():
        _write_json(partial / INDEX_NAME, {"metadata": {"total_size": size}, "weight_map": weight_map})
    config.pop("quantization_config")
    config["torch_dtype"] = "float32" if out_dtype == torch.float32 else "bfloat16"
    _write_json(partial / "config.json", config)
    _copy_non_weight_files(src, partial)
    for sidecar in partial.glob(".*.done"):
        sidecar.unlink()
    _publish(partial, dst)
    return dst


def _plan_dequantization(source: SourceCheckpoint, out_dtype) -> dict:
    """Per source shard, the output tensors {name: (dtype, shape)} in source order; validates FP8 pairs."""
    plan = {}
    for filename in source.files:
        entries = {}
        for key, entry in source.headers[filename].items():
            if key not in source.weight_map:
                raise ConversionError(f"{source.folder / filename}: tensor {key} is not listed in {INDEX_NAME}")
            if key.endswith(SCALE_SUFFIX):
                if key.removesuffix(SCALE_SUFFIX) not in source.weight_map:
                    raise ConversionError(f"{source.folder / filename}: scale {key} has no weight")
                continue
            if entry.dtype == FP8_DTYPE:
                scale_key = key + SCALE_SUFFIX
                if scale_key not in source.weight_map:
                    raise ConversionError(f"{source.folder / filename}: FP8 tensor {key} has no {scale_key}")
                scale = source.entry(scale_key)
                grid = scale_grid_shape(entry.shape) if len(entry.shape) == 2 else None
                if grid is None or scale.shape != grid or scale.dtype not in SCALE_DTYPES:
                    raise ConversionError(
                        f"{source.folder / source.weight_map[scale_key]}: {scale_key}: expected a float32 scale grid of "
                        f"shape {grid} for a weight of shape {entry.shape}, found {scale.dtype} {scale.shape}"
                    )
                entries[key] = (out_dtype, entry.shape)
            elif entry.dtype in (torch.bfloat16, torch.float16, torch.float32):
                keep = entry.dtype if out_dtype == torch.bfloat16 else torch.float32
                entries[key] = (keep, entry.shape)
            else:
                raise ConversionError(f"{source.folder / filename}: tensor {key} has unexpected dtype {entry.dtype}")
        plan[filename] = entries
    return plan


def _sidecar(path: Path) -> Path:
    return path.parent / f".{path.name}.done"


def _source_stamp(path: Path, out_dtype) -> dict:
    stat = path.stat()
    return {"source_size": stat.st_size, "source_mtime_ns": stat.st_mtime_ns, "dtype": str(out_dtype)}


def _shard_done(source_file: Path, output_file: Path, expected: dict, out_dtype) -> bool:
    """A shard converted by an earlier run counts only if it came from this very source file and its header holds
    exactly the expected tensors (the rename after `close()` guarantees the bytes are complete)."""
    sidecar = _sidecar(output_file)
    if not (output_file.exists() and sidecar.exists()):
        return False
    try:
        if json.loads(sidecar.read_text()) != _source_stamp(source_file, out_dtype):
            return False
        header, _ = read_header(output_file)
    except (OSError, ValueError):
        return False
    return {k: (e.dtype, e.shape) for k, e in header.items()} == {k: (d, tuple(s)) for k, (d, s) in expected.items()}


# ----------------------------------------------------------------------------------------------------------------
# to-inference / from-inference
# ----------------------------------------------------------------------------------------------------------------


def to_inference(src, dst, model_parallel: int, overwrite: bool = False, progress: bool = True) -> Path:
    """Write the HF-layout checkpoint in `src` (FP8 or BF16) in the official inference format: files
    `model{rank}-mp{MP}.safetensors`, renamed keys, dims split across ranks, routed expert e on rank e // (E/MP),
    the MTP layers dropped (the format has none), tokenizer files copied. Returns `dst`."""
    src, dst = Path(src), Path(dst)
    mp = int(model_parallel)
    source = SourceCheckpoint(src)
    config = _model_config(source.config(), src / "config.json")
    if mp < 1:
        raise ConversionError(f"--model-parallel: expected a positive int, found {mp}")
    if config.n_routed_experts % mp:
        raise ConversionError(f"--model-parallel {mp} does not divide n_routed_experts={config.n_routed_experts}")
    experts_per_rank = config.n_routed_experts // mp

    pieces = {}  # source key -> list of (rank, name, dim)
    rank_entries = [{} for _ in range(mp)]
    for key in sorted(source.weight_map, key=_natural_key):
        layer = layer_index(key)
        if layer is not None and layer >= config.num_hidden_layers:
            continue
        try:
            name, dim, expert = to_inference_name(key)
        except KeyError as error:
            raise ConversionError(f"{src / source.weight_map[key]}: {error.args[0]}") from None
        entry = source.entry(key)
        if expert is not None:
            targets = [(expert // experts_per_rank, None)]
        elif dim is None:
            targets = [(rank, None) for rank in range(mp)]
        else:
            size = entry.shape[dim]
            if size % mp:
                raise ConversionError(f"--model-parallel {mp} does not divide dim {dim} (size {size}) of {key}")
            if entry.dtype == FP8_DTYPE and (size // mp) % BLOCK_SIZE:
                raise ConversionError(
                    f"--model-parallel {mp} splits a 128-block of {key}: dim {dim} of size {size} gives {size // mp} "
                    f"per rank, not a multiple of {BLOCK_SIZE}"
                )
            targets = [(rank, dim) for rank in range(mp)]
        pieces[key] = [(rank, name, dim) for rank, dim in targets]
        for rank, dim in targets:
            shape = list(entry.shape)
            if dim is not None:
                shape[dim] //= mp
            rank_entries[rank][name] = (entry.dtype, tuple(shape))

    partial = _partial_dir(src, dst, overwrite, keep_existing_partial=False)
    writers = [SafetensorsWriter(partial / f"model{r}-mp{mp}.safetensors.tmp", rank_entries[r]) for r in range(mp)]
    bar = _progress(sum(source.entry(k).nbytes for k in pieces), progress, f"to-inference mp{mp}")
    try:
        for key, targets in pieces.items():
            tensor = source.read(key)
            for rank, name, dim in targets:
                piece = tensor if dim is None else tensor.narrow(dim, rank * tensor.shape[dim] // mp, tensor.shape[dim] // mp)
                writers[rank].write(name, piece)
            bar.update(source.entry(key).nbytes)
        for writer in writers:
            writer.close()
    except BaseException as error:
        for writer in writers:
            writer.abort()
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(error, OSError):
            raise ConversionError(f"writing {partial}: {error}") from None
        raise
    finally:
        bar.close()
        source.close_thread_handles()
    for rank in range(mp):
        os.replace(partial / f"model{rank}-mp{mp}.safetensors.tmp", partial / f"model{rank}-mp{mp}.safetensors")
    for path in src.glob("*token*"):
        shutil.copy2(path, partial / path.name)
    _publish(partial, dst)
    return dst


def from_inference(src, dst, config_path, overwrite: bool = False, max_shard_bytes: int = 5 * 1024**3,
                   progress: bool = True) -> Path:
    """Rebuild the HF layout from official inference files `model{rank}-mp{MP}.safetensors` in `src`.

    `config_path` is the model's HF config.json (the inference format has none). The inference format has no MTP
    layer, so the written config.json says `num_nextn_predict_layers: 0`; `quantization_config` is kept only when
    the tensors are FP8. Returns `dst`.
    """
    src, dst, config_path = Path(src), Path(dst), Path(config_path)
    if not config_path.is_file():
        raise ConversionError(f"--config {config_path}: no such file")
    try:
        config_dict = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ConversionError(f"--config {config_path}: not valid JSON ({error})") from None
    _model_config(config_dict, config_path)  # a clear error for an inconsistent config, before any work
    files = sorted(src.glob("model*-mp*.safetensors"))
    found = {}
    for path in files:
        match = re.fullmatch(r"model(\d+)-mp(\d+)\.safetensors", path.name)
        if match:
            found[(int(match[1]), int(match[2]))] = path
    mps = {mp for _, mp in found}
    if len(mps) != 1:
        raise ConversionError(f"{src}: expected files model{{rank}}-mp{{MP}}.safetensors of one MP, found {[p.name for p in files]}")
    mp = mps.pop()
    missing = [r for r in range(mp) if (r, mp) not in found]
    if missing:
        raise ConversionError(f"{src}: missing ranks {missing} of model{{rank}}-mp{mp}.safetensors")
    paths = [found[(r, mp)] for r in range(mp)]
    headers = []
    for path in paths:
        try:
            headers.append(read_header(path)[0])
        except SafetensorsFormatError as error:
            raise ConversionError(str(error)) from None

    outputs = {}  # HF key -> (dtype, shape, [(rank, name)], dim)
    for rank, header in enumerate(headers):
        for name, entry in header.items():
            try:
                key = from_inference_name(name)
            except KeyError as error:
                raise ConversionError(f"{paths[rank]}: {error.args[0]}") from None
            _, dim, expert = to_inference_name(key)
            if key in outputs and (expert is not None or dim is None):
                continue
            if dim is None:
                outputs[key] = (entry.dtype, entry.shape, [(rank, name)], None)
            elif key not in outputs:
                shape = list(entry.shape)
                shape[dim] *= mp
                outputs[key] = (entry.dtype, tuple(shape), [(r, name) for r in range(mp)], dim)
                for r in range(mp):
                    if name not in headers[r]:
                        raise ConversionError(f"{paths[r]}: lacks {name}, which rank {rank} holds as a split tensor")
    is_fp8 = any(dtype == FP8_DTYPE for dtype, *_ in outputs.values())

    keys = sorted(outputs, key=_natural_key)
    shards, current, current_bytes = [], [], 0
    for key in keys:
        dtype, shape, *_ = outputs[key]
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if current and current_bytes + nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(key)
        current_bytes += nbytes
    shards.append(current)

    partial = _partial_dir(src, dst, overwrite, keep_existing_partial=False)
    handles = [open(p, "rb") for p in paths]
    weight_map = {}
    bar = _progress(sum(p.stat().st_size for p in paths), progress, f"from-inference mp{mp}")
    try:
        for i, shard_keys in enumerate(shards):
            filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            writer = SafetensorsWriter(partial / (filename + ".tmp"), {k: outputs[k][:2] for k in shard_keys},
                                       metadata={"format": "pt"})
            for key in shard_keys:
                _, _, sources, dim = outputs[key]
                parts = [read_tensor(handles[r], paths[r], name, headers[r][name]) for r, name in sources]
                writer.write(key, parts[0] if dim is None else torch.cat(parts, dim=dim))
                bar.update(sum(headers[r][name].nbytes for r, name in sources))
            writer.close()
            os.replace(partial / (filename + ".tmp"), partial / filename)
            weight_map.update({k: filename for k in shard_keys})
    except BaseException as error:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(error, OSError):
            raise ConversionError(f"writing {partial}: {error}") from None
        if isinstance(error, SafetensorsFormatError):
            raise ConversionError(str(error)) from None
        raise
    finally:
        bar.close()
        for handle in handles:
            handle.close()
    total = sum(math.prod(outputs[k][1]) * torch.empty((), dtype=outputs[k][0]).element_size() for k in keys)
    _write_json(partial / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    config_dict = dict(config_dict)
    config_dict["num_nextn_predict_layers"] = 0
    if not is_fp8:
        config_dict.pop("quantization_config", None)
    _write_json(partial / "config.json", config_dict)
    for path in src.glob("*token*"):
        shutil.copy2(path, partial / path.name)
    _publish(partial, dst)
    return dst


def _natural_key(key: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


# ----------------------------------------------------------------------------------------------------------------
# verify
# ----------------------------------------------------------------------------------------------------------------


def verify(folder) -> list:
    """Check a checkpoint folder against its config.json. Returns the list of problems (empty when it is sound):
    index vs shard files, every tensor expected from the config (MTP layers included) present and nothing
    unknown, shapes, dtypes, and for FP8 checkpoints each quantized weight's float8_e4m3fn dtype and scale grid."""
    folder = Path(folder)
    problems = []
    config_path = folder / "config.json"
    try:
        config = _model_config(json.loads(config_path.read_text()), config_path)
    except (OSError, json.JSONDecodeError) as error:
        return [f"{config_path}: cannot read ({error})"]
    except ConversionError as error:
        return [str(error)]
    qc = getattr(config, "quantization_config", None) or {}
    fp8 = (qc if isinstance(qc, dict) else qc.to_dict()).get("quant_method") == "fp8"

    index_path = folder / INDEX_NAME
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    headers = {}
    for name in files:
        try:
            headers[name] = read_header(folder / name)[0]
        except SafetensorsFormatError as error:
            problems.append(str(error))
    present = {}
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            return problems + [f"{index_path}: expected JSON with a 'weight_map' object ({error})"]
        for key, name in weight_map.items():
            if name not in files:
                problems.append(f"{index_path}: {key} is listed in {name}, which does not exist")
            elif name in headers and key not in headers[name]:
                problems.append(f"{index_path}: {key} is listed in {name}, which does not hold it")
            elif name in headers:
                present[key] = headers[name][key]
        for name, header in headers.items():
            for key in header:
                if weight_map.get(key) != name:
                    problems.append(f"{folder / name}: holds {key}, which {INDEX_NAME} does not list there")
        for name in files:
            if name not in set(weight_map.values()):
                problems.append(f"{folder / name}: not referenced by {INDEX_NAME}")
    else:
        if len(files) > 1:
            problems.append(f"{folder}: {len(files)} safetensors files but no {INDEX_NAME}")
        for name, header in headers.items():
            present.update(header)
    if not files:
        problems.append(f"{folder}: no *.safetensors files")

    specs = official_tensor_specs(config)
    for key, spec in specs.items():
        entry = present.get(key)
        if entry is None:
            problems.append(f"missing tensor {key}")
            continue
        if entry.shape != spec.shape:
            problems.append(f"{key}: expected shape {spec.shape}, found {entry.shape}")
        scale = present.get(key + SCALE_SUFFIX)
        if fp8 and spec.fp8:
            if entry.dtype != FP8_DTYPE:
                problems.append(f"{key}: expected dtype {FP8_DTYPE} in an FP8 checkpoint, found {entry.dtype}")
            if scale is None:
                problems.append(f"missing tensor {key}{SCALE_SUFFIX}")
            else:
                grid = scale_grid_shape(spec.shape) if len(spec.shape) == 2 else None
                if scale.shape != grid:
                    problems.append(f"{key}{SCALE_SUFFIX}: expected scale grid {grid}, found {scale.shape}")
                if scale.dtype not in SCALE_DTYPES:
                    problems.append(f"{key}{SCALE_SUFFIX}: expected dtype float32, found {scale.dtype}")
        else:
            expected = (torch.float32,) if spec.float32 else (torch.bfloat16, torch.float16, torch.float32)
            if entry.dtype not in expected:
                problems.append(f"{key}: expected dtype in {expected}, found {entry.dtype}")
            if scale is not None:
                problems.append(f"{key}{SCALE_SUFFIX}: a scale for a tensor that is not FP8 here")
    allowed_scales = {k + SCALE_SUFFIX for k in specs}
    for key in sorted(present, key=_natural_key):
        if key not in specs and key not in allowed_scales:
            problems.append(f"unknown tensor {key}")
    return problems


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

_EXAMPLES = {
    "fp8-to-bf16": "examples:\n  deepseek-v3-convert fp8-to-bf16 DeepSeek-V3 DeepSeek-V3-bf16\n"
                   "  deepseek-v3-convert fp8-to-bf16 DeepSeek-V3 DeepSeek-V3-fp32 --dtype fp32 --workers 4\n"
                   "  (rerun the same command after an interruption: finished shards are kept)",
    "to-inference": "examples:\n  deepseek-v3-convert to-inference DeepSeek-V3 DeepSeek-V3-mp8 --model-parallel 8\n"
                    "  torchrun --nproc-per-node 8 generate.py --ckpt-path DeepSeek-V3-mp8 ...  (official inference)",
    "from-inference": "examples:\n  deepseek-v3-convert from-inference DeepSeek-V3-mp8 DeepSeek-V3-hf "
                      "--config DeepSeek-V3/config.json",
    "verify": "examples:\n  deepseek-v3-convert verify DeepSeek-V3\n  deepseek-v3-convert verify DeepSeek-V3-bf16",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepseek-v3-convert",
        description="Convert and check DeepSeek-V3 checkpoints (official HF layout, FP8 release, official inference format).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(_EXAMPLES.values()),
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=_EXAMPLES[name],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        return p

    p = add("fp8-to-bf16", "Dequantize the official FP8 checkpoint SRC into a BF16/FP32 checkpoint DST (same layout).")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", choices=sorted(OUTPUT_DTYPES), default="bf16")
    p.add_argument("--workers", type=int, default=None, help="shards converted at once (default: cores, at most 8)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    p.add_argument("--no-progress", action="store_true")

    p = add("to-inference", "Write the HF-layout checkpoint SRC in the official inference format (model{rank}-mp{N}).")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--model-parallel", type=int, required=True, metavar="N")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")

    p = add("from-inference", "Rebuild the HF layout from official inference files (the MTP layer is absent there).")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--config", required=True, help="the model's HF config.json")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")

    p = add("verify", "Check a checkpoint folder against its config.json; exit 1 with the list of problems.")
    p.add_argument("dir")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "verify":
            problems = verify(args.dir)
            for problem in problems:
                print(problem)
            print(f"{args.dir}: {'OK' if not problems else f'{len(problems)} problem(s)'}", file=sys.stderr)
            return 1 if problems else 0
        progress = not args.no_progress
        if args.command == "fp8-to-bf16":
            out = fp8_to_bf16(args.src, args.dst, args.dtype, args.overwrite, args.workers, progress)
        elif args.command == "to-inference":
            out = to_inference(args.src, args.dst, args.model_parallel, args.overwrite, progress)
        else:
            out = from_inference(args.src, args.dst, args.config, args.overwrite, progress=progress)
            print("note: the inference format has no MTP layer; the written config says num_nextn_predict_layers: 0",
                  file=sys.stderr)
        print(f"wrote {out}", file=sys.stderr)
        return 0
    except (ConversionError, ValueError) as error:
        print(f"deepseek-v3-convert {args.command}: error: {error}", file=sys.stderr)
        return 1


__all__ = ["ConversionError", "fp8_to_bf16", "from_inference", "main", "to_inference", "verify"]
