"""Build timm models by name, optionally with weights from a local checkpoint file.

No hub downloads: ``pretrained=False`` always; weights come from a file the user names
(safetensors, or a ``.pth``/``.pt``/``.bin`` loaded with ``weights_only=True``).
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from an_search._values import is_integer

from ._compat import filter_torchscript_warning
from .errors import CheckpointError, ModelConfigError, UnknownModelError
from .input_size import check_input_fits, input_error, input_too_small, model_input_size

__all__ = [
    "check_input_fits",
    "check_model_options",
    "classifier_keys",
    "create_model",
    "describe_mismatch",
    "first_convs",
    "input_error",
    "input_too_small",
    "load_checkpoint",
    "pixel_fold",
    "read_checkpoint",
    "model_input_size",
]

filter_torchscript_warning()


def _suggest(name: str) -> str:
    import timm

    arch = name.split(".", 1)[0]
    close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
    if close:
        return f"did you mean {', '.join(close)}?"
    return "run `python -c 'import timm; print(timm.list_models(\"*res*\"))'` to list names"


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    in_chans: int | None = None,
    img_size: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Create a timm model (random init) and load a local checkpoint if one is named.

    Args:
        name: timm model name, with or without a pretrained tag (``resnet50.a1_in1k``).
        num_classes: classifier size; a checkpoint with another classifier keeps its other weights.
        in_chans: input channels.
        img_size: input size for models that take one at construction (ViT-like); ignored by
            models that do not accept it.
        checkpoint: local weights file, safetensors or a torch pickle read with weights_only.
        **kwargs: passed to ``timm.create_model``.

    Raises:
        UnknownModelError: ``name`` is not a timm model.
        CheckpointError: the file is missing, unreadable, or does not match the model.
    """
    import timm

    if not timm.is_model(name):
        raise UnknownModelError(f"unknown timm model {name!r}: {_suggest(name)}")
    _check_tag(name)
    check_model_options(num_classes=num_classes, in_chans=in_chans, img_size=img_size)
    opts = {"num_classes": num_classes, "in_chans": in_chans, **kwargs}
    opts = {k: v for k, v in opts.items() if v is not None}
    try:
        if img_size is not None:
            try:
                model = timm.create_model(name, pretrained=False, img_size=img_size, **opts)
            except TypeError:  # a model built at any size: no img_size argument
                model = timm.create_model(name, pretrained=False, **opts)
        else:
            model = timm.create_model(name, pretrained=False, **opts)
    except (TypeError, ValueError, AssertionError, IndexError) as exc:  # options the model's
        # constructor does not take, or a size its grids cannot have (Twins, NesT: asserts)
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160] or type(exc).__name__
        given = kwargs or opts
        if img_size is not None:
            given = {**given, "img_size": img_size}
        raise ModelConfigError(
            f"timm cannot build {name!r} with {given} ({reason}): drop or fix these options"
        ) from None
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, new_classifier=num_classes is not None)
    return model


def check_model_options(
    *, num_classes: int | None = None, in_chans: int | None = None, img_size: int | None = None
) -> None:
    """Raise ModelConfigError for a size no model can take (None: not given)."""
    for what, value, low in (
        ("num_classes", num_classes, 0),
        ("in_chans", in_chans, 1),
        ("img_size", img_size, 1),
    ):
        if value is not None and (not is_integer(value) or value < low):
            raise ModelConfigError(f"{what} is {value!r}: give an integer >= {low}")


