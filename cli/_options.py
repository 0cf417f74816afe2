"""The options ``an-search``'s commands share (typer ``Annotated`` aliases)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Storage = Annotated[
    str | None,
    typer.Option(help="Optuna storage URL, journal file (.log) or SQLite file; $OPTUNA_STORAGE"),
]
NewStudyName = Annotated[
    str | None,
    typer.Option(help="study name (default: MODEL-SPACE, and -OBJECTIVES unless top1 alone)"),
]
StudyName = Annotated[
    str | None, typer.Option(help="study name (needed when the storage holds several)")
]
Data = Annotated[
    str | None,
    typer.Option(
        help="image folder (train/ and val/, or class folders) or .tar of class folders "
        "(default: the embedded Animal-MNIST)"
    ),
]
BatchesPerEpoch = Annotated[int | None, typer.Option(help="cap updates/epoch")]
ImgSize = Annotated[int, typer.Option(help="training image size")]
BatchSize = Annotated[int, typer.Option(help="images per update (per process)")]
Checkpoint = Annotated[Path | None, typer.Option(help="local weights to start from")]
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:N")]
Seed = Annotated[int, typer.Option(help="sampler and training seed")]
RunDir = Annotated[Path | None, typer.Argument(help="run directory of an earlier `an-search run`")]
Workers = Annotated[
    int | None, typer.Option(help="worker processes sharing the study (default: 1 per GPU group)")
]
Gpus = Annotated[str | None, typer.Option(help="GPU ids, e.g. 0,1,2,3 (one worker per group)")]
GpusPerTrial = Annotated[
    int, typer.Option(help="GPUs per trial: above 1, DDP under torchrun (CPU: gloo processes)")
]
SyncBN = Annotated[bool, typer.Option("--sync-bn", help="SyncBatchNorm in DDP trials (CUDA)")]
Dataset = Annotated[
    str,
    typer.Option(
        help="a timm dataset name, e.g. torch/cifar10, read from --data (its root; no download)"
    ),
]
