"""Benchmark the classifiers side by side on CPU: parameters, forward FLOPs, training-step time.

    python bench/models.py                              # all models, 224 and 64, 5 steps
    python bench/models.py --sizes 64 --models resnet50 adsr_resnet50 --steps 3
    python bench/models.py --params-only                # the parameter table of docs/models.md

A model is a registered name, optionally with options: ``adsr_resnet50:gsa=channelwise``
(``name:key=value,key=value``; values are parsed as Python literals when they can be).

For every input size all models are built first, then timed round-robin (step 1 of every
model, step 2 of every model, ...) so that load from other processes hits them alike; each
model gets one warm-up step, and the reported time is the median over ``--steps`` steps of one
training step (forward, ``logits.sum().backward()``; no optimizer) divided by the batch size,
both wall-clock and process CPU time (``time.process_time``; on a shared machine the CPU time is
the steadier number with ``--threads 1``). Ratios are paired: the median over rounds of
(model step / resnet50 step in the same round), and the round order rotates.
FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` on one forward pass of one image (it counts
convolutions and matrix products, x2 for multiply-add; BN, activations, pooling and the style
statistics are not counted). Then the ratios to resnet50 and the ADSR time goal (faithful
ADSR-ResNet-50 <= 1.25x ResNet-50's training-step time at 224).
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout as a script
from models import create_model, list_models  # noqa: E402

NUM_CLASSES = 7  # ISIC2018
DEFAULT_MODELS = ["resnet18", "resnet34", "resnet50", "adsr_resnet18", "adsr_resnet34",
                  "adsr_resnet50", "adsr_resnet50:gsa=channelwise", "se_resnet50", "srm_resnet50",
                  "cabnet50", "lrf_cnn"]
PARAMS_MODELS = DEFAULT_MODELS[:7] + ["adsr_resnet50:psf_kernels=(1,3,3)",
                                      "adsr_resnet18:gsa=channelwise"] + DEFAULT_MODELS[7:]
DEFAULT_BATCH = {224: 4, 64: 8}
RATIOS = [("adsr_resnet50", "resnet50"), ("adsr_resnet50:gsa=channelwise", "resnet50"),
          ("lrf_cnn", "resnet50")]
TIME_GOAL = 1.25


def parse_spec(spec: str) -> tuple[str, dict]:
    """``"adsr_resnet50:gsa=channelwise,psf_kernels=(1,3,3)"`` -> name and options."""
    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, _split_options(rest)):
        key, _, value = item.partition("=")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return name, options


def _split_options(text: str) -> list[str]:
    """Split on commas outside parentheses (so tuples survive)."""
    items, depth, current = [], 0, ""
    for char in text:
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    return items + [current]


def build(spec: str) -> torch.nn.Module:
    name, options = parse_spec(spec)
    torch.manual_seed(0)
    return create_model(name, num_classes=NUM_CLASSES, **options)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: torch.nn.Module, size: int) -> int:
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, size, size))
    model.train()
    return counter.get_total_flops()


def train_step(model: torch.nn.Module, images: torch.Tensor) -> tuple[float, float]:
    """One forward + backward; returns (wall seconds, process CPU seconds)."""
    model.zero_grad(set_to_none=True)
    wall, cpu = time.perf_counter(), time.process_time()
    model(images).sum().backward()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_size(specs: list[str], size: int, batch: int, steps: int,
               channels_last: bool) -> dict[str, dict]:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=memory_format)
    models, rows = {}, {}
    for spec in specs:
        model = build(spec)
        rows[spec] = {"size": size, "batch": batch, "params": count_params(model),
                      "flops_per_image": count_flops(model, size), "step_s": [], "cpu_s": []}
        models[spec] = model.to(memory_format=memory_format).train()
    for spec, model in models.items():  # warm-up
        train_step(model, images)
    order = list(models)
    for step in range(steps):  # round-robin, starting one model later each round
        for spec in order[step % len(order):] + order[:step % len(order)]:
            wall, cpu = train_step(models[spec], images)
            rows[spec]["step_s"].append(wall)
            rows[spec]["cpu_s"].append(cpu)
    for row in rows.values():
        row["ms_per_image"] = 1000 * statistics.median(row["step_s"]) / batch
        row["cpu_ms_per_image"] = 1000 * statistics.median(row["cpu_s"]) / batch
    return rows


def paired_ratio(num: dict, den: dict, key: str) -> float:
    """Median over rounds of num/den for the same round (steps taken seconds apart)."""
    return statistics.median(a / b for a, b in zip(num[key], den[key]))


def fmt_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def print_params_table(specs: list[str]) -> None:
    """Markdown table: parameters, ratio to resnet50, and what ADSR adds to its plain ResNet."""
    counts = {spec: count_params(build(spec)) for spec in specs}
    for base in {parse_spec(s)[0].removeprefix("adsr_") for s in specs} | {"resnet50"}:
        if base not in counts and base in list_models():
            counts.setdefault(base, count_params(build(base)))
    print(f"| model | parameters (num_classes={NUM_CLASSES}) | vs resnet50 | added by ADSR |")
    print("|---|---:|---:|---:|")
    for spec in specs:
        name = parse_spec(spec)[0]
        added = (f"+{counts[spec] - counts[name.removeprefix('adsr_')]:,}"
                 if name.startswith("adsr_") else "")
        ratio = counts[spec] / counts["resnet50"]
        print(f"| `{spec}` | {counts[spec]:,} | {ratio:.2f}x | {added} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 64])
    parser.add_argument("--models", nargs="+", default=None,
                        help=f"registered names ({', '.join(list_models())}), optionally "
                             "name:key=value,... (default: all, plus adsr_resnet50 channelwise)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model (median)")
    parser.add_argument("--batch", type=int, default=None,
                        help=f"batch size for every size (default {DEFAULT_BATCH}, else 4)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC models and inputs")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--params-only", action="store_true",
                        help="print the Markdown parameter table and exit")
    args = parser.parse_args(argv)

    if args.params_only:
        print_params_table(args.models or PARAMS_MODELS)
        return 0
    args.models = args.models or DEFAULT_MODELS
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {torch.get_num_threads()} threads, "
          f"channels_last={args.channels_last}, steps={args.steps}, num_classes={NUM_CLASSES}, "
          f"load average at start {os.getloadavg()[0]:.1f}")
    results: dict[int, dict[str, dict]] = {}
    for size in args.sizes:
        batch = args.batch or DEFAULT_BATCH.get(size, 4)
        results[size] = bench_size(args.models, size, batch, args.steps, args.channels_last)

    print(f"# load average at end {os.getloadavg()[0]:.1f} (other processes share these cores)")
    print("\n| model | size | batch | params | GFLOPs/img (fwd) | train ms/img (wall, median) "
          "| train CPU ms/img (median) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for size, rows in results.items():
        for spec, row in rows.items():
            print(f"| `{spec}` | {size} | {row['batch']} | {fmt_count(row['params'])} | "
                  f"{row['flops_per_image'] / 1e9:.2f} | {row['ms_per_image']:.1f} | "
                  f"{row['cpu_ms_per_image']:.1f} |")

    print("\n| ratio | size | time (wall) | time (CPU) | params | FLOPs |")
    print("|---|---:|---:|---:|---:|---:|")
    ratios = []
    for size, rows in results.items():
        for num, den in RATIOS:
            if num in rows and den in rows:
                r = {"ms_per_image": paired_ratio(rows[num], rows[den], "step_s"),
                     "cpu_ms_per_image": paired_ratio(rows[num], rows[den], "cpu_s"),
                     "params": rows[num]["params"] / rows[den]["params"],
                     "flops_per_image": rows[num]["flops_per_image"] / rows[den]["flops_per_image"]}
                ratios.append({"ratio": f"{num} / {den}", "size": size, **r})
                print(f"| `{num}` / `{den}` | {size} | {r['ms_per_image']:.2f}x | "
                      f"{r['cpu_ms_per_image']:.2f}x | {r['params']:.2f}x | "
                      f"{r['flops_per_image']:.2f}x |")

    faithful = [r for r in ratios if r["ratio"] == "adsr_resnet50 / resnet50"]
    if faithful:
        print()
        for r in faithful:
            verdict = "MET" if r["ms_per_image"] <= TIME_GOAL else "NOT MET"
            print(f"Goal (faithful adsr_resnet50 training step <= {TIME_GOAL}x resnet50) at "
                  f"{r['size']}: {verdict} ({r['ms_per_image']:.2f}x wall, "
                  f"{r['cpu_ms_per_image']:.2f}x CPU time)")
            if verdict == "NOT MET":
                cheap = [c for c in ratios if c["size"] == r["size"]
                         and c["ratio"] == "adsr_resnet50:gsa=channelwise / resnet50"]
                if cheap:
                    print(f"  gsa='channelwise' at {r['size']}: {cheap[0]['ms_per_image']:.2f}x "
                          f"wall, {cheap[0]['cpu_ms_per_image']:.2f}x CPU time, "
                          f"{cheap[0]['params']:.2f}x params")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "ratios": ratios,
                                         "threads": torch.get_num_threads(),
                                         "channels_last": args.channels_last}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
