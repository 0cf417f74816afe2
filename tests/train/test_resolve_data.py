"""resolve_data layouts and errors; create_loaders splits, subsets and batches."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from an_search.errors import DataError
from an_search.train import create_loaders, resolve_data
from an_search.train.loaders import stratified_indices


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), color=128).save(path)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as err:
        resolve_data(tmp_path / "nope")
    assert "\n" not in str(err.value)


def test_one_class_folder(tmp_path: Path) -> None:
    for i in range(3):
        _image(tmp_path / "cats" / f"{i}.png")
    with pytest.raises(DataError, match=r"only one class \('cats'\)"):
        resolve_data(tmp_path)


def test_no_images(tmp_path: Path) -> None:
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="no images"):
        resolve_data(tmp_path)


def test_images_outside_class_folders(tmp_path: Path) -> None:
    for i in range(3):
        _image(tmp_path / f"{i}.png")
    with pytest.raises(DataError, match="not in class folders"):
        resolve_data(tmp_path)


def test_val_class_unknown_to_train(tiny_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    _image(root / "val" / "unicorn" / "0.png")
    with pytest.raises(DataError, match="unicorn"):
        resolve_data(root)


def test_imagenet_layout(tiny_root: Path) -> None:
    spec = resolve_data(tiny_root)
    assert spec.num_classes == 10 and spec.holdout == 0
    assert spec.train_root.endswith("train") and spec.val_root.endswith("val")
    loaders = create_loaders(spec, img_size=32, batch_size=16)
    assert (loaders.num_train, loaders.num_val) == (120, 60)
    x, y = next(iter(loaders.train))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(loaders.train) == 120 // 16  # full batches only


def test_class_folders_split_stratified_and_seeded(tiny_root: Path) -> None:
    spec = resolve_data(tiny_root / "train", holdout=0.25, seed=3)
    assert spec.holdout == 0.25 and spec.train_root == spec.val_root
    a = create_loaders(spec, img_size=32, batch_size=8)
    b = create_loaders(spec, img_size=32, batch_size=8)
    assert (a.num_train, a.num_val) == (90, 30)
    val_targets = [t for _, t in a.val.dataset.dataset.reader.samples]
    val_idx = a.val.dataset.indices
    assert val_idx == b.val.dataset.indices
    assert set(Counter(val_targets[i] for i in val_idx).values()) == {3}  # 25% of 12 per class
    assert not set(val_idx) & set(a.train.dataset.indices)


def test_train_fraction_is_stratified(tiny_root: Path) -> None:
    spec = resolve_data(tiny_root)
    loaders = create_loaders(spec, img_size=32, batch_size=4, train_fraction=0.5, seed=1)
    subset = loaders.train.dataset
    targets = [subset.dataset.reader.samples[i][1] for i in subset.indices]
    assert Counter(targets) == {c: 6 for c in range(10)}


def test_stratified_indices_keep_every_class() -> None:
    targets = np.array([0] * 50 + [1] * 3)
    chosen, rest = stratified_indices(targets, len(targets), 0.1, seed=0)
    assert Counter(targets[chosen]) == {0: 5, 1: 1}
    assert sorted([*chosen, *rest]) == list(range(53))


def test_a_holdout_trains_on_every_class() -> None:
    """A one-image class stays in training (it went wholly to validation, never trained on);
    a two-image class gives one to each side."""
    targets = np.array([0] * 50 + [1] + [2] * 2)
    val, train = stratified_indices(targets, len(targets), 0.2, seed=0, keep_rest=True)
    assert Counter(targets[val]) == {0: 10, 2: 1}
    assert Counter(targets[train]) == {0: 40, 1: 1, 2: 1}
    assert sorted([*val, *train]) == list(range(53))


def test_tar_file_as_data(tiny_root: Path, tmp_path: Path) -> None:
    tar = shutil.make_archive(str(tmp_path / "pool"), "tar", tiny_root / "train")
    spec = resolve_data(tar)
    assert spec.num_classes == 10 and spec.holdout == 0.2
    assert create_loaders(spec, img_size=32, batch_size=8).num_val == 20  # round(12 * 0.2) x 10


def test_batch_larger_than_data(tiny_root: Path) -> None:
    with pytest.raises(DataError, match="less than one batch"):
        create_loaders(resolve_data(tiny_root), img_size=32, batch_size=512)


def test_val_fraction_is_stratified() -> None:
    loaders = create_loaders(resolve_data(None), img_size=32, batch_size=8, val_fraction=0.05)
    subset = loaders.val.dataset
    targets = subset.dataset.reader.targets[subset.indices]
    assert np.bincount(targets).tolist() == [10] * 10


def test_named_dataset_not_downloaded(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        resolve_data(tmp_path, name="torch/mnist")
    message = str(info.value)
    assert "cannot open torch/mnist's train split" in message and "ROOT/MNIST/raw/" in message
    assert "download=True" not in message and "root/<class>" not in message


@pytest.mark.parametrize(
    ("path", "name", "needle"),
    [
        (None, "torch/mnist", "dataset 'torch/mnist' needs its root folder"),
        (".", "bogus/name", "unknown dataset 'bogus/name': give torch/NAME"),
        (".", "torch/nosuch", "unknown dataset 'torch/nosuch'"),
        (".", "mnist", "unknown dataset 'mnist'"),
    ],
)
def test_a_dataset_name_is_checked_before_any_folder_is_read(
    path: str | None, name: str, needle: str
) -> None:
    """timm reads an unknown name as a plain folder; here it is an error that says so."""
    with pytest.raises(DataError, match=re.escape(needle)):
        resolve_data(path, name=name)


@pytest.mark.parametrize("path", ["", "  "])
def test_an_empty_path_is_refused_not_read_as_the_current_folder(
    path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(2):  # a current folder that would pass as data
        _image(tmp_path / "a" / f"{i}.png")
        _image(tmp_path / "b" / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="empty data path.*leave --data out"):
        resolve_data(path)


@pytest.mark.parametrize("name", ["pool.tar.gz", "pool.zip"])
def test_a_compressed_archive_is_refused_by_name(name: str, tmp_path: Path) -> None:
    (tmp_path / name).write_bytes(b"\x1f\x8b\x08\x00")
    with pytest.raises(DataError, match=f"{name}: a compressed archive is not read.*tar -cf"):
        resolve_data(tmp_path / name)


@pytest.mark.parametrize("content", [b"", b"hello, not a tar\n"])
def test_an_unreadable_tar_is_a_data_error(content: bytes, tmp_path: Path) -> None:
    tar = tmp_path / "pool.tar"
    tar.write_bytes(content)
    with pytest.raises(DataError, match="not a readable tar") as err:
        resolve_data(tar)
    assert "\n" not in str(err.value)


def _tree_with_hidden_entries(root: Path) -> None:
    for c in ("a", "b"):
        for i in range(4):
            _image(root / c / f"{i}.png")
        _image(root / c / ".ipynb_checkpoints" / "0-checkpoint.png")  # Jupyter's copies
        (root / c / "._0.png").write_bytes(b"\0\5\0\7")  # macOS AppleDouble: not an image
        _image(root / "__MACOSX" / c / "9.png")


@pytest.mark.parametrize("as_tar", [False, True])
def test_hidden_files_and_folders_are_skipped(as_tar: bool, tmp_path: Path) -> None:
    root = tmp_path / "pool"
    _tree_with_hidden_entries(root)
    data = shutil.make_archive(str(tmp_path / "pool"), "tar", tmp_path, "pool") if as_tar else root
    spec = resolve_data(data)
    assert spec.class_names == ("a", "b")  # not '.ipynb_checkpoints', nor '__MACOSX' classes
    loaders = create_loaders(spec, img_size=8, batch_size=2)
    assert loaders.num_train + loaders.num_val == 8  # 4 images a class, nothing hidden
    for ds in (loaders.train.loader.dataset, loaders.val.dataset):
        base = ds.dataset if hasattr(ds, "dataset") else ds
        labels = (
            [spec.class_names[int(t)] for t in np.asarray(base.reader.targets)]
            if as_tar
            else [spec.class_names[t] for _, t in base.reader.samples]
        )
        assert Counter(labels) == {"a": 4, "b": 4}


def test_class_folders_that_would_merge_are_refused(tmp_path: Path) -> None:
    for animal in ("cat", "dog"):  # timm labels by leaf folder: both would be class '2019'
        for i in range(2):
            _image(tmp_path / "nested" / animal / "2019" / f"{i}.png")
    with pytest.raises(DataError, match="'cat/2019' and 'dog/2019' .* both give class '2019'"):
        resolve_data(tmp_path / "nested")
    for folder in ("a", "a/sub", "b"):
        for i in range(2):
            _image(tmp_path / "depth" / folder / f"{i}.png")
    with pytest.raises(DataError, match="two depths .*'a' and 'a/sub'"):
        resolve_data(tmp_path / "depth")


def test_a_hidden_file_in_a_validation_class_keeps_the_labels(
    tiny_root: Path, tmp_path: Path
) -> None:
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    first = sorted((root / "val").iterdir())[0]
    (first / "._0.png").write_bytes(b"\0\5")
    spec = resolve_data(root)
    val = create_loaders(spec, img_size=8, batch_size=4).val.dataset
    samples = val.reader.samples
    assert len(samples) == 60 and all("/._" not in path for path, _ in samples)
    assert {spec.class_names[t] for path, t in samples if Path(path).parent == first} == {
        first.name
    }


def test_a_validation_split_missing_classes_is_noted(tiny_root: Path, tmp_path: Path) -> None:
    """Labels stay right (the training class map), but top-1 never tests the missing classes:
    the spec names them, and run and retrain print its note."""
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    gone = sorted(p.name for p in (root / "val").iterdir())[-2:]
    for name in gone:
        shutil.rmtree(root / "val" / name)
    spec = resolve_data(root)
    assert spec.num_classes == 10 and spec.unseen_classes == tuple(gone)
    assert spec.unseen_note() == (
        f"note: the validation split has no images of 2 of the 10 classes ({', '.join(gone)}): "
        "top-1 never tests them"
    )
    assert resolve_data(tiny_root).unseen_note() is None
    assert resolve_data(root / "train").unseen_note() is None  # a holdout has every class


def test_a_search_on_it_says_so(tiny_root: Path, tmp_path: Path) -> None:
    from an_search.search import SearchConfig, prepare_search

    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    shutil.rmtree(sorted((root / "val").iterdir())[0])
    messages: list[str] = []
    cfg = SearchConfig("resnet10t", data=root, output_dir=tmp_path / "run", n_trials=1)
    prepare_search(cfg, on_message=messages.append)
    assert messages == [resolve_data(root).unseen_note()] and messages[0] is not None


@pytest.mark.parametrize("as_tar", [False, True], ids=["folder", "tar"])
def test_images_in_other_formats_pil_reads_are_read(as_tar: bool, tmp_path: Path) -> None:
    """timm's readers keep .png/.jpg/.jpeg only: a class of .webp images was dropped without a
    word. Each format's images are read, with their pixels; timm's own setting is kept."""
    import tarfile

    from timm.data.readers.img_extensions import get_img_extensions

    before = get_img_extensions()
    formats = {"cat": [".webp", ".bmp"], "dog": [".tiff", ".gif"], "owl": [".png", ".jpg"]}
    root = tmp_path / "pool"
    for i, (name, exts) in enumerate(formats.items()):
        for j, ext in enumerate(exts * 2):
            path = root / name / f"{j}{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("L", (8, 8), color=40 * (i + 1)).save(path)
    (root / "owl" / "notes.txt").write_text("not an image")
    if as_tar:
        with tarfile.open(tmp_path / "pool.tar", "w") as tf:
            for path in sorted(root.rglob("*")):
                tf.add(path, arcname=str(path.relative_to(root)), recursive=False)
        root = tmp_path / "pool.tar"
    spec = resolve_data(root, holdout=0.25)
    assert spec.class_names == ("cat", "dog", "owl")
    loaders = create_loaders(spec, img_size=8, batch_size=1, hflip=0.0, scale=(1.0, 1.0))
    seen = Counter()  # (batches of 1: none dropped)
    for loader in (loaders.train, loaders.val):
        for x, y in loader:
            for image, label in zip(x, y.tolist(), strict=True):
                std, mean = torch.tensor(spec.std), torch.tensor(spec.mean)
                pixels = image.mean(dim=(1, 2)) * std + mean  # (normalised: undone)
                torch.testing.assert_close(pixels, torch.full((3,), 40 * (label + 1) / 255))
                seen[label] += 1
    assert seen == {0: 4, 1: 4, 2: 4}
    assert get_img_extensions() == before


def test_an_unreadable_image_is_reported_once_not_every_epoch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """timm skips an image it cannot decode and logs it each time it is drawn: every epoch of
    every trial, -q or not. Once per process now."""
    for name in ("a", "b"):
        for i in range(4):
            _image(tmp_path / "pool" / name / f"{i}.png")
    (tmp_path / "pool" / "a" / "bad.png").write_bytes(b"not a png")
    spec = resolve_data(tmp_path / "pool", holdout=0.5)
    with caplog.at_level("WARNING", logger="timm.data.dataset"):
        for _ in range(3):  # three epochs, in two loaders' worth of opens
            loaders = create_loaders(spec, img_size=8, batch_size=1, hflip=0.0, scale=(1, 1))
            for loader in (loaders.train, loaders.val):
                assert sum(len(y) for _, y in loader) == len(loader.dataset)
    bad = [r for r in caplog.records if "bad.png" in r.getMessage()]
    assert len(bad) == 1 and bad[0].getMessage().startswith("Skipped sample")


def test_ddp_shuffles_of_neighbouring_seeds_are_not_shifted_copies(
    tiny_root: Path, tmp_path: Path
) -> None:
    """DistributedSampler seeds its permutation with seed + epoch: seed 0's epoch 2 was seed
    1's epoch 1. Under torch.distributed the shuffle is keyed to (seed, epoch) as without it
    (seed * 100_003 + epoch), so neighbouring seeds' runs see other orders."""
    import torch.distributed as dist

    spec = resolve_data(tiny_root)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:

        def order(seed: int, epoch: int) -> list[int]:
            loaders = create_loaders(spec, img_size=32, batch_size=8, seed=seed)
            loaders.set_epoch(epoch)
            return list(loaders.train.sampler)

        assert order(0, 2) == order(0, 2) != order(0, 3)
        assert order(0, 2) != order(1, 1) and order(0, 3) != order(1, 2)
    finally:
        dist.destroy_process_group()
