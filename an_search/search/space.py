"""Search spaces: YAML files in Optuna's distribution vocabulary, validated on load.

A space is a mapping from the keys below to a parameter. A parameter is a constant (``pool:
meanstd``) or an Optuna distribution written as a mapping: ``{type: categorical, choices: [...]}``,
``{type: int, low, high, step, log}`` or ``{type: float, low, high, step, log}`` (the arguments of
``optuna.distributions``).

Keys (all optional; a missing key takes the paper's value):
    description: free text.
    placement:   site-selection preset (rewrite's placements, e.g. ``paper``, ``all``, ``none``) or
                 ``per-stage``, which picks a role per stage with ``stage_role``.
    stage_role:  for ``per-stage``: ``none``, ``all`` or a site role (``after-3x3``,
                 ``last-in-block``...); one Optuna parameter per stage, ``stage{i}_role``.
    k:           K for each stage with AN, one parameter per stage (``stage{i}_k``). Add
                 ``shared: true`` for one K everywhere (``k``), or give ``per_stage: [param, ...]``
                 with one parameter per stage of the model. Integers >= 1.
    head:        attention head (``an_search.layers.HEADS`` names).
    pool:        pooled statistic (``an_search.layers.POOLS``: meanstd, avg, avgmax).
    base:        which base norm to convert (``any``, or a base kind such as ``batchnorm``,
                 ``layernorm``); sampled only when the model has sites of several kinds.
    init:        ``paper`` or ``preserve`` (a converted layer starts as the norm it replaces);
                 unset: ``preserve`` when the search starts from a checkpoint, else ``paper``.

Errors are one line, "rule, then the bad value", raised as :class:`SpaceError`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from an_search.errors import MAX_K, SpaceError

from ._names import PER_STAGE, known_names

__all__ = [
    "PER_STAGE",
    "Param",
    "SearchSpace",
    "list_spaces",
    "load_space",
    "parse_space",
    "shipped_name",
]

_KEYS = ("description", "placement", "stage_role", "k", "head", "pool", "base", "init")
_DIST_KEYS = {
    "categorical": ("type", "choices"),
    "int": ("type", "low", "high", "step", "log"),
    "float": ("type", "low", "high", "step", "log"),
}
_K_EXTRA = ("shared", "per_stage")
_DEFAULTS: dict[str, Any] = {
    "placement": "paper",
    "head": "default",
    "pool": "meanstd",
    "base": "any",
    "init": None,  # convert()'s own default: preserve with a checkpoint, else paper
}


@dataclass(frozen=True)
class Param:
    """One searchable quantity: an Optuna distribution, or a constant when ``dist`` is None."""

    key: str
    dist: BaseDistribution | None = None
    value: Any = None

    def suggest(self, trial: Any, name: str) -> Any:
        """Return the constant, or ask ``trial`` for a value of ``name`` from the distribution."""
        d = self.dist
        if d is None:
            return self.value
        if isinstance(d, CategoricalDistribution):
            return trial.suggest_categorical(name, d.choices)
        with warnings.catch_warnings():  # (Optuna warns of an enqueued value out of range and
            # takes it: refused below, the trial's fail_reason says so)
            warnings.filterwarnings("ignore", message=r"Fixed parameter .* is out of range")
            if isinstance(d, IntDistribution):
                value = trial.suggest_int(name, d.low, d.high, step=d.step, log=d.log)
            else:
                value = trial.suggest_float(name, d.low, d.high, step=d.step, log=d.log)
        raw = getattr(trial, "params", {}).get(name, value)  # (suggest_int gives int(4.5))
        if raw != value or not d._contains(d.to_internal_repr(value)):
            step = f" in steps of {d.step}" if d.step not in (None, 1) else ""
            raise ValueError(
                f"{name}={raw!r} is outside the space: {d.low} to {d.high}{step}"
                + (", log scale" if d.log else "")
            )
        return value

    def values(self) -> tuple[Any, ...]:
        """All values this parameter can take (a float range gives its two ends)."""
        d = self.dist
        if d is None:
            return (self.value,)
        if isinstance(d, CategoricalDistribution):
            return tuple(d.choices)
        if isinstance(d, IntDistribution) and not d.log:
            return tuple(range(d.low, d.high + 1, d.step))
        return (d.low, d.high)


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space (see the module docstring for the meaning of each field)."""

    name: str
    description: str
    placement: Param
    stage_role: Param | None
    k: Param | tuple[Param, ...] | None
    k_shared: bool
    head: Param
    pool: Param
    base: Param
    init: Param
    source: str = ""
    text: str = field(default="", repr=False)


