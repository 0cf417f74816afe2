"""The contenders of the whole-model benchmarks (bench/models.py, bench/profile_step.py): a timm
model, its AN conversion and an SE model, with their training step and inference call."""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import timm
import torch

from an_search import convert


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options both benchmarks take: the models, the input and the precision."""
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (as an-search on CUDA)")
    p.add_argument(
        "--channels-last", action="store_true", help="NHWC models and input (an-search on CUDA)"
    )
    p.add_argument("--model", default="resnet50", help="the timm model AN converts")
    p.add_argument("--se-model", default="seresnet50", help="the SE contender, or none")
    p.add_argument("--placement", default="paper", help="an-convert's placement policy")
    p.add_argument("--classes", type=int, default=1000)


def build_models(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    """The base model, its AN conversion and (unless ``--se-model none``) the SE model, in
    that order, on ``args.device`` (channels-last with ``args.channels_last``)."""
    base = timm.create_model(args.model, pretrained=False, num_classes=args.classes)
    an = convert(copy.deepcopy(base), placement=args.placement, cost=False).model
    models = {args.model: base, f"an-{args.model}": an}
    if args.se_model != "none":
        models[args.se_model] = timm.create_model(
            args.se_model, pretrained=False, num_classes=args.classes
        )
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    return {name: m.to(args.device, memory_format=fmt) for name, m in models.items()}


def step_functions(
    variants: dict[str, torch.nn.Module], args: argparse.Namespace
) -> tuple[Callable[[str], None], Callable[[str], None]]:
    """``(train_step, infer)``, each called with a variant's name: one SGD step (forward,
    cross-entropy, backward, update) on a fixed random batch, and one forward in inference mode;
    under bfloat16 autocast with ``args.amp``."""
    dev = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=gen).to(dev)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.classes, (args.batch,), generator=gen).to(dev)
    loss_fn = torch.nn.CrossEntropyLoss()
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in variants.items()}

    cache = not getattr(args, "cuda_graphs", False)  # (captured graphs: autocast uncached)

    def autocast() -> torch.autocast:
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.amp, cache_enabled=cache)

    def train_step(name: str) -> None:
        m = variants[name]
        m.train()
        opts[name].zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(m(x), y)
        loss.backward()
        opts[name].step()

    def infer(name: str) -> None:
        m = variants[name]
        m.eval()
        with torch.inference_mode(), autocast():
            m(x)

    return train_step, infer