def _check_tag(name: str) -> None:
    """A pretrained tag timm does not list for the architecture (``resnet18.bogus``) fails."""
    import timm

    arch, _, tag = name.partition(".")
    if tag and name not in timm.list_pretrained(name):
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        known = ", ".join(tags[:6]) + (", ..." if len(tags) > 6 else "") if tags else "none"
        raise UnknownModelError(
            f"{arch!r} has no pretrained tag {tag!r} (its tags: {known}): drop the tag or use "
            "one of these (weights still come from --checkpoint)"
        )


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a weights file: a safetensors file or a torch state_dict (``weights_only=True``).

    timm's reader unwraps a training checkpoint (``state_dict``, ``model``) and strips a DDP
    ``module.`` prefix.

    Raises:
        CheckpointError: missing, unreadable, no state_dict of tensors, or non-finite values
            (message names the fix).
    """
    from timm.models import load_state_dict

    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a directory: pass the weights file in it")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist: pass an existing weights file")
    named = path.endswith(".safetensors")
    if named != _is_safetensors(path) and (named is False or _is_torch_file(path)):
        kind, fix = (
            ("a safetensors", "to end in .safetensors") if not named else ("a torch", ".pth")
        )
        raise CheckpointError(
            f"checkpoint {path!r} is {kind} file, and files are read by their name: rename it {fix}"
        )
    with warnings.catch_warnings(record=True) as caught:  # (torch's, about a file it can't read)
        warnings.simplefilter("always")
        try:
            state = load_state_dict(path, weights_only=True)
        except (AttributeError, TypeError):  # (timm's unwrapping of what is no dict)
            state = None
        except Exception as e:  # noqa: BLE001 - any reader failure means an unreadable file
            if not (_is_torch_file(path) or _is_safetensors(path)):  # (else torch's reason)
                raise CheckpointError(
                    f"checkpoint {path!r} is no weights file: it starts as neither torch.save's "
                    "files (a zip archive or a pickle) nor a safetensors file; pass a "
                    "safetensors file or a torch state_dict saved with torch.save"
                ) from None
            reason, fix = _reason(e)
            raise CheckpointError(f"checkpoint {path!r} cannot be read ({reason}): {fix}") from None
    for w in caught:  # (a file that was read: its warnings are the user's)
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    state = _nested_state(path, state)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"checkpoint {path!r} holds no state_dict of tensors: save model.state_dict() with "
            "torch.save or safetensors"
        )
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:  # (trained from, every trial was pruned on a NaN loss blamed on the lr)
        raise CheckpointError(
            f"checkpoint {path!r} holds non-finite values (NaN or inf) in {len(bad)} tensor(s), "
            f"{bad[0]!r} first: give weights saved before training diverged"
        )
    return state


def _tensors(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(v, torch.Tensor) for v in value.values())
    )


def _nested_state(path: str, state: Any) -> Any:
    """A training checkpoint's one state_dict under a key timm does not unwrap (PyTorch's
    tutorial saves ``{"model_state_dict": ..., "optimizer_state_dict": ..., "epoch": ...}``)."""
    if not isinstance(state, dict) or _tensors(state):
        return state
    from timm.models import clean_state_dict

    nested = [k for k, v in state.items() if _tensors(v)]
    if len(nested) > 1:
        raise CheckpointError(
            f"checkpoint {path!r} holds {len(nested)} state_dicts ({', '.join(map(repr, nested))})"
            ": save the one to load alone, with torch.save or safetensors"
        )
    return clean_state_dict(state[nested[0]]) if nested else state


def _is_safetensors(path: str) -> bool:
    """Whether the file starts as a safetensors file does: a header length, then ``{"``."""
    with open(path, "rb") as f:
        head = f.read(10)
    return len(head) == 10 and int.from_bytes(head[:8], "little") > 0 and head[8:] in (b'{"', b"{}")


def _is_torch_file(path: str) -> bool:
    """Whether the file starts as ``torch.save``'s do: a zip archive, or a pickle."""
    with open(path, "rb") as f:
        head = f.read(2)
    return head == b"PK" or head[:1] == b"\x80"


def _reason(e: Exception) -> tuple[str, str]:
    """Why a weights file could not be read, and the fix."""
    text = str(e)
    if "weights_only" in text or "Weights only" in text:  # (a whole model, other objects)
        return (
            "it holds Python objects besides tensors, which weights_only loading refuses, e.g. "
            "a whole pickled model",
            "save model.state_dict() with torch.save or safetensors",
        )
    reason = _clip(text.splitlines()[0]) if text else type(e).__name__
    return reason, "pass a safetensors file or a torch state_dict saved with torch.save"


def _clip(text: str, limit: int = 120) -> str:
    """``text`` cut at the last word that fits in ``limit`` characters (``...`` when cut)."""
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + "..."


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    new_classifier: bool = False,
    state: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Load weights into ``model`` strictly.

    Args:
        model: the model to load into.
        path: a safetensors file or a torch state_dict (``weights_only=True``).
        new_classifier: the caller chose the model's classes (``num_classes``): a checkpoint
            classifier of another shape is dropped, the model keeps its new one. Otherwise such a
            classifier is an error, as in ``timm.models.load_checkpoint``.
        state: the file's weights when :func:`read_checkpoint` has already read them (``path``
            then only names the file in errors).

    Raises:
        CheckpointError: missing, corrupt or mismatched file (message names the fix).
    """
    path = os.fspath(path)
    state = dict(read_checkpoint(path) if state is None else state)
    own = model.state_dict()
    state = _as_timm_loads(model, own, state)
    head = classifier_keys(model, state)
    other = sorted(
        k for k in head if k in state and (k not in own or state[k].shape != own[k].shape)
    )
    # (BatchNorm keeps its own counter when a file has none, as torchvision's weights)
    skip = head | {k for k in own if k.endswith(".num_batches_tracked")}
    shapes = {k: v.shape for k, v in state.items()}
    problems = describe_mismatch({k: shapes[k] for k in shapes if k not in other}, own, skip=skip)
    headless = sorted(k for k in head if k in own and k not in state)
    if headless and not new_classifier and not problems:  # (a random classifier, silently)
        raise CheckpointError(
            f"checkpoint {path!r} has no classifier ({headless[0]} missing: a headless "
            f"model's weights), the model a {getattr(model, 'num_classes', '?')}-class one: "
            "pass num_classes=0 for none, or num_classes=N for a new classifier"
        )
    if other and not new_classifier and not problems:  # (the body fits: only the classifier)
        key = min(other, key=lambda k: (not k.endswith(".weight"), k))
        classes = state[key].shape[0] if state[key].dim() else "?"
        mine = own[key].shape[0] if key in own and own[key].dim() else None
        if classes != mine:
            raise CheckpointError(
                f"checkpoint {path!r} has a {classes}-class classifier ({key} "
                f"{tuple(state[key].shape)}), the model {getattr(model, 'num_classes', '?')}: "
                f"pass num_classes={classes} to keep it, or another num_classes for a new "
                "classifier"
            )
        problems = describe_mismatch(shapes, own, skip=skip)  # (as many classes, other inputs)
    if problems:
        body = {k: v for k, v in state.items() if k not in other}
        chans = _input_channels(model, own, body, skip)
        if chans is not None:
            fix = f"pass in_chans={chans} (the checkpoint's input channels)"
        elif any(".attn.head." in k and k not in own for k in state):
            fix = (
                "it holds AttentiveNorm sites, a saved AN model's weights: give its recipe too "
                "(an-convert --recipe FOLDER --checkpoint FILE, or an_search.load(FOLDER))"
            )
        else:
            fix = "check that it is this model's (name, classes, input channels, image size)"
        raise CheckpointError(
            f"checkpoint {path!r} does not match {type(model).__name__}: {problems}; {fix}"
        )
    for key in other:
        del state[key]
    model.load_state_dict(state, strict=False)


def _input_channels(
    model: nn.Module,
    own: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    skip: Collection[str],
) -> int | None:
    """The checkpoint's input channels (the image's), when they are all it differs in (its
    first convs; ``skip``: keys the model may have that ``state`` need not)."""
    shapes = {k: v.shape for k, v in state.items()}
    keys = _channel_mismatches(model, own, state)
    chans = {int(shapes[k][1]) for k in keys}
    shapes.update({k: own[k].shape for k in keys})
    fits = not describe_mismatch(shapes, own, skip=skip)
    return chans.pop() // pixel_fold(model) if len(chans) == 1 and fits else None


def pixel_fold(model: nn.Module) -> int:
    """How many pixels a ``SpaceToDepth`` stem (TResNet) folds into each image channel: its
    first conv takes this many times the image's channels (1: no such stem)."""
    from timm.layers import SpaceToDepth

    folds = [m.bs**2 for m in model.modules() if isinstance(m, SpaceToDepth)]
    return folds[0] if folds else 1


