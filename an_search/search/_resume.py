"""A resumed study must be the same search on the same data: else its trials do not compare."""

from __future__ import annotations

import json
from typing import Any

import optuna

from an_search.errors import StorageError
from an_search.train import DataSpec
from an_search.train.config import MACHINE_SETTINGS

from .config import OBJECTIVES, SearchConfig, no_infinite_budget
from .space import SearchSpace

__all__ = ["check_same_data", "check_same_search", "data_summary"]


#: Settings a trial's result depends on beyond the model and objectives (``train.*``: the proxy
#: training's); a resumed study must keep them. Paths (data, checkpoint) and the device, threads
#: and loader workers may differ, e.g. on another machine. The budgets too: the stored trials
#: were judged by the study's, and another would rank (and export) trials over it.
_SAME_SETTINGS = ("cost_img_size", "latency_runs", "max_params", "max_macs", "max_latency_ms")


def check_same_search(
    study: optuna.Study, cfg: SearchConfig, objectives: tuple[str, ...], space: SearchSpace
) -> None:
    """A resumed study must be the same search (else its trials do not compare)."""
    trials = study.get_trials(deepcopy=False)  # (first: a creator writes settings, then trials)
    attrs = study.user_attrs
    expected = [OBJECTIVES[o][1] for o in objectives]
    directions = [d.name.lower() for d in study.directions]
    if "model" not in attrs or "objectives" not in attrs:  # (no settings, or half of them: an
        # empty study made elsewhere, or one whose creator was killed, is taken if it fits)
        if trials:
            raise StorageError(
                f"study {study.study_name!r} holds {len(trials)} trials but no an-search settings "
                "(another tool made it): use another study name (--study-name)"
            )
        if directions != expected:
            goals = ", ".join(f"{d}s {o}" for d, o in zip(expected, objectives, strict=True))
            raise StorageError(
                f"study {study.study_name!r} was made to {'/'.join(directions)}, this search "
                f"{goals}: use another study name (--study-name)"
            )
        return
    if attrs["model"] != cfg.model or tuple(attrs["objectives"]) != objectives:
        raise StorageError(
            f"study {study.study_name!r} searches {attrs['model']} for "
            f"{','.join(attrs['objectives'])}; resume it with the same model and objectives or "
            f"use another study name: {cfg.model} for {','.join(objectives)}"
        )
    stored, given = attrs.get("config"), json.loads(json.dumps(cfg.to_dict()))
    if not isinstance(stored, dict):
        return
    # (a setting the study's version did not store yet is not compared)
    pairs = [(k, no_infinite_budget(k, stored[k]), given[k]) for k in _SAME_SETTINGS if k in stored]
    train = stored.get("train") or {}
    pairs += [
        (f"train.{k}", train[k], v)
        for k, v in given["train"].items()
        if k in train and k not in MACHINE_SETTINGS
    ]
    old_space = attrs.get("space") or {}
    pairs.append(("space", old_space.get("name"), space.name))
    pairs.append(("the space file's text", old_space.get("text"), space.text))
    for key, old, new in pairs:
        if old != new:
            shown = (old, new) if key != "the space file's text" else ("one text", "another")
            raise StorageError(
                f"study {study.study_name!r} was run with {key} {shown[0]!r}, this call has "
                f"{shown[1]!r}: resume it with the same settings, or start another study "
                "(--study-name or --output)"
            )


def data_summary(data: DataSpec, train_images: int, val_images: int) -> dict[str, Any]:
    """What a study's trials train on, path aside (the data may move to another machine)."""
    return {
        "classes": list(data.class_names) or data.num_classes,
        "train_images": train_images,
        "validation_images": val_images,
    }


def check_same_data(study: optuna.Study, data: dict[str, Any] | None) -> None:
    """A resumed study must train on the same data: trials on other data do not compare."""
    stored = study.user_attrs.get("data")
    if data is None or not isinstance(stored, dict):
        return  # (a study from before the data was stored is not compared)
    if json.loads(json.dumps(data)) == stored:
        return
    raise StorageError(
        f"study {study.study_name!r} was run on {_describe_data(stored)}, this call's data has "
        f"{_describe_data(data, stored)}: give --data the same images (their path may differ), "
        "or run other data as another study (an-search run --study-name or --output)"
    )


def _describe_data(data: dict[str, Any], other: dict[str, Any] | None = None) -> str:
    classes, theirs = data.get("classes"), (other or {}).get("classes")
    count = len(classes) if isinstance(classes, list) else classes
    renamed = isinstance(theirs, list) and len(theirs) == count and classes != theirs
    return (
        f"{count} classes{' (other names)' if renamed else ''}, {data.get('train_images')} "
        f"training and {data.get('validation_images')} validation images"
    )
