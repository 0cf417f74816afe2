"""Train and validation loaders for a `DataSpec`, built from timm's datasets and transforms.

Light augmentation only: the proxy images are tiny (Animal-MNIST is 28x28), so a mild
random-resized crop (area 0.7-1) and a horizontal flip, no colour jitter, no RandAugment.
Transforms stop at uint8 tensors; timm's `PrefetchLoader` moves each batch to the device and
normalises it there (on CPU too: per-image ToTensor + Normalize cost more than the crop itself).
Randomness is keyed to (seed, epoch) through `Loaders.set_epoch`, so an epoch's batches do not
depend on what ran before it: two runs with one seed, or a run and its resumed copy, see the same
images in the same order. Under torch.distributed the samplers shard the data per rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from timm.data import create_transform
from timm.data.loader import PrefetchLoader
from torch.utils.data import DataLoader, DistributedSampler, Sampler, Subset

from an_search.errors import DataError
from an_search.train.data import DataSpec, dataset_targets, open_dataset

__all__ = ["Loaders", "check_batches", "create_loaders", "stratified_indices"]


@dataclass
class Loaders:
    """The two loaders plus what the training loop needs to drive them.

    Attributes:
        train: shuffling loader, full batches only (BatchNorm cannot train on a batch of 1),
            yielding normalised float batches on the device.
        val: ordered loader over the whole validation set, the same way.
        num_train: training samples after `train_fraction` (this rank's share under DDP).
        num_val: validation samples.
    """

    train: PrefetchLoader
    val: PrefetchLoader
    num_train: int
    num_val: int
    _seed: int = 0
    _generator: torch.Generator | None = None

    def set_epoch(self, epoch: int) -> None:
        """Key the training shuffle (and worker seeds) to (seed, epoch)."""
        sampler = self.train.sampler
        key = self._seed * 100_003 + epoch  # (not seed + epoch: seed 1's epoch 1 is 0's epoch 2)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(key)  # (its seed is 0: its permutation is seeded with the epoch)
        elif self._generator is not None:
            self._generator.manual_seed(key)


class _Shard(Sampler[int]):
    """Rank ``rank``'s share of ``n`` validation images: ``rank``, ``rank + world``, ... Unlike
    timm's ``OrderedDistributedSampler`` it does not pad the shards to equal lengths with
    repeated images, which the summed counts would count twice. (Evaluation runs the
    unwrapped model: no collective per batch, so shards may differ by one batch.)"""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = range(rank, n, world)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class _ToMode:
    """Convert a PIL image to one mode (torchvision datasets skip timm's conversion)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)


def stratified_indices(
    targets: np.ndarray | None, n: int, fraction: float, seed: int, *, keep_rest: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of range(n): about `fraction` of each class chosen, the rest returned second.

    Every class keeps at least one chosen sample; with `keep_rest` (a holdout: the rest is what
    trains), at least one in the rest first, so a one-image class is trained on, not only
    validated. Without targets the split is uniform random.
    """
    rng = np.random.default_rng(seed)
    if targets is None:
        perm = rng.permutation(n)
        k = max(1, round(n * fraction))
        return np.sort(perm[:k]), np.sort(perm[k:])
    chosen, rest = [], []
    for c in np.unique(targets):  # sorted classes: the generator's draws are reproducible
        idx = rng.permutation(np.flatnonzero(targets == c))
        k = max(1, round(len(idx) * fraction))
        if keep_rest:
            k = min(k, len(idx) - 1)
        chosen.append(idx[:k])
        rest.append(idx[k:])
    return np.sort(np.concatenate(chosen)), np.sort(np.concatenate(rest))


def _splits(
    spec: DataSpec, train_fraction: float, val_fraction: float, seed: int
) -> tuple[Any, Any]:
    """Open both splits (val with the training class map), apply holdout and the fractions."""
    train_ds = open_dataset(spec, "train")
    targets = dataset_targets(train_ds)
    train_idx = np.arange(len(train_ds))
    if spec.holdout > 0:  # one pool: the same seeded stratified split every time
        val_idx, train_idx = stratified_indices(
            targets, len(train_ds), spec.holdout, spec.split_seed, keep_rest=True
        )
        val_ds = Subset(open_dataset(spec, "train"), val_idx.tolist())  # own copy: own transform
    else:  # the training class map: a val folder missing a class must not shift the labels
        class_map = {c: i for i, c in enumerate(spec.class_names)} if not spec.name else None
        val_ds = open_dataset(spec, "validation", class_map=class_map or None)
    if train_fraction < 1.0:
        sub_targets = None if targets is None else targets[train_idx]
        keep, _ = stratified_indices(sub_targets, len(train_idx), train_fraction, seed)
        train_idx = train_idx[keep]
    if len(train_idx) < len(train_ds):
        train_ds = Subset(train_ds, train_idx.tolist())
    if val_fraction < 1.0:  # a stratified share keeps every class in the estimate
        base = val_ds.dataset if isinstance(val_ds, Subset) else val_ds
        idx = np.asarray(val_ds.indices) if isinstance(val_ds, Subset) else np.arange(len(base))
        val_targets = dataset_targets(base)
        sub_targets = None if val_targets is None else val_targets[idx]
        keep, _ = stratified_indices(sub_targets, len(idx), val_fraction, seed)
        val_ds = Subset(base, idx[keep].tolist())
    return train_ds, val_ds


def check_batches(
    spec: DataSpec,
    batch_size: int,
    *,
    train_fraction: float = 1.0,
    seed: int = 0,
    processes: int = 1,
) -> tuple[int, int]:
    """Raise DataError unless every process gets at least one full training batch.

    ``create_loaders`` drops the last partial batch, and under torch.distributed each of the
    ``processes`` ranks gets ``1 / processes`` of the images; a search calls this before it
    creates a study, so that a bad ``--batch-size`` leaves no study behind.

    Returns:
        The training images (``train_fraction`` taken) and the validation images (all).
    """
    train_ds, val_ds = _splits(spec, train_fraction, 1.0, seed)
    _check_shard(len(train_ds), batch_size, processes)
    return len(train_ds), len(val_ds)


def _check_shard(images: int, batch_size: int, processes: int) -> None:
    if images // processes >= batch_size:
        return
    where = f" on each of {processes} processes" if processes > 1 else ""
    raise DataError(
        f"{images} training images is less than one batch of {batch_size}{where}; "
        "lower batch_size or raise train_fraction"
    )


def _set_transform(ds: Any, transform: Any) -> None:
    base = ds.dataset if isinstance(ds, Subset) else ds
    base.transform = transform


def create_loaders(
    spec: DataSpec,
    *,
    img_size: int,
    batch_size: int,
    train_fraction: float = 1.0,
    val_fraction: float = 1.0,
    seed: int = 0,
    workers: int = 0,
    scale: tuple[float, float] = (0.7, 1.0),
    hflip: float = 0.5,
    interpolation: str = "bilinear",
    device: torch.device | str = "cpu",
) -> Loaders:
    """Build the training and validation loaders of `spec` with timm transforms.

    Args:
        spec: the dataset (see `resolve_data`).
        img_size: square input side in pixels (images are resized to it).
        batch_size: per-process batch size; validation uses twice that.
        train_fraction: stratified, seeded share of the training split to use, in (0, 1].
        val_fraction: stratified, seeded share of the validation split, in (0, 1]; a
            cheaper, noisier estimate for proxies on large validation sets.
        seed: seed of the subsets and of the shuffles.
        workers: DataLoader worker processes (0 = load in the training process).
        scale: area range of the random-resized crop; (1, 1) turns cropping off.
        hflip: horizontal flip probability.
        interpolation: resize interpolation.
        device: where batches are normalised and handed over (CUDA: pinned memory).

    Raises:
        DataError: fewer training images than one batch (on each rank, under torch.distributed).
    """
    train_ds, val_ds = _splits(spec, train_fraction, val_fraction, seed)
    size = (spec.in_chans, img_size, img_size)
    common = {"input_size": size, "interpolation": interpolation, "use_prefetcher": True}
    train_tf = create_transform(
        is_training=True, scale=scale, hflip=hflip, color_jitter=None, **common
    )
    val_tf = create_transform(is_training=False, crop_pct=1.0, **common)  # whole image, no crop
    if spec.name.lower().startswith("torch/"):  # torchvision datasets hand over raw PIL modes
        train_tf, val_tf = (
            type(train_tf)([_ToMode(spec.img_mode), *train_tf.transforms]),
            type(val_tf)([_ToMode(spec.img_mode), *val_tf.transforms]),
        )
    _set_transform(train_ds, train_tf)
    _set_transform(val_ds, val_tf)
    distributed = dist.is_available() and dist.is_initialized()
    _check_shard(len(train_ds), batch_size, dist.get_world_size() if distributed else 1)

    # Shuffling: DistributedSampler under torch.distributed (shards per rank), else a generator;
    # set_epoch keys either to (seed, epoch). The DataLoader also draws worker seeds from it.
    generator, train_sampler, val_sampler = None, None, None
    if distributed:
        train_sampler = DistributedSampler(train_ds, shuffle=True, seed=0, drop_last=True)
        val_sampler = _Shard(len(val_ds), dist.get_rank(), dist.get_world_size())
    else:
        generator = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    loader_kw = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    train = DataLoader(
        train_ds,
        batch_size=batch_size,
        shuffle=train_sampler is None,
        sampler=train_sampler,
        generator=generator,
        drop_last=True,
        **loader_kw,
    )
    val = DataLoader(val_ds, batch_size=2 * batch_size, sampler=val_sampler, **loader_kw)
    num_train = len(train_sampler) if train_sampler is not None else len(train_ds)
    prefetch = {"mean": spec.mean, "std": spec.std, "channels": spec.in_chans, "device": device}
    return Loaders(
        PrefetchLoader(train, **prefetch),
        PrefetchLoader(val, **prefetch),
        num_train,
        len(val_ds),
        seed,
        generator,
    )