def list_spaces() -> list[str]:
    """Names of the spaces shipped in the ``search_spaces`` package."""
    root = resources.files("search_spaces")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def shipped_name(text: str) -> bool:
    """Whether :func:`load_space` reads ``text`` as a shipped space's name: one of
    :func:`list_spaces`, and no file of that name here (a folder of that name does not hide
    it)."""
    return text in list_spaces() and not Path(text).expanduser().is_file()


def load_space(name_or_path: str | Path) -> SearchSpace:
    """Load and validate a shipped space by name (``default``) or a YAML file by path.

    Raises:
        SpaceError: unknown name, unreadable file, invalid YAML or an invalid space.
    """
    text_in = str(name_or_path)
    path = Path(text_in).expanduser()
    yaml_name = path.suffix in (".yaml", ".yml")
    if text_in and not shipped_name(text_in) and (yaml_name or path.exists()):  # ("": ".")
        if not path.is_file():
            raise SpaceError(f"search space file must exist and be a file: {text_in}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SpaceError(
                f"search space file must be readable text ({exc}): {text_in}"
            ) from None
        name, source = path.stem, str(path.resolve())
    else:
        if text_in not in list_spaces():
            raise SpaceError(
                f"search space must be a shipped name ({', '.join(list_spaces())}) or a YAML "
                f"file: {text_in!r}"
            )
        file = resources.files("search_spaces") / f"{text_in}.yaml"
        text, name, source = file.read_text(encoding="utf-8"), text_in, f"search_spaces/{text_in}"
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # (safe: a SafeLoader subclass)
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f"line {line + 1}" if line is not None else "?"
        problem = getattr(exc, "problem", None) or ""
        detail = f" ({problem})" if problem.startswith(("duplicate key", "a key must")) else ""
        raise SpaceError(f"search space must be valid YAML{detail}: {source} {where}") from None
    return parse_space(data, name=name, source=source, text=text)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``, but a key given twice in one mapping is an error: YAML keeps the
    last one silently, so a space with two ``k:`` entries searched only the second."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # (``<<``: SafeLoader merges; the mapping's own keys override)
            if not isinstance(key_node, yaml.ScalarNode):  # (a list or mapping: unhashable)
                kind = "list" if isinstance(key_node, yaml.SequenceNode) else "mapping"
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a name, not a {kind}", key_node.start_mark
                )
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_space(
    data: Any, *, name: str = "custom", source: str = "", text: str = ""
) -> SearchSpace:
    """Validate a space given as Python data (what ``yaml.safe_load`` returns).

    Args:
        data: the mapping of keys to parameters.
        name: the space's name for reports.
        source: where it came from (file path or ``search_spaces/NAME``).
        text: the YAML text, kept so a study can record exactly what it searched.

    Raises:
        SpaceError: the first rule broken, then the bad value.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise SpaceError(f"a search space must be a mapping of keys: got {type(data).__name__}")
    unknown = [key for key in data if key not in _KEYS]
    if unknown:
        raise SpaceError(f"unknown key in search space (known: {', '.join(_KEYS)}): {unknown[0]!r}")
    names = known_names()
    params = {
        key: _param(key, data[key], str, names[key]) if key in data else Param(key, value=default)
        for key, default in _DEFAULTS.items()
    }
    choices = params["placement"].values()
    stage_role = None
    if "stage_role" in data:
        stage_role = _param("stage_role", data["stage_role"], str, names["stage_role"])
        if PER_STAGE not in choices:
            raise SpaceError(
                f"stage_role is used only when placement can be '{PER_STAGE}': placement {choices}"
            )
    elif PER_STAGE in choices:
        raise SpaceError(
            f"placement '{PER_STAGE}' needs a stage_role parameter: stage_role missing"
        )
    k, shared = _k_param(data.get("k"))
    converts = [p for p in choices if p not in ("none", PER_STAGE)]
    if PER_STAGE in choices and stage_role is not None:
        converts += [r for r in stage_role.values() if r != "none"]
    if not converts:
        roles = list(stage_role.values()) if stage_role else []
        raise SpaceError(
            "a search space must allow at least one configuration with AN: "
            f"placement {list(choices)}, stage_role {roles}"
        )
    return SearchSpace(
        name=name,
        description=str(data.get("description", "")),
        stage_role=stage_role,
        k=k,
        k_shared=shared,
        source=source,
        text=text,
        **params,
    )


def _k_param(raw: Any) -> tuple[Param | tuple[Param, ...] | None, bool]:
    if raw is None:
        return None, False
    if isinstance(raw, Mapping) and "per_stage" in raw:
        extra = [key for key in raw if key != "per_stage"]
        if extra:
            raise SpaceError(f"k with per_stage takes no other key: {extra[0]!r}")
        items = raw["per_stage"]
        if not isinstance(items, list) or not items:
            raise SpaceError(f"k.per_stage must be a non-empty list of parameters: {items!r}")
        return tuple(_param(f"k.per_stage[{i}]", p, int, None) for i, p in enumerate(items)), False
    shared = False
    if isinstance(raw, Mapping) and "shared" in raw:
        shared = raw["shared"]
        if not isinstance(shared, bool):
            raise SpaceError(f"k.shared must be true or false: {shared!r}")
        raw = {key: v for key, v in raw.items() if key != "shared"}
    return _param("k", raw, int, None), shared


def _param(key: str, raw: Any, kind: type, known: tuple[str, ...] | None) -> Param:
    """Parse one parameter; ``kind`` is the value type, ``known`` the allowed names (or None)."""
    if not isinstance(raw, Mapping):
        _check_value(key, raw, kind, known)
        return Param(key, value=raw)
    typ = raw.get("type")
    if typ not in _DIST_KEYS:
        raise SpaceError(f"{key}.type must be categorical, int or float: {typ!r}")
    allowed = _DIST_KEYS[typ]
    extra = [a for a in raw if a not in allowed]
    if extra:
        raise SpaceError(f"unknown attribute of {key} (known: {', '.join(allowed)}): {extra[0]!r}")
    if typ == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{key}.choices must be a non-empty list: {choices!r}")
        if len(set(map(repr, choices))) != len(choices):
            raise SpaceError(f"{key}.choices must not repeat a value: {choices!r}")
        for choice in choices:
            _check_value(key, choice, kind, known)
        return Param(key, CategoricalDistribution(choices))
    if kind is str:
        raise SpaceError(f"{key} takes names, so its type must be categorical: {typ!r}")
    if typ == "float" and kind is int:
        raise SpaceError(
            f"{key} takes whole numbers, so its type must be int or categorical: float"
        )
    return Param(key, _numeric(key, raw, typ))


def _numeric(key: str, raw: Mapping[str, Any], typ: str) -> BaseDistribution:
    number = int if typ == "int" else (int, float)
    low, high = raw.get("low"), raw.get("high")
    step = raw.get("step")
    if step is None and typ == "int":  # (left out, or null: Optuna's default)
        step = 1
    log = raw.get("log", False)
    what = "integer" if typ == "int" else "number"
    for attr, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, number):
            raise SpaceError(
                f"{key}.{attr} must be {'an' if typ == 'int' else 'a'} {what}: {value!r}"
            )
    if step is not None and (isinstance(step, bool) or not isinstance(step, number) or step <= 0):
        raise SpaceError(f"{key}.step must be a positive {what}: {step!r}")
    if not isinstance(log, bool):
        raise SpaceError(f"{key}.log must be true or false: {log!r}")
    if low > high:
        raise SpaceError(f"{key}.low must not exceed {key}.high: low={low} high={high}")
    if log and low <= 0:
        raise SpaceError(f"{key}.low must be positive when log is true: low={low}")
    if log and step != (1 if typ == "int" else None):
        raise SpaceError(f"{key}.step cannot be combined with log: step={step}")
    if typ == "int":
        if (high - low) % step:
            raise SpaceError(f"{key}: high - low must be a multiple of step: {low}..{high}/{step}")
        if key.startswith("k") and low < 1:
            raise SpaceError(f"{key}: K must be at least 1: low={low}")
        if key.startswith("k") and high > MAX_K:
            raise SpaceError(f"{key}: K must be at most {MAX_K}: high={high}")
        return IntDistribution(low, high, log=log, step=step)
    return FloatDistribution(float(low), float(high), log=log, step=step)


def _check_value(key: str, value: Any, kind: type, known: tuple[str, ...] | None) -> None:
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpaceError(f"{key} takes whole numbers: {value!r}")
        if value < 1:
            raise SpaceError(f"{key}: K must be at least 1: {value!r}")
        if value > MAX_K:
            raise SpaceError(f"{key}: K must be at most {MAX_K}: {value!r}")
        return
    if not isinstance(value, str):
        raise SpaceError(f"{key} takes names: {value!r}")
    if known is not None and value not in known:
        raise SpaceError(f"unknown {key} name (known: {', '.join(known)}): {value!r}")
