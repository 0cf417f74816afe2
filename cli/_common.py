"""What every command shares: consoles, error rendering, list parsing, JSON output."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, TypeVar

import typer
import typer.core
from rich.console import Console
from rich.text import Text

F = TypeVar("F", bound=Callable[..., Any])

Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON to stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output on stderr.")]


def stdout() -> Console:
    """Console for results (tables). No markup: names, paths and patterns print as given."""
    return Console(soft_wrap=False, markup=False)


def stderr() -> Console:
    """Console for diagnostics and progress. No markup (styles go through :func:`styled`)."""
    return Console(stderr=True, markup=False)


def styled(label: str, style: str, message: str) -> Text:
    """``label message`` with ``label`` in ``style`` (``error:`` in bold red...)."""
    return Text.assemble((label, style), f" {message}")


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` on stderr; return the Exit to raise."""
    # one line however narrow the terminal (or 80 columns when piped)
    stderr().print(styled("error:", "bold red", message), highlight=False, soft_wrap=True)
    return typer.Exit(code=code)


#: Settings the library's messages name as Python fields, and the options that set them.
_FLAGS = {
    name: "--" + name.replace("_", "-")
    for name in (
        "n_trials", "batch_size", "batches_per_epoch", "img_size", "train_fraction",
        "val_fraction", "max_params", "max_macs", "max_latency_ms", "num_classes", "in_chans",
        "gpus_per_trial", "epochs", "seed", "lr", "nproc",
    )
} | {"ema_decay": "--ema", "n_workers": "--workers"}  # fmt: skip
#: A field name alone, or a ``train.`` setting of a stored study (``train.batch_size``).
_FIELD = re.compile(r"(?<![\w/.-])(?:train\.)?(" + "|".join(_FLAGS) + r")(?![\w/.-])")
_LONE = ("epochs", "seed", "lr")  # (plain words too: translated only as ``train.`` settings)
_LEADING = re.compile(r"^(epochs|lr|seed|timeout|nproc|device) (must|is)\b")
_UNSET = re.compile(r"^(--[\w-]+ must be) None or ")  # (an option left out is None)
#: A quoted value (a path, a name as the user typed it): never translated.
_QUOTED = re.compile(r"""(?<!\w)('[^']*'|"[^"]*")(?!\w)""")


def as_flags(message: str) -> str:
    """A library message in the command line's words: ``n_trials`` -> ``--n-trials``, outside
    quoted values (paths and names as the user gave them)."""

    def flag(m: re.Match[str]) -> str:
        plain = m[1] in _LONE and not m[0].startswith("train.")
        return m[0] if plain else _FLAGS[m[1]]

    parts = _QUOTED.split(message)  # odd items: the quoted values
    text = "".join(p if i % 2 else _FIELD.sub(flag, p) for i, p in enumerate(parts))
    return _UNSET.sub(r"\1 ", _LEADING.sub(r"--\1 \2", text))


#: What Ctrl-C leaves where a command says nothing else: files are written to a temporary
#: name and renamed, so each is the old one or the new one, whole.
_NOTHING_HALF_WRITTEN = "no file was left half-written (re-run the command)"


@contextmanager
def on_interrupt(message: str | Callable[[], str], debug: bool = False) -> Iterator[None]:
    """Ctrl-C in the block ends the command with ``error: interrupted; MESSAGE`` (exit 130): what
    is kept and how to go on, which only the command knows (a traceback with --debug).
    ``message`` may be a function, asked at the interrupt."""
    try:
        yield
    except KeyboardInterrupt:
        if debug or os.environ.get("AN_SEARCH_DEBUG") == "1":
            raise
        text = message() if callable(message) else message
        raise fail(f"interrupted; {text}", 130) from None


