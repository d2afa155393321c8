#!/usr/bin/env python
"""Time a GaLore projector refresh, exact against randomized SVD, at a model's matrix shapes.

    python tools/benchmark_svd.py --model_config llama2-7b --rank 256 [--repeats 1]

For each distinct 2-D shape of one decoder layer, on the training device: the seconds of
galore.compute_projector with svd="exact" and "randomized" side by side, their ratio, and how
much of a bf16 gradient-like matrix (rank-64 signal plus noise) each projector keeps
(||P G|| / ||G||; the exact one is the most any rank-r projector can keep).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from owlore_ds.architectures import load_config  # noqa: E402
from owlore_ds.cli import run_main  # noqa: E402


def layer_shapes(config) -> list[tuple[int, int]]:
    """The distinct (out, in) shapes of one decoder layer's linears."""
    from owlore_ds.memory_model import _shapes

    return sorted({tuple(shape) for _, shape in _shapes(config).layer_tensors() if len(shape) == 2})


def kept_fraction(grad, projector) -> float:
    g, p = grad.float(), projector.float()
    kept = g @ p.T if p.shape[1] == g.shape[1] else p.T @ g
    return float(kept.norm() / g.norm())


def main(argv: list[str] | None = None) -> None:
    import torch
    from deepspeed.accelerator import get_accelerator

    from owlore_ds.galore import compute_projector

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_config", default="llama2-7b", help="a bundled architecture or a config.json / model folder")
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1, help="timings per shape and method (the median is shown)")
    args = p.parse_args(argv)
    device = torch.device(get_accelerator().current_device_name())
    generator = torch.Generator().manual_seed(0)
    print(f"{args.model_config}, rank {args.rank}, device {device}")
    print("| shape | exact s | randomized s | exact / randomized | kept, exact | kept, randomized |")
    print("|---|---|---|---|---|---|")
    for m, n in layer_shapes(load_config(args.model_config, None)):
        signal = torch.randn(m, 64, generator=generator) @ torch.randn(64, n, generator=generator)
        grad = (signal + 0.3 * torch.randn(m, n, generator=generator)).to(device, torch.bfloat16)
        seconds, projectors = {}, {}
        for svd in ("exact", "randomized"):
            timings = []
            for _ in range(args.repeats):
                get_accelerator().synchronize()
                start = time.perf_counter()
                projectors[svd] = compute_projector(grad, args.rank, "std", svd=svd)
                get_accelerator().synchronize()
                timings.append(time.perf_counter() - start)
            seconds[svd] = sorted(timings)[len(timings) // 2]
        print(f"| {m} x {n} | {seconds['exact']:.2f} | {seconds['randomized']:.2f} | "
              f"{seconds['exact'] / seconds['randomized']:.1f}x | {kept_fraction(grad, projectors['exact']):.4f} | "
              f"{kept_fraction(grad, projectors['randomized']):.4f} |", flush=True)


if __name__ == "__main__":
    run_main(main)
