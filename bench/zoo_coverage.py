"""Sweep timm's model zoo: how many architectures with norm layers an-convert handles.

For every ``timm.list_models()`` architecture (pretrained off) under a parameter cap: build it,
find its sites, convert every supported site (``--placement all``, ``init=preserve``), and check
that an eval forward pass runs and gives the same output as the unconverted model (preserve init
is exact), and that a training forward/backward pass runs. Prints the fraction converted and every
failure with its reason. Results are appended to a JSONL file so an interrupted sweep resumes.

    python bench/zoo_coverage.py --max-params 30e6 --out zoo.jsonl
    python bench/zoo_coverage.py --filter 'resnet*' --shard 0/2

Target: at least 98% of the architectures that have norm layers.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import time
import traceback
from pathlib import Path
from typing import Any

import timm
import torch

from an_search.layers import NORM_CLASSES
from an_search.rewrite import apply_an, find_sites, select_sites


def _input(model: torch.nn.Module, side_cap: int | None) -> torch.Tensor:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    c, h, w = cfg.get("input_size", (3, 224, 224))
    if side_cap is not None and not cfg.get("fixed_input_size", False):
        h, w = min(h, side_cap), min(w, side_cap)
    return torch.randn(2, c, h, w, dtype=torch.float64)


def _reference(model: torch.nn.Module, side_cap: int) -> tuple[torch.Tensor, object]:
    """An input the unconverted model accepts (the capped side first, then its own size)."""
    try:
        x = _input(model, side_cap)
        with torch.no_grad():
            return x, model(x)
    except Exception:  # noqa: BLE001 - some models need their native input size
        x = _input(model, None)
        with torch.no_grad():
            return x, model(x)


def check(name: str, max_params: float, side_cap: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"model": name}
    try:
        with torch.device("meta"):
            meta = timm.create_model(name, pretrained=False)
        n = sum(p.numel() for p in meta.parameters())
        rec["params"] = n
        if n > max_params:
            return {**rec, "status": "skipped", "reason": f"{n / 1e6:.0f}M params over the cap"}
        norms = [m for m in meta.modules() if isinstance(m, NORM_CLASSES)]
        if not norms:
            return {**rec, "status": "no-norm"}
        del meta
        torch.manual_seed(0)
        # float64: preserve init is exact up to rounding, and random-init nets can amplify
        # float32 rounding (1e-7) through dozens of sites into visible output differences.
        model = timm.create_model(name, pretrained=False).double().eval()
        try:
            x, ref = _reference(model, side_cap)
        except Exception as e:  # noqa: BLE001
            return {
                **rec,
                "status": "model-error",
                "reason": f"unconverted model fails: {e!r:.120}",
            }
        report = find_sites(model)
        rec["traced"] = report.traced
        rec["sites"] = len(report.sites)
        if not any(site.supported for site in report.sites):  # (SimpleNorm, EvoNorm...: by design)
            kinds = sorted({site.norm_type for site in report.sites})
            return {**rec, "status": "unsupported-norm", "reason": ", ".join(kinds)}
        site_k = select_sites(report, "all", k=4)
        rec["converted"] = len(site_k)
        conv = apply_an(copy.deepcopy(model), site_k, init="preserve").eval()
        with torch.no_grad():
            out = conv(x)
        if isinstance(ref, torch.Tensor):
            err = (out - ref).abs().max().item() / (ref.abs().max().item() + 1e-6)
            rec["rel_err"] = err
            if not err < 1e-6:
                return {**rec, "status": "fail", "reason": f"preserve output differs ({err:.2e})"}
        conv.train()
        out = conv(x)
        (out if isinstance(out, torch.Tensor) else out[0]).mean().backward()
        rec["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - a sweep records every failure and goes on
        rec["status"] = "fail"
        rec["reason"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        rec["where"] = traceback.extract_tb(e.__traceback__)[-1].filename.split("site-packages/")[
            -1
        ]
    finally:
        rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-params", type=float, default=30e6, help="skip larger models")
    p.add_argument("--side-cap", type=int, default=128, help="input side for flexible models")
    p.add_argument("--filter", default="*", help="glob on model names")
    p.add_argument("--shard", default="0/1", help="i/n: every n-th model starting at i")
    p.add_argument("--out", type=Path, default=Path("zoo_coverage.jsonl"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    i, n = (int(v) for v in args.shard.split("/"))
    names = [m for m in timm.list_models() if fnmatch.fnmatch(m, args.filter)][i::n]
    done: dict[str, dict[str, Any]] = {}
    settings = [args.max_params, args.side_cap]  # a record made under others is made again
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("settings") == settings:
                done[rec["model"]] = rec
    print(f"param cap {args.max_params / 1e6:.0f}M; {len(names)} architectures; {len(done)} done")
    with args.out.open("a") as f:
        for k, name in enumerate(names):
            if name in done:
                continue
            rec = check(name, args.max_params, args.side_cap) | {"settings": settings}
            done[name] = rec
            f.write(json.dumps(rec) + "\n")
            f.flush()
            print(f"[{k + 1}/{len(names)}] {name}: {rec['status']} {rec.get('reason', '')}")
    results = [done[m] for m in names if m in done]
    with_norm = [r for r in results if r["status"] in ("ok", "fail")]
    ok = [r for r in with_norm if r["status"] == "ok"]
    skipped = [r for r in results if r["status"] == "skipped"]
    no_norm = [r for r in results if r["status"] == "no-norm"]
    broken = [r for r in results if r["status"] == "model-error"]
    unsupported = [r for r in results if r["status"] == "unsupported-norm"]
    print(f"\nparameter cap: {args.max_params / 1e6:.0f}M ({len(skipped)} larger models skipped)")
    print(f"architectures without norm layers: {len(no_norm)}")
    print(f"architectures whose unconverted forward fails here (not counted): {len(broken)}")
    print(
        f"architectures with only norms AN does not replace (not counted): {len(unsupported)}"
        + "".join(f"\n  {r['model']}: {r['reason']}" for r in unsupported)
    )
    frac = len(ok) / max(len(with_norm), 1)
    print(f"converted: {len(ok)}/{len(with_norm)} = {frac:.1%} of architectures with norm layers")
    for r in with_norm:
        if r["status"] == "fail":
            print(f"  FAIL {r['model']}: {r.get('reason')}")


if __name__ == "__main__":
    main()
