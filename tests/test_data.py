"""Specification of the data package: real Fashion-MNIST, the idx reader, every loader's error paths,
ImageFolder, Tiny-ImageNet (.pt and archive) and ZCA, all without network access."""

from __future__ import annotations

import gzip
import pickle
import struct
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torchvision
from PIL import Image

import data
from data import DataOptions, ImageSplit, ZCAWhitening, get_dataset, read_idx
from errors import ConfigError, DataError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every torchvision download goes through urlopen; make it fail like an offline machine."""
    attempts: list[str] = []

    def refuse(request: object, *args: object, **kwargs: object) -> None:
        attempts.append(getattr(request, "full_url", str(request)))
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return attempts


def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">I", (0x08 << 8) | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx_set(directory: Path, train: int, test: int, compress: bool) -> None:
    """Small synthetic idx files in the four standard names."""
    generator = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", train), ("t10k", test)):
        arrays = {
            f"{prefix}-images-idx3-ubyte": generator.integers(0, 256, (count, 28, 28)),
            f"{prefix}-labels-idx1-ubyte": np.arange(count) % 10,
        }
        for name, array in arrays.items():
            raw = _idx_bytes(array)
            if compress:
                (directory / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:
                (directory / name).write_bytes(raw)


# ---------------------------------------------------------------- Fashion-MNIST and idx


@pytest.fixture(scope="module")
def fashion() -> data.Dataset:
    assert FASHION_DIR.is_dir(), "install Fashion-MNIST: apt-get install dataset-fashion-mnist"
    return get_dataset("FashionMNIST", "/nonexistent-data-path")


def test_real_fashion_mnist_shapes(fashion: data.Dataset) -> None:
    assert (len(fashion.train), len(fashion.test)) == (60000, 10000)
    assert fashion.train.images.shape == (60000, 1, 28, 28)
    assert fashion.train.images.dtype == torch.uint8
    assert fashion.train.labels.dtype == torch.int64
    assert (fashion.channel, fashion.im_size, fashion.num_classes) == (1, (28, 28), 10)
    assert fashion.train.class_sizes() == [6000] * 10
    assert fashion.test.class_sizes() == [1000] * 10
    assert fashion.mean == [0.2861] and fashion.std == [0.3530]
    assert fashion.class_names[0] == "T-shirt/top"


def test_real_fashion_mnist_fetch_normalises(fashion: data.Dataset) -> None:
    index = torch.tensor([0, 17, 59999])
    batch = fashion.train.fetch(index)
    expected = (fashion.train.images[index].double() / 255 - 0.2861) / 0.3530
    assert batch.dtype == torch.float32 and batch.shape == (3, 1, 28, 28)
    assert torch.allclose(batch.double(), expected, atol=1e-6, rtol=0)


def test_real_fashion_mnist_class_indices(fashion: data.Dataset) -> None:
    for label, indices in enumerate(fashion.train.class_indices):
        assert torch.all(fashion.train.labels[indices] == label)
        assert torch.all(indices[1:] > indices[:-1])


def test_class_indices_random_labels() -> None:
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 6, (500,), generator=generator)
    labels[labels == 4] = 5  # class 4 left empty on purpose
    split = ImageSplit.from_tensors(torch.zeros(500, 1, 2, 2, dtype=torch.uint8), labels, 7, [0.5], [0.25])
    assert len(split.class_indices) == 7
    for label, indices in enumerate(split.class_indices):
        assert indices.dtype == torch.int64
        assert torch.equal(indices, torch.nonzero(labels == label).flatten())
    assert split.class_sizes()[4] == 0 and split.class_sizes()[6] == 0
    assert sum(split.class_sizes()) == 500


def test_fetch_float_split_is_returned_as_is() -> None:
    images = torch.randn(4, 3, 2, 2)
    split = ImageSplit.from_tensors(images, torch.tensor([0, 1, 0, 1]), 2, [0.0] * 3, [1.0] * 3).to("cpu")
    assert torch.equal(split.fetch(torch.tensor([2, 3])), images[2:])


def test_idx_reader_rejects_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(_idx_bytes(np.zeros((5, 28, 28)))[:-10])
    with pytest.raises(DataError, match="truncated") as info:
        read_idx(path, ndim=3)
    assert str(path) in str(info.value)


def test_idx_reader_rejects_wrong_magic(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    path.write_bytes(_idx_bytes(np.zeros(5)))
    with pytest.raises(DataError, match="magic"):
        read_idx(path, ndim=3)


def test_idx_reader_rejects_truncated_gzip(tmp_path: Path) -> None:
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(_idx_bytes(np.zeros(1000)))[:-20])
    with pytest.raises(DataError, match=str(path)):
        read_idx(path, ndim=1)


def test_fashion_mnist_from_data_path_uncompressed_raw(tmp_path: Path) -> None:
    _write_idx_set(tmp_path / "FashionMNIST" / "raw", train=30, test=20, compress=False)
    dataset = get_dataset("FashionMNIST", tmp_path)
    assert (len(dataset.train), len(dataset.test)) == (30, 20)
    assert dataset.train.class_sizes() == [3] * 10


def test_mnist_from_data_path_gzip_files(tmp_path: Path) -> None:
    _write_idx_set(tmp_path, train=20, test=10, compress=True)
    dataset = get_dataset("MNIST", str(tmp_path))
    assert (len(dataset.train), len(dataset.test), dataset.mean) == (20, 10, [0.1307])


def test_missing_mnist_lists_paths_tried(tmp_path: Path, no_network: list[str]) -> None:
    with pytest.raises(DataError) as info:
        get_dataset("MNIST", tmp_path)
    message = str(info.value)
    assert no_network, "the torchvision download should have been attempted"
    assert str(tmp_path / "MNIST" / "raw") in message and f"{tmp_path}," in message
    assert "network" in message and "--data_path" in message


def test_cifar10_missing_fails_fast(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(DataError, match="CIFAR10 not found") as info:
        get_dataset("CIFAR10", tmp_path)
    assert time.monotonic() - start < 10
    assert str(tmp_path) in str(info.value)


def test_cifar10_from_torchvision_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny pickles in torchvision's layout; the md5 check is bypassed since they are not the real files."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    generator = np.random.default_rng(0)
    names = [f"data_batch_{number}" for number in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": generator.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [1, 9]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{index}" for index in range(10)]}))
    dataset = get_dataset("CIFAR10", tmp_path)
    assert (len(dataset.train), len(dataset.test), dataset.channel, dataset.im_size) == (10, 2, 3, (32, 32))
    assert dataset.class_names[9] == "c9" and dataset.train.class_sizes()[1] == 5
    first = pickle.loads((folder / "data_batch_1").read_bytes())["data"][0]
    assert torch.equal(dataset.train.images[0], torch.from_numpy(first).reshape(3, 32, 32))


def test_svhn_from_torchvision_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torchvision.datasets.SVHN, "_check_integrity", lambda self: True)
    generator = np.random.default_rng(0)
    for split, count in (("train", 4), ("test", 3)):
        pixels = generator.integers(0, 256, (32, 32, 3, count), dtype=np.uint8)
        digits = np.array([10, 1, 2, 5][:count]).reshape(-1, 1)  # SVHN stores digit 0 as label 10
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat", {"X": pixels, "y": digits})
    dataset = get_dataset("SVHN", tmp_path)
    assert dataset.train.images.shape == (4, 3, 32, 32) and dataset.train.images.dtype == torch.uint8
    assert dataset.train.labels.tolist() == [0, 1, 2, 5]


# ---------------------------------------------------------------- ImageFolder


def _write_images(directory: Path, count: int, mode: str, size: int, seed: int = 0) -> None:
    generator = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    shape = (size, size) if mode == "L" else (size, size, 3)
    for number in range(count):
        Image.fromarray(generator.integers(0, 256, shape, dtype=np.uint8), mode).save(directory / f"{number}.png")


def _folder(root: Path, counts: dict[str, int], mode: str = "RGB", size: int = 12, split: str = "train") -> Path:
    for offset, (name, count) in enumerate(counts.items()):
        _write_images(root / split / name, count, mode, size, seed=offset)
    return root


def test_image_folder_with_test_dir_rgb_resized(tmp_path: Path) -> None:
    _folder(tmp_path, {"cat": 4, "dog": 3, "eel": 2})
    _folder(tmp_path, {"cat": 1, "dog": 2, "eel": 1}, split="test")
    dataset = get_dataset("ImageFolder", tmp_path, DataOptions(im_size=8))
    assert dataset.class_names == ["cat", "dog", "eel"]
    assert (dataset.channel, dataset.im_size, dataset.num_classes) == (3, (8, 8), 3)
    assert dataset.train.images.shape == (9, 3, 8, 8) and dataset.train.images.dtype == torch.uint8
    assert dataset.train.class_sizes() == [4, 3, 2] and dataset.test.class_sizes() == [1, 2, 1]
    pixels = dataset.train.images.double() / 255
    assert np.allclose(dataset.mean, pixels.mean(dim=(0, 2, 3)).numpy(), atol=1e-9)
    assert np.allclose(dataset.std, pixels.std(dim=(0, 2, 3), unbiased=False).numpy(), atol=1e-9)
    assert torch.allclose(dataset.train.fetch(torch.arange(9)).mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)


def test_image_folder_grayscale_is_one_channel(tmp_path: Path) -> None:
    _folder(tmp_path, {"a": 3, "b": 3}, mode="L")
    dataset = get_dataset("ImageFolder", tmp_path)
    assert (dataset.channel, dataset.im_size) == (1, (32, 32))
    assert len(dataset.mean) == 1


def test_image_folder_one_rgb_image_makes_three_channels(tmp_path: Path) -> None:
    _folder(tmp_path, {"a": 3, "b": 3}, mode="L")
    _write_images(tmp_path / "train" / "b" / "colour", 1, "RGB", 12)
    assert get_dataset("ImageFolder", tmp_path).channel == 3


def test_image_folder_stratified_split_is_seeded(tmp_path: Path) -> None:
    _folder(tmp_path, {"a": 10, "b": 5, "c": 1})

    def split(seed: int) -> data.Dataset:
        return get_dataset("ImageFolder", tmp_path, DataOptions(im_size=4, seed=seed, test_fraction=0.2))

    first, again, other = split(0), split(0), split(1)
    assert first.train.class_sizes() == [8, 4, 1] and first.test.class_sizes() == [2, 1, 0]
    assert torch.equal(first.test.images, again.test.images)
    assert not torch.equal(first.test.images, other.test.images)
    assert other.test.class_sizes() == [2, 1, 0]


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="train"):
        get_dataset("ImageFolder", tmp_path)
    _folder(tmp_path, {"only": 2})
    with pytest.raises(DataError, match="at least 2"):
        get_dataset("ImageFolder", tmp_path)
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(DataError, match="empty holds no images"):
        get_dataset("ImageFolder", tmp_path)
    (tmp_path / "train" / "empty" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.png"):
        get_dataset("ImageFolder", tmp_path)


def test_image_folder_test_classes_must_match(tmp_path: Path) -> None:
    _folder(tmp_path, {"a": 2, "b": 2})
    _folder(tmp_path, {"a": 1}, split="test")
    with pytest.raises(DataError, match="same class directories"):
        get_dataset("ImageFolder", tmp_path)


# ---------------------------------------------------------------- Tiny-ImageNet


def _tiny_payload(classes: int = 2, per_class: int = 3) -> dict[str, object]:
    generator = torch.Generator().manual_seed(0)
    count = classes * per_class
    return {
        "images_train": torch.randint(0, 256, (count, 3, 64, 64), dtype=torch.uint8, generator=generator),
        "labels_train": torch.arange(classes).repeat_interleave(per_class),
        "images_val": torch.randint(0, 256, (classes, 3, 64, 64), dtype=torch.uint8, generator=generator),
        "labels_val": torch.arange(classes),
        "classes": [f"n{index:08d}" for index in range(classes)],
    }


def test_tiny_imagenet_from_pt(tmp_path: Path) -> None:
    torch.save(_tiny_payload(), tmp_path / "tinyimagenet.pt")
    dataset = get_dataset("TinyImageNet", tmp_path)
    assert (dataset.num_classes, dataset.channel, dataset.im_size) == (2, 3, (64, 64))
    assert dataset.train.class_sizes() == [3, 3] and len(dataset.test) == 2
    assert dataset.class_names == ["n00000000", "n00000001"]


@pytest.mark.parametrize(
    "payload, problem",
    [
        ([1, 2, 3], "not a dict"),
        ({key: value for key, value in _tiny_payload().items() if key != "labels_val"}, "labels_val"),
        ({**_tiny_payload(), "images_train": torch.zeros(6, 3, 64, 64)}, "uint8"),
        ({**_tiny_payload(), "images_val": torch.zeros(2, 3, 32, 32, dtype=torch.uint8)}, "shape"),
        ({**_tiny_payload(), "labels_train": torch.full((6,), 7)}, "labels_train"),
    ],
)
def test_tiny_imagenet_rejects_unexpected_pt(tmp_path: Path, payload: object, problem: str) -> None:
    torch.save(payload, tmp_path / "tinyimagenet.pt")
    with pytest.raises(DataError, match=problem) as info:
        get_dataset("TinyImageNet", tmp_path)
    assert "tinyimagenet.pt" in str(info.value)


def test_tiny_imagenet_rejects_unreadable_pt(tmp_path: Path) -> None:
    (tmp_path / "tinyimagenet.pt").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable torch file"):
        get_dataset("TinyImageNet", tmp_path)


def _tiny_archive(root: Path, wnids: list[str], per_class: int) -> None:
    """The extracted layout: train/<wnid>/images/*.JPEG and val/images + val_annotations.txt."""
    generator = np.random.default_rng(0)
    for wnid in wnids:
        (root / "train" / wnid / "images").mkdir(parents=True)
        for number in range(per_class):
            pixels = generator.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "train" / wnid / "images" / f"{wnid}_{number}.JPEG")
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for number, wnid in enumerate(reversed(wnids)):
        Image.fromarray(generator.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            root / "val" / "images" / f"val_{number}.JPEG"
        )
        lines.append(f"val_{number}.JPEG\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def test_tiny_imagenet_from_archive_writes_cache(tmp_path: Path) -> None:
    _tiny_archive(tmp_path / "tiny-imagenet-200", ["n02", "n01", "n03"], per_class=2)
    dataset = get_dataset("TinyImageNet", tmp_path)
    assert dataset.class_names == ["n01", "n02", "n03"]
    assert dataset.train.class_sizes() == [2, 2, 2]
    assert dataset.test.labels.tolist() == [2, 0, 1]
    assert dataset.train.images.shape == (6, 3, 64, 64) and dataset.train.images.dtype == torch.uint8
    cache = tmp_path / "tinyimagenet.pt"
    assert cache.is_file() and not list(tmp_path.glob(".tinyimagenet.pt.*"))
    cached = get_dataset("TinyImageNet", tmp_path)
    assert torch.equal(cached.train.images, dataset.train.images)
    assert torch.equal(cached.test.labels, dataset.test.labels)


def test_tiny_imagenet_archive_as_data_path(tmp_path: Path) -> None:
    _tiny_archive(tmp_path, ["a", "b"], per_class=1)
    assert get_dataset("TinyImageNet", tmp_path).num_classes == 2


def test_tiny_imagenet_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="tiny-imagenet-200") as info:
        get_dataset("TinyImageNet", tmp_path)
    assert str(tmp_path / "tinyimagenet.pt") in str(info.value)


# ---------------------------------------------------------------- ZCA


def _correlated(rows: int, columns: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    mixing = torch.randn(columns, columns, generator=generator, dtype=torch.float64)
    return torch.randn(rows, columns, generator=generator, dtype=torch.float64) @ mixing + 0.5


def test_zca_round_trip() -> None:
    images = _correlated(300, 12).reshape(300, 3, 2, 2).float()
    zca = ZCAWhitening.fit(images)
    restored = zca.inverse(zca.transform(images))
    assert restored.shape == images.shape
    assert torch.allclose(restored, images, atol=1e-4)


def test_zca_whitened_covariance_is_identity() -> None:
    images = _correlated(4000, 8)
    whitened = ZCAWhitening.fit(images, eps=1e-8).transform(images).double()
    assert torch.allclose(torch.cov(whitened.T), torch.eye(8, dtype=torch.float64), atol=1e-3)
    assert torch.allclose(whitened.mean(dim=0), torch.zeros(8, dtype=torch.float64), atol=1e-4)


def test_zca_dataset_option(tmp_path: Path) -> None:
    _folder(tmp_path, {"a": 6, "b": 6})
    dataset = get_dataset("ImageFolder", tmp_path, DataOptions(im_size=4, zca=True)).to("cpu")
    assert dataset.zca is not None and dataset.train.images.dtype == torch.float32
    assert dataset.mean == [0.0] * 3 and dataset.std == [1.0] * 3
    index = torch.tensor([0, 3])
    batch = dataset.train.fetch(index)
    assert torch.equal(batch, dataset.train.images[index])
    plain = get_dataset("ImageFolder", tmp_path, DataOptions(im_size=4))
    original = plain.test.images.float() / 255
    assert torch.allclose(dataset.denormalize(dataset.test.fetch(torch.arange(len(plain.test)))), original, atol=1e-4)


def test_denormalize_inverts_fetch(tmp_path: Path) -> None:
    _folder(tmp_path, {"a": 5, "b": 5})
    dataset = get_dataset("ImageFolder", tmp_path, DataOptions(im_size=4))
    batch = dataset.train.fetch(torch.arange(len(dataset.train)))
    assert torch.allclose(dataset.denormalize(batch), dataset.train.images.float() / 255, atol=1e-6)


# ---------------------------------------------------------------- registry and options


def test_unknown_dataset_lists_names() -> None:
    with pytest.raises(ConfigError, match="unknown dataset 'Imagenette'") as info:
        get_dataset("Imagenette", ".")
    assert all(name in str(info.value) for name in data.dataset_names())
    assert data.dataset_names() == list(data.DATASETS)


def test_a_size_for_a_fixed_size_dataset_is_a_config_error(tmp_path: Path) -> None:
    """Only ImageFolder resizes; the options' ranges are checked once, with the config (test_cli)."""
    with pytest.raises(ConfigError, match="--im_size only applies to ImageFolder"):
        get_dataset("CIFAR10", tmp_path, DataOptions(im_size=16))
