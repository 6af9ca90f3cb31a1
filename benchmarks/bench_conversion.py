"""Conversion throughput and memory: `fp8-to-bf16` against a plain safetensors read + write of the same shards.

Generates an FP8 checkpoint in the official layout (random bytes, real tensor names, shapes, 128x128 scale grids
and MTP layer) from a preset cut to a few layers, then runs, each in a fresh process:

- copy: `safetensors.torch.load_file` + `save_file` of every shard (the plain read + write of the input bytes),
  with and without an fsync per file (the converter fsyncs each shard before renaming it into place);
- convert: `modeling_deepseek_v3.convert.fp8_to_bf16` (dequantize to bf16, write, fsync, index, config);
- load: `DeepseekV3ForCausalLM.from_pretrained(fp8_dir, dtype=bfloat16)` on the CPU (the streaming FP8 loader).

Prints input and output GB/s, wall time, peak RSS (ru_maxrss of the process) against the largest input shard, and
the ratios. Peak RSS is the child's VmHWM. The input files are in the page cache for every run (it was just written; 24 GiB of RAM).

    python benchmarks/bench_conversion.py --layers 4 --workdir /tmp/bench-conversion
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from modeling_deepseek_v3 import DeepseekV3Config
from modeling_deepseek_v3.checkpoint_layout import official_tensor_specs
from modeling_deepseek_v3.fp8 import FP8_DTYPE, scale_grid_shape
from modeling_deepseek_v3.safetensors_io import SafetensorsWriter

PRESETS = Path(__file__).resolve().parent.parent / "configuration"


def generate(folder: Path, config: DeepseekV3Config, shard_bytes: int, seed: int = 0) -> list:
    """Write a random FP8 release for `config`; returns the shard sizes in bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    specs = official_tensor_specs(config)
    plan, current, size = [], {}, 0
    for key, spec in specs.items():
        entries = {key: (FP8_DTYPE if spec.fp8 else (torch.float32 if spec.float32 else torch.bfloat16), spec.shape)}
        if spec.fp8:
            entries[key + "_scale_inv"] = (torch.float32, scale_grid_shape(spec.shape))
        nbytes = sum(torch.empty((), dtype=d).element_size() * torch.Size(s).numel() for d, s in entries.values())
        if current and size + nbytes > shard_bytes:
            plan.append(current)
            current, size = {}, 0
        current.update(entries)
        size += nbytes
    plan.append(current)
    weight_map = {}
    for i, entries in enumerate(plan):
        name = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        writer = SafetensorsWriter(folder / name, entries, metadata={"format": "pt"})
        for key, (dtype, shape) in entries.items():
            if dtype == FP8_DTYPE:
                raw = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
                raw[(raw & 0x7F) == 0x7F] = 0  # no NaN encodings
                tensor = raw.view(FP8_DTYPE)
            elif key.endswith("_scale_inv"):
                tensor = torch.rand(shape, generator=generator) * 1e-3 + 1e-5
            else:
                tensor = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
            writer.write(key, tensor)
        writer.close()
        weight_map.update({k: name for k in entries})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config_dict = config.to_dict()
    config_dict["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                          "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2))
    return [(folder / f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors").stat().st_size for i in range(len(plan))]


CHILD = r"""
import json, os, sys, time
from pathlib import Path
mode, src, dst = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
start = time.perf_counter()
if mode.startswith("copy"):
    from safetensors.torch import load_file, save_file
    dst.mkdir(parents=True)
    for path in sorted(src.glob("*.safetensors")):
        save_file(load_file(path), str(dst / path.name), metadata={"format": "pt"})
        if mode == "copy+fsync":
            fd = os.open(dst / path.name, os.O_RDONLY); os.fsync(fd); os.close(fd)
elif mode == "load":
    import torch
    from modeling_deepseek_v3 import DeepseekV3ForCausalLM
    model = DeepseekV3ForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
else:
    from modeling_deepseek_v3.convert import fp8_to_bf16
    fp8_to_bf16(src, dst, progress=False)
seconds = time.perf_counter() - start
if mode == "load":
    out_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
else:
    out_bytes = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
# VmHWM, the peak RSS of this process image (ru_maxrss would include the parent's peak from before exec)
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "max_rss": hwm, "out_bytes": out_bytes}))
"""


def run_child(mode: str, src: Path, dst: Path) -> dict:
    if dst.exists():
        shutil.rmtree(dst)
    result = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(dst)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="deepseek-v3-lite")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers kept from the preset (plus its MTP)")
    parser.add_argument("--shard-mb", type=int, default=600)
    parser.add_argument("--workdir", default="/tmp/bench-conversion")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    fields = json.loads((PRESETS / f"{args.preset}.json").read_text())
    fields["num_hidden_layers"] = args.layers
    config = DeepseekV3Config(**fields)
    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    start = time.perf_counter()
    shard_sizes = generate(work / "fp8", config, args.shard_mb * 1024**2)
    in_bytes = sum(shard_sizes)
    print(f"generated {in_bytes / 1e9:.2f} GB FP8 checkpoint ({len(shard_sizes)} shards, largest "
          f"{max(shard_sizes) / 1e9:.2f} GB) in {time.perf_counter() - start:.1f} s")

    rows = {}
    for mode in ("copy", "copy+fsync", "convert", "load"):
        runs = [run_child(mode, work / "fp8", work / mode) for _ in range(args.repeats)]
        best = min(runs, key=lambda r: r["seconds"])
        best["max_rss"] = max(r["max_rss"] for r in runs)
        best["all_seconds"] = [round(r["seconds"], 2) for r in runs]
        rows[mode] = best
        shutil.rmtree(work / mode, ignore_errors=True)

    largest = max(shard_sizes)
    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; preset {args.preset} "
          f"cut to {args.layers} layers + {config.num_nextn_predict_layers} MTP; input {in_bytes / 1e9:.2f} GB")
    print(f"{'run':<12} {'seconds':>8} {'in GB/s':>8} {'out GB/s':>9} {'out GB':>7} {'peak RSS GB':>12} "
          f"{'RSS/largest shard':>18}  runs")
    for mode, r in rows.items():
        print(f"{mode:<12} {r['seconds']:8.2f} {in_bytes / r['seconds'] / 1e9:8.2f} "
              f"{r['out_bytes'] / r['seconds'] / 1e9:9.2f} {r['out_bytes'] / 1e9:7.2f} {r['max_rss'] / 1e9:12.2f} "
              f"{r['max_rss'] / largest:18.2f}  {r['all_seconds']}")
    convert = rows["convert"]
    print()
    print(f"convert / copy        = {convert['seconds'] / rows['copy']['seconds']:.2f}x time  (goal <= 1.5x)")
    print(f"convert / copy+fsync  = {convert['seconds'] / rows['copy+fsync']['seconds']:.2f}x time")
    print(f"convert peak RSS      = {convert['max_rss'] / largest:.2f}x the largest shard  (goal <= 2x)")
    load = rows["load"]
    print(f"from_pretrained(FP8 -> bf16 on the CPU): peak RSS {load['max_rss'] / 1e9:.2f} GB for a "
          f"{load['out_bytes'] / 1e9:.2f} GB model = model + {(load['max_rss'] - load['out_bytes']) / largest:.2f}x "
          f"the largest shard")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