def _as_timm_loads(
    model: nn.Module, own: Mapping[str, torch.Tensor], state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """What timm's pretrained loading does to a state dict before loading it: the model module's
    ``checkpoint_filter_fn`` (position embeddings resampled to the model's image size,
    original-repository key layouts), then the input conv adapted to the model's channels
    (``adapt_input_conv``: RGB weights for a 1-channel model)."""
    import sys

    from timm.models import adapt_input_conv

    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if callable(filter_fn):
        try:
            state = dict(filter_fn(state, model))
        except Exception:  # noqa: BLE001 - unfiltered: a mismatch is then reported as such
            pass
    for key in _channel_mismatches(model, own, state):
        if state[key].dim() == 4:
            try:
                state[key] = adapt_input_conv(own[key].shape[1], state[key])
            except (AssertionError, NotImplementedError):  # (e.g. 1 -> 2 or 4 -> 1)
                pass  # reported as a mismatch, with the channels to pass
    return state


def first_convs(model: nn.Module) -> list[str]:
    """The names of a timm model's input convs (``pretrained_cfg["first_conv"]``: one name or
    several); none for a model without a ``pretrained_cfg``."""
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    return [first] if isinstance(first, str) else list(first or ())


def _channel_mismatches(
    model: nn.Module, own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
) -> list[str]:
    """The model's first convs (:func:`first_convs`) whose weights in ``state`` differ from
    the model's in their input channels alone."""
    keys = []
    for name in first_convs(model):
        key = f"{name}.weight"
        if key in state and key in own and state[key].dim() == own[key].dim() >= 2:
            theirs, ours = state[key].shape, own[key].shape
            if theirs[1] != ours[1] and (theirs[0], *theirs[2:]) == (ours[0], *ours[2:]):
                keys.append(key)
    return keys


def describe_mismatch(
    shapes: Mapping[str, Sequence[int]],
    own: Mapping[str, torch.Tensor],
    skip: Collection[str] = (),
    sides: tuple[str, str] = ("stored", "in the model"),
) -> str:
    """What differs between stored ``shapes`` (key -> shape) and a model's state dict, in one
    line (the count and first key of each kind, both shapes named by ``sides``); ``""`` when
    nothing does."""
    mismatched = [k for k in shapes if k in own and tuple(shapes[k]) != tuple(own[k].shape)]
    missing = [k for k in own if k not in shapes and k not in skip]
    unexpected = [k for k in shapes if k not in own]
    parts = []
    if mismatched:
        k = mismatched[0]
        parts.append(
            f"{len(mismatched)} shape mismatches (first: {k} {tuple(shapes[k])} {sides[0]}, "
            f"{tuple(own[k].shape)} {sides[1]})"
        )
    if missing:
        parts.append(f"{len(missing)} missing keys (first: {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
    return "; ".join(parts)


def classifier_keys(model: nn.Module, state: Mapping[str, object] | None = None) -> set[str]:
    """The classifier's keys in the model's state dict and in ``state`` (a checkpoint's: a
    headless model, ``num_classes=0``, has none of its own)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    if isinstance(names, str):
        names = (names,)
    keys = [*model.state_dict(), *(state or ())]
    return {k for k in keys for n in names if k.startswith(n + ".")}
