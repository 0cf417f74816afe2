"""Whole-model throughput: resnet50 vs AN-resnet50 (paper placement) vs seresnet50.

Training step (forward + backward + SGD step) and inference, measured side by side in one run
(interleaved repeats in a new random order each repeat), optionally with torch.compile, on CPU
or a GPU. Ratios are the median over repeats of the two models' ratio within one repeat, as
bench/an_layer.py (the ratio of the two medians or minima is printed beside it).

    python bench/models.py --batch 8 --img-size 224 --repeats 5
    python bench/models.py --compile --device cuda --batch 64 [--amp] [--modes infer]
    python bench/models.py --device cuda --batch 64 --ops   # + AN without the Triton kernels
    python bench/models.py --device cuda --batch 64 --cuda-graphs  # each step one CUDA graph
    python bench/models.py --batch 1 --modes infer --fused  # + AN folded for deployment
    AN_SEARCH_NATIVE=0 python bench/models.py     # AN on stock ATen ops only
    python bench/models.py --model resnet10t --se-model none --placement all \
        --img-size 32 --batch 64 --classes 10     # an-search's default proxy training

``--cuda-graphs`` captures each model's training step (optimizer step included) and inference
as one CUDA graph after warm-up calls on a side stream, and times their replays: what the GPU
computes without the host's Python, dispatch and launches (eager AN on a GPU is bound by its
host), as ``torch.compile(mode="reduce-overhead")`` would replay them. A capture that fails
prints its error and skips that mode.

``--fused`` adds, in inference, the AN model as deployed: every site folded
(``an_search.fold_sites``, what ``timm.utils.reparameterize_model`` does to the sites: a
``FoldedAttentiveNorm``, without the per-call check of the folded form against the module's
tensors).

Targets: AN-resnet50 / resnet50 <= 1.05x (train step and inference), and below seresnet50.
``--model``, ``--se-model``, ``--placement`` swap the contenders (any timm model).
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Callable

import torch
from _contenders import add_arguments, build_models, step_functions  # bench/ on sys.path
from _timing import check_device, interleaved_times, paired_ratio, paired_ratio_ci

from an_search.layers import AttentiveNorm, _native, fold_sites


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also measure torch.compile'd models")
    p.add_argument("--stat", default="median", choices=["median", "min"], help="over repeats")
    p.add_argument(
        "--cuda-graphs", action="store_true", help="time each step as a replayed CUDA graph"
    )
    p.add_argument(
        "--ops", action="store_true", help="also AN on plain ATen ops (CUDA: no Triton kernels)"
    )
    p.add_argument(
        "--fused", action="store_true", help="also, in inference, AN with its sites folded"
    )
    p.add_argument(
        "--modes",
        nargs="+",
        default=["train", "infer"],
        choices=["train", "infer"],
        help="training step, inference, or both (each compiles its own graphs)",
    )
    args = p.parse_args()
    check_device(p, args.device)
    if args.ops and not args.device.startswith("cuda"):
        p.error("--ops needs --device cuda (the Triton site runs on CUDA tensors only)")
    if args.cuda_graphs and (not args.device.startswith("cuda") or args.compile):
        p.error("--cuda-graphs needs --device cuda and no --compile")
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    models = build_models(args)
    names = list(models)  # base, AN, [SE]
    if args.ops:  # the same AN model, its sites kept off the Triton kernels (AN_SEARCH_TRITON=0)
        models[f"{names[1]}-ops"] = copy.deepcopy(models[names[1]])
        for mod in models[f"{names[1]}-ops"].modules():
            if isinstance(mod, AttentiveNorm):
                mod.triton = False
    if args.fused:  # (a copy, in evaluation: what a deployed model runs)
        models[f"{names[1]}-fused"] = fold_sites(models[names[1]].eval())
    extras = [k.removeprefix(names[1]) for k in models if k.startswith(f"{names[1]}-")]
    variants: dict[str, torch.nn.Module] = dict(models)
    if args.compile:
        variants.update({f"{k}+compile": torch.compile(m) for k, m in models.items()})
    train_step, infer = step_functions(variants, args)

    kernels = _native.unavailable_reason() or "on"
    print(
        f"device={dev} batch={args.batch} img={args.img_size} threads={args.threads} "
        f"torch={torch.__version__} {args.stat} of {args.repeats} C kernels: {kernels}"
        f"{' amp=bfloat16' if args.amp else ''}{' channels_last' if args.channels_last else ''}"
        f"{' cuda_graphs' if args.cuda_graphs else ''}"
    )
    stat = min if args.stat == "min" else statistics.median
    steps = {"train": ("train step", train_step), "infer": ("inference", infer)}
    for mode, fn in (steps[m] for m in dict.fromkeys(args.modes)):
        timed = [k for k in variants if fn is infer or "-fused" not in k]  # (no training)
        fns = {k: (lambda k=k, fn=fn: fn(k)) for k in timed}
        if args.cuda_graphs:
            try:
                fns = {k: graphed(f, args.warmup) for k, f in fns.items()}
            except RuntimeError as e:  # (a host sync or an uncapturable op in a step)
                print(f"{mode}: CUDA graph capture failed: {str(e).splitlines()[0]}")
                continue
        times = interleaved_times(fns, repeats=args.repeats, warmup=args.warmup, device=dev)
        del fns  # (the graphs' memory pools)
        for suf in ["", "+compile"] if args.compile else [""]:
            _report(mode, suf, times, stat, args.batch, names, extras)


def graphed(fn: Callable[[], None], warmup: int) -> Callable[[], None]:
    """``fn`` captured as one CUDA graph, after ``warmup`` (at least 3) calls on a side stream
    (lazily built state: optimizer buffers, cached plans, Triton's compiled kernels), as
    PyTorch's whole-network capture does; returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 3)):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _report(
    mode: str,
    suf: str,
    times: dict[str, list[float]],
    stat: Callable,
    batch: int,
    names: list[str],
    extras: list[str],
) -> None:
    """One line per mode: times (``stat`` over repeats) and the ratios, each the median over
    repeats of the two models' ratio within one repeat (a slow stretch of the machine slows
    both) with its 95% confidence interval (sign test, bench/_timing.py); the ratio of the two
    ``stat``s follows in parentheses. ``names``: the base model, its AN model, [the SE model];
    ``extras``: the suffixes of the AN model's other variants (``-ops``, ``-fused``), a line each
    where this mode timed it."""
    base, an = times[f"{names[0]}{suf}"], times[f"{names[1]}{suf}"]
    se = times[f"{names[2]}{suf}"] if len(names) > 2 else None

    def ratio(a: list[float], b: list[float], label: str) -> str:
        return (
            f"{label} {paired_ratio(a, b):.3f}x {paired_ratio_ci(a, b)} ({stat(a) / stat(b):.3f}x)"
        )

    def ratios(a: list[float]) -> str:
        return ratio(a, base, "AN/BN") + ("" if se is None else "  " + ratio(a, se, "AN/SE"))

    cells = "  ".join(f"{n} {stat(times[n + suf]) * 1e3:8.1f} ms" for n in names)
    print(f"{mode:10s}{suf:9s} {cells}  | {ratios(an)}  | {batch / stat(an):.1f} img/s")
    for extra in extras:
        other = times.get(f"{names[1]}{extra}{suf}")
        if other is not None:
            print(
                f"{'':19s} {names[1]}{extra} {stat(other) * 1e3:8.1f} ms  | {ratios(other)}  | "
                f"AN/AN{extra} {paired_ratio(an, other):.3f}x {paired_ratio_ci(an, other)}"
            )


if __name__ == "__main__":
    main()
