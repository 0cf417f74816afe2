"""``an-convert MODEL``: put Attentive Normalization into a timm model, report cost, save."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ._common import (
    Command,
    Debug,
    JsonOut,
    handle_errors,
    parse_k,
    parse_model_kwargs,
    print_json,
    split_list,
    stderr,
    stdout,
    styled,
)

if TYPE_CHECKING:
    from an_search.conversion import ConvertResult
    from an_search.rewrite import SiteReport

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command(cls=Command)
@handle_errors
def convert(
    model: Annotated[
        str | None,
        typer.Argument(help="timm model name, e.g. resnet50 or resnet50.a1_in1k (or --recipe's)"),
    ] = None,
    placement: Annotated[
        str | None,
        typer.Option(help="paper (default), all, last-in-block, after-3x3, after-depthwise, none"),
    ] = None,
    k: Annotated[str | None, typer.Option("--k", help="K: one number or one per stage")] = None,
    head: Annotated[
        str | None, typer.Option(help="attention head, a registry name (default: default)")
    ] = None,
    pool: Annotated[
        str | None, typer.Option(help="pooled statistic: meanstd (default), avg, avgmax")
    ] = None,
    recipe: Annotated[
        Path | None,
        typer.Option(
            help="convert as a recipe says (recipe.json or its folder, e.g. an export's rank "
            "folder): its sites, K, heads and pools"
        ),
    ] = None,
    include: Annotated[
        list[str] | None, typer.Option(help="add sites: glob, or re:REGEX (repeatable)")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="remove sites: glob, or re:REGEX (repeatable)")
    ] = None,
    roles: Annotated[str | None, typer.Option(help="keep sites with these roles (a,b)")] = None,
    stages: Annotated[str | None, typer.Option(help="keep sites in these stages (0,1)")] = None,
    norm_types: Annotated[str | None, typer.Option(help="keep these norm classes")] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="local weights: .safetensors or .pth (weights_only)")
    ] = None,
    num_classes: Annotated[int | None, typer.Option(help="classifier size")] = None,
    in_chans: Annotated[
        int | None, typer.Option(help="input channels (default: 3, or --recipe's)")
    ] = None,
    img_size: Annotated[int | None, typer.Option(help="input size for cost and model")] = None,
    model_kwargs: Annotated[
        list[str] | None,
        typer.Option(
            help="a further timm.create_model option, KEY=VALUE (global_pool=max, "
            "drop_path_rate=0.1), kept in the recipe (repeatable)"
        ),
    ] = None,
    init: Annotated[
        str | None,
        typer.Option(
            help="paper or preserve (default: preserve with --checkpoint, else paper, "
            "or --recipe's)"
        ),
    ] = None,
    no_weight_decay: Annotated[
        bool, typer.Option("--no-weight-decay", help="exclude AN mixtures from weight decay")
    ] = False,
    list_sites: Annotated[
        bool, typer.Option("--list-sites", help="list every site and its roles; change nothing")
    ] = False,
    output: Annotated[
        Path | None, typer.Option(help="write model.safetensors + recipe.json here")
    ] = None,
    seed: Annotated[
        int, typer.Option(help="seed of the random init (model and AN): same seed, same weights")
    ] = 0,
    json_out: JsonOut = False,
    debug: Debug = False,
) -> None:
    """Convert MODEL to Attentive Normalization and report params and MACs before/after."""
    from an_search.conversion import convert as run_convert
    from an_search.conversion import convert_recipe
    from an_search.errors import InvalidKError, ModelConfigError, RecipeError, UnknownModelError
    from an_search.models import create_model
    from an_search.rewrite import find_sites, read_recipe, save

    if recipe is not None:
        chosen = {
            "--placement": placement, "--k": k, "--head": head, "--pool": pool,
            "--include": include, "--exclude": exclude, "--roles": roles, "--stages": stages,
            "--norm-types": norm_types, "--no-weight-decay": no_weight_decay,
            "--model-kwargs": model_kwargs,
        }  # fmt: skip
        clash = next((flag for flag, value in chosen.items() if value), None)
        if clash is not None:
            raise RecipeError(
                f"--recipe fixes the sites, K, heads, pools and the model's options, so {clash} "
                f"has nothing to change: drop {clash}, or drop --recipe"
            )
        plan = read_recipe(recipe)
        model = model or plan.model
    elif model is None:
        raise UnknownModelError("no model given: name a timm model (e.g. resnet50) or --recipe")
    options = parse_model_kwargs(model_kwargs)
    if list_sites:
        if output is not None:
            raise ModelConfigError(
                "--list-sites converts nothing, so --output would stay empty: drop one of them"
            )
        sizes: dict[str, Any] = {
            "num_classes": num_classes, "in_chans": in_chans, "img_size": img_size
        }  # fmt: skip
        if recipe is not None:  # the model the conversion below would build (its weights may
            report = convert_recipe(  # be a saved AN model's, loaded once it is converted)
                plan, model=model, checkpoint=checkpoint, cost=False, **sizes
            ).report
        else:
            report = find_sites(create_model(model, checkpoint=checkpoint, **sizes, **options))
        if json_out:
            print_json({"model": model, **_report_json(report, {})})
        else:
            _print_sites(model, report)
        return
    stage_ids = split_list(stages)
    try:
        stage_list = [int(s) for s in stage_ids] if stage_ids is not None else None
    except ValueError:
        raise InvalidKError(f"--stages {stages!r} must be comma-separated integers") from None
    with stderr().status(f"converting {model}...") if not json_out else nullcontext():
        if recipe is not None:
            result = convert_recipe(
                plan, model=model, num_classes=num_classes, in_chans=in_chans,
                img_size=img_size, checkpoint=checkpoint, init=init, seed=seed,
            )  # fmt: skip
        else:
            result = run_convert(
                model,
                placement=placement or "paper",
                k=parse_k(k),
                head=head or "default",
                pool=pool or "meanstd",
                include=include or (),
                exclude=exclude or (),
                roles=split_list(roles),
                stages=stage_list,
                norm_types=split_list(norm_types),
                init=init,
                num_classes=num_classes,
                in_chans=in_chans,
                img_size=img_size,
                checkpoint=checkpoint,
                no_weight_decay=no_weight_decay,
                seed=seed,
                model_kwargs=options,
            )
        if output is not None:
            save(result.model, result.recipe, output)
    if json_out:
        print_json(_result_json(model, result, output))
    else:
        _print_result(model, result, output)


def _site_row(site: Any, k: int | None) -> dict[str, Any]:
    return {
        "name": site.name,
        "type": site.norm_type,
        "channels": site.channels,
        "stage": site.stage,
        "k": k,
        "roles": list(site.roles),
        "supported": site.supported,
    }


def _report_json(report: SiteReport, selected: dict[str, int]) -> dict[str, Any]:
    return {
        "traced": report.traced,
        "fallback_reason": report.fallback_reason,
        "num_stages": report.num_stages,
        "sites": [_site_row(s, selected.get(s.name)) for s in report.sites],
    }


def _result_json(model: str, result: ConvertResult, output: Path | None) -> dict[str, Any]:
    sel, how = result.selected, {r.name: r for r in result.recipe.sites}
    before, after = result.cost_before, result.cost_after
    assert before is not None and after is not None
    return {
        "model": model,
        "input_size": list(result.input_size),
        "traced": result.report.traced,
        "fallback_reason": result.report.fallback_reason,
        "sites": [
            {**_site_row(s, sel[s.name]), "head": how[s.name].head, "pool": how[s.name].pool}
            for s in result.report.sites
            if s.name in sel
        ],
        "init": result.recipe.init,
        "params_before": before.params,
        "params_after": after.params,
        "macs_before": before.macs,
        "macs_after": after.macs,
        "macs_unit": "multiply-adds (fvcore counts one multiply-add as one flop)",
        "unsupported_ops": after.unsupported_ops,
        "output": str(output) if output else None,
    }


def _print_sites(model: str, report: SiteReport) -> None:
    from rich.table import Table

    if not report.traced:
        reason = f"not traced ({report.fallback_reason}); roles are partial"
        stderr().print(styled("note:", "yellow", reason))
    unsupported = f", {len(report.unsupported)} AN cannot replace" if report.unsupported else ""
    table = Table(title=f"{model}: {len(report.sites)} normalization sites{unsupported}")
    for col in ("site", "type", "C", "stage", "roles"):
        table.add_column(col)
    for s in report.sites:
        stage = "-" if s.stage is None else str(s.stage)
        kind = s.norm_type if s.supported else f"{s.norm_type} (unsupported)"
        table.add_row(s.name, kind, str(s.channels), stage, ", ".join(s.roles))
    stdout().print(table)


def _print_result(model: str, result: ConvertResult, output: Path | None) -> None:
    from rich.table import Table

    before, after = result.cost_before, result.cost_after
    assert before is not None and after is not None
    if not result.report.traced:
        stderr().print(styled("note:", "yellow", f"not traced ({result.report.fallback_reason})"))
    by_name = {s.name: s for s in result.report.sites}
    how = {r.name: f"{r.head}, {r.pool}" for r in result.recipe.sites}
    kinds = set(how.values())
    shared = f"head and pool {kinds.pop()}, " if len(kinds) == 1 else ""  # else a column
    table = Table(
        title=f"{model}: AN at {len(result.selected)} of {len(by_name)} sites ({shared}init "
        f"{result.recipe.init})"
    )
    for col in ("site", "type", "C", "stage", "K", "roles", *(() if shared else ("head, pool",))):
        table.add_column(col)
    for name, k in result.selected.items():
        s = by_name[name]
        stage = "-" if s.stage is None else str(s.stage)
        mixed = () if shared else (how[name],)
        table.add_row(name, s.norm_type, str(s.channels), stage, str(k), ", ".join(s.roles), *mixed)
    out = stdout()
    out.print(table)
    totals = Table(title=f"cost at input {tuple(result.input_size)} (MACs = multiply-adds)")
    for col in ("", "before", "after", "delta"):
        totals.add_column(col, justify="right")
    # (in full, as --max-params/--max-macs take them: GMACs to 4 places hid small models')
    for label, was, now in (
        ("params", before.params, after.params),
        ("MACs", before.macs, after.macs),
    ):
        totals.add_row(
            label, f"{was:,}", f"{now:,}", f"{now - was:+,} ({(now - was) / max(was, 1):+.2%})"
        )
    out.print(totals)
    if after.unsupported_ops:
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(after.unsupported_ops.items()))
        stderr().print(f"ops fvcore could not count (not in totals): {ops}", style="dim")
    if output is not None:
        stderr().print(f"saved to {output}/ (model.safetensors, recipe.json)")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
