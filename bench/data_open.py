"""A trial's data setup (``create_loaders``: both splits opened, subsets drawn) with the tar
index kept from an earlier open vs scanned again, in one run.

    python bench/data_open.py [--data PATH.tar] [--repeats 9]

Every trial of a search, and the checks before it, open the dataset's splits; timm's tar reader
reads every member's header to index a tar (the embedded 8000 + 2000 images; an ImageNet tar
holds 1.28 M). ``scanned`` empties the process's kept indexes before each call, as every open
was before they were kept; ``kept`` reuses them. The calls alternate in a new random order each
repeat; the ratio is the median of the within-repeat ratios (95% interval in brackets).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _timing import interleaved_times, paired_ratio, paired_ratio_ci  # noqa: E402

from an_search.train import _scanned, create_loaders, resolve_data  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="a .tar or folder (default: the embedded data)")
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args()
    spec = resolve_data(args.data)

    def loaders() -> object:
        return create_loaders(spec, img_size=32, batch_size=64, val_fraction=0.05)

    def scanned() -> object:
        _scanned._CACHE.clear()
        return loaders()

    times = interleaved_times(
        {"scanned": scanned, "kept": loaders},
        repeats=args.repeats,
        warmup=1,
        device=torch.device("cpu"),
    )
    for name, ts in times.items():
        print(f"{name:8s} {1e3 * statistics.median(ts):8.1f} ms")
    a, b = times["scanned"], times["kept"]
    print(f"scanned/kept {paired_ratio(a, b):.1f}x {paired_ratio_ci(a, b)}")


if __name__ == "__main__":
    main()