def handle_errors(func: F) -> F:
    """Turn library errors into one-line messages and exit code 2 (tracebacks with --debug)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(kwargs.get("debug")) or os.environ.get("AN_SEARCH_DEBUG") == "1"
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            if debug:
                raise
            raise fail(f"interrupted; {_NOTHING_HALF_WRITTEN}", 130) from None
        except Exception as e:  # noqa: BLE001 - the one place errors become exit codes
            if debug:
                raise
            from an_search.errors import ANSearchError, RecipeError

            if isinstance(e, RecipeError):  # (about a file's fields, not the options)
                raise fail(str(e)) from None
            if isinstance(e, ANSearchError):
                raise fail(as_flags(str(e))) from None
            first = (str(e).splitlines() or [""])[0]
            raise fail(
                f"internal error {type(e).__name__}: {first} (re-run with --debug for a traceback)",
                1,
            ) from None

    return wrapper  # type: ignore[return-value]


#: click's exceptions, wherever this typer takes click from (its own copy since typer 0.22).
_CLICK = sys.modules[typer.BadParameter.__module__]


class _OneLineUsage:
    """A command line that click cannot parse (an unknown option, a value of the wrong type, a
    missing argument) ends as every other bad input does: ``error: MESSAGE (see 'CMD --help')``
    on one line, exit 2, instead of typer's usage box."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        run = super().main  # type: ignore[misc]
        if not standalone_mode:
            return run(*args, standalone_mode=False, **kwargs)
        try:
            code = run(*args, standalone_mode=False, **kwargs)
        except _CLICK.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # the help (rich has printed it)
                if e.format_message().strip():
                    e.show()
                sys.exit(e.exit_code)
            first = (e.format_message().strip().splitlines() or [type(e).__name__])[0].rstrip(".")
            # (without a context, e.g. an option missing its value: which command is unknown)
            where = (
                f" (see '{e.ctx.command_path} --help')" if e.ctx else " (see the command's --help)"
            )
            raise SystemExit(fail(first + where, e.exit_code).exit_code) from None
        except _CLICK.ClickException as e:
            raise SystemExit(fail(e.format_message(), e.exit_code).exit_code) from None
        except typer.Abort:
            raise SystemExit(fail("aborted", 1).exit_code) from None
        sys.exit(code if isinstance(code, int) else 0)


class Group(_OneLineUsage, typer.core.TyperGroup):
    """typer's group, with one-line usage errors (``typer.Typer(cls=Group)``)."""


class Command(_OneLineUsage, typer.core.TyperCommand):
    """typer's command, with one-line usage errors (``@app.command(cls=Command)``)."""


def split_list(value: str | None) -> list[str] | None:
    """``"a,b, c"`` -> ``["a", "b", "c"]``; None stays None."""
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_k(value: str | None) -> int | list[int] | None:
    """``"10"`` -> 10, ``"10,10,20,20"`` -> [10, 10, 20, 20]."""
    if value is None:
        return None
    from an_search.errors import InvalidKError

    parts = split_list(value) or []
    try:
        ks = [int(p) for p in parts]
    except ValueError:
        raise InvalidKError(
            f"--k {value!r} is not a number or a comma list of numbers: use e.g. --k 10 or "
            "--k 10,10,20,20"
        ) from None
    if not ks:
        raise InvalidKError("--k is empty: use e.g. --k 10 or --k 10,10,20,20")
    return ks[0] if len(ks) == 1 else ks


def parse_model_kwargs(items: list[str] | None) -> dict[str, Any]:
    """``["global_pool=max", "drop_path_rate=0.1"]`` -> ``{"global_pool": "max",
    "drop_path_rate": 0.1}`` (values read as JSON, else as YAML scalars: ``1e-3`` a number,
    ``max`` a string), checked as ``convert`` checks them.

    Raises:
        ModelConfigError: an item that is not KEY=VALUE, or an option convert refuses.
    """
    import yaml

    from an_search.conversion import check_model_kwargs
    from an_search.errors import ModelConfigError

    options: dict[str, Any] = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ModelConfigError(
                f"--model-kwargs {item!r} is not KEY=VALUE: give e.g. --model-kwargs "
                "global_pool=max"
            )
        try:  # JSON first: YAML 1.1 reads 1e-3 as a string, "on" as True
            value = json.loads(text)
        except ValueError:
            try:
                value = yaml.safe_load(text) if text.strip() else text
            except yaml.YAMLError:
                value = text
        options[key.strip()] = value
    return check_model_kwargs(options)


def print_json(data: Any) -> None:
    """Write JSON to stdout (no rich markup)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()
