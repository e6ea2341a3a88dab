"""Distilled sets as files: this project's own, those other projects publish, and DD-Ranking's input.

``load_set_file(path)`` tells the formats apart by what is at ``path``; nothing in a file is
executed (``torch.load(weights_only=True)``). Read as they are written:

- This project's set file: a dict with ``images``, ``labels``, ``meta`` and optionally
  ``soft_labels``: one row [C] per TRAINING image (after mosaic decoding), with
  ``meta["soft_labels"]`` saying "logits" or "probabilities".
- A plain pair ``(images, labels)``.
- DC/DSA/DM (VICO-UoE/DatasetCondensation) ``res_*.pt``: a dict whose ``data`` lists one
  ``[images, labels]`` per experiment, next to ``accs_all_exps``; ``experiment`` picks one (default 0).
- MTT (GeorgeCazenavette/mtt-distillation) and DATM: ``images_best.pt`` + ``labels_best.pt`` and,
  when the learnable learning rate was saved, ``lr_best.pt`` (a 0-d tensor). Pass their directory
  (DATM's run directory holding ``Normal/`` also works) or any of the three files. More generally,
  any tensor file whose name contains ``images`` is read with the files named the same with
  ``labels`` (and, when present, ``lr`` and ``soft_labels``) in its place, e.g. MTT's
  ``images_5000.pt`` or the ``images.pt`` that ``export_dd_ranking`` writes. DATM's labels are learned
  soft labels, float [N, C] logits (DATM trains on softmax of them): they become ``soft_labels``
  ("logits") and the hard labels are their argmax. MTT images are ZCA-whitened when distilled
  with ``--zca`` and the files do not say so: ``meta["zca"]`` is None (unknown) and evaluating
  such a set needs ``evaluate.py --zca``. MTT (and DD-Ranking's evaluator) whiten the
  UNNORMALISED [0,1] pixels with kornia ``ZCAWhitening(eps=0.1)`` (with ``--zca`` their transform
  is ToTensor only); data/whitening.py does the same (eps 0.1, unbiased covariance, [0,1] pixels),
  so the test set is whitened alike. Soft labels' argmax is taken as the hard labels, whereas
  DD-Ranking's hard-label runs use the class order DATM's images were initialised in: the two
  differ only where learning moved an image's argmax to another class.
- DC-BENCH (justincui03/dc_benchmark): ``distilled_results/<method>/<dataset>/IPC<n>/`` holding one
  of: a ``res_*.pt`` (DC, DSA, DM), ``images_best.pt`` + ``labels_best.pt`` (TM; for
  TinyImageNet IPC 50 split into ``images_best_<k>.pt`` + ``labels_best_<k>.pt``, k = 0, 1, ...,
  concatenated in order) or ``<dataset>_IPC<n>[_normalize]_images.pt`` + ``..._labels.pt``
  (random, Kmeans). Pass the IPC folder or a file in it; the folder names fill in the method, IPC
  and (when it is one of ours, ignoring case) dataset that the files do not say. Two differences
  from DC-BENCH: it evaluates the LAST experiment of a ``res_*.pt``, here ``--experiment`` chooses
  (default 0); KIP's ``.npz`` sets are refused (KIP whitens with its own regularised ZCA on
  per-image normalised pixels, which no dataset here reproduces).
- DD-Ranking (NUS-HPC-AI-Lab/DD-Ranking) input: an images tensor file [N, C, H, W] (normalised as
  the dataset is), with labels from ``--labels FILE`` or, as DD-Ranking does, inferred as
  N / num_classes images per class in class order; optional soft labels from ``--soft_labels
  FILE`` ([N, C] teacher logits, DD-Ranking's soft label mode S). Or an image folder: one
  sub-directory per class of PNG/JPEG files, classes indexed in sorted name order (torchvision
  ImageFolder, which DD-Ranking uses; name numbered folders with leading zeros, "07" not "7").
  Folder images are [0,1] pixels (``meta["pixels"]``) until ``fit_to_dataset`` normalises them.

``fit_to_dataset`` finishes what needs the dataset (inferred labels, pixels, the soft labels'
width); evaluate.py calls it just after loading the dataset. ``export_dd_ranking`` writes
DD-Ranking's input for any readable set: ``python set_formats.py export SET --out DIR``.
"""

from __future__ import annotations

import re
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from cli import OneLineParser
from data import Dataset, dataset_names
from data.common import one_line
from data.image_files import decode_images
from data.image_folder import GRAYSCALE_MODES, IMAGE_SUFFIXES
from errors import ConfigError, DataError, exit_code_of
from eval_labels import logits_of_probabilities
from outputs import atomic_write
from synthetic import decoded_set, set_labels

SOFT_LABEL_KINDS = ("logits", "probabilities")
MTT_FILES = ("images_best.pt", "labels_best.pt", "lr_best.pt")
CLASS_BLOCKS = "class_blocks"  # meta["labels"]: to be inferred as DD-Ranking does, once the classes are known
IPC_FOLDER = re.compile(r"IPC(\d+)")


@dataclass
class LoadedSet:
    """A set to evaluate: the stored images, their labels and what the file says about them.

    ``soft_labels`` are per-training-image teacher outputs [N, C] shipped with the set
    (``meta["soft_labels"]`` says "logits" or "probabilities"); ``lr`` is a learning rate the
    set's authors stored with it (MTT's ``lr_best.pt``).
    """

    images: torch.Tensor
    labels: torch.Tensor
    meta: dict[str, Any]
    soft_labels: torch.Tensor | None = None
    lr: float | None = None


def load_set_file(path: Path, experiment: int = 0, labels: Path | None = None,
                  soft_labels: Path | None = None) -> LoadedSet:
    """Read the set at ``path`` (a file or a directory, see the module docstring); ``labels`` and
    ``soft_labels`` are tensor files for a set whose own files carry none (DD-Ranking input)."""
    loaded = _read_directory(path, experiment) if path.is_dir() else _read_file(path, experiment)
    loaded = replace(loaded, meta={**_dc_bench_meta(path if path.is_dir() else path.parent), **loaded.meta})
    if labels is not None:
        loaded = _with_labels(loaded, path, labels)
    if soft_labels is not None:
        loaded = _with_soft_labels(loaded, path, soft_labels)
    return loaded


def _load(path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except Exception as error:
        raise DataError(f"{path} is not a file of plain tensors that can be loaded safely "
                        f"({type(error).__name__}); re-save it with torch.save((images, labels), PATH) "
                        "from a session you trust") from None


def _tensor(path: Path, what: str) -> torch.Tensor:
    payload = _load(path)
    if not isinstance(payload, torch.Tensor):
        raise DataError(f"{path}: expected a tensor of {what}, got {type(payload).__name__}; save the "
                        f"{what} alone with torch.save(tensor, PATH)")
    return payload.detach()


def _tensor_pair(images: Any, labels: Any, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise DataError(f"{path}: expected an images tensor and a labels tensor, got "
                        f"{type(images).__name__} and {type(labels).__name__}")
    return images.detach(), labels.detach()


def _read_file(path: Path, experiment: int) -> LoadedSet:
    if path.name in MTT_FILES:
        return _read_paired(path.parent / "images_best.pt")
    if "images" in path.name and _sibling(path, "labels").is_file():
        return _read_paired(path)
    return _from_payload(_load(path), path, experiment)


def _from_payload(payload: Any, path: Path, experiment: int) -> LoadedSet:
    if isinstance(payload, dict) and "images" in payload and "labels" in payload:
        return _own_set(payload, path)
    if isinstance(payload, dict) and isinstance(payload.get("data"), list):  # DC/DSA/DM's res_*.pt
        if not 0 <= experiment < len(payload["data"]):
            raise ConfigError(f"{path} holds {len(payload['data'])} experiments; --experiment {experiment} is not one")
        return LoadedSet(*_tensor_pair(*payload["data"][experiment][:2], path), {"format": "res"})
    if isinstance(payload, (tuple, list)) and len(payload) == 2:
        return LoadedSet(*_tensor_pair(*payload, path), {"format": "pair"})
    if isinstance(payload, torch.Tensor):  # DD-Ranking's images tensor
        return LoadedSet(payload.detach(), torch.empty(0, dtype=torch.int64),
                         {"format": "dd_ranking", "labels": CLASS_BLOCKS})
    raise DataError(f"{path}: expected a dict with 'images' and 'labels', a reference res_*.pt, a pair "
                    f"(images, labels) or an images tensor; got {type(payload).__name__}")


def _own_set(payload: dict[str, Any], path: Path) -> LoadedSet:
    """This project's set file; its soft labels must say whether they are logits or probabilities."""
    images, labels = _tensor_pair(payload["images"], payload["labels"], path)
    meta = payload.get("meta", {})
    meta = meta if isinstance(meta, dict) else {}
    soft = payload.get("soft_labels")
    if soft is None:
        return LoadedSet(images, labels, meta)
    if not isinstance(soft, torch.Tensor) or meta.get("soft_labels") not in SOFT_LABEL_KINDS:
        raise DataError(f"{path}: 'soft_labels' must be a tensor with meta['soft_labels'] one of "
                        f"{', '.join(SOFT_LABEL_KINDS)}, got {type(soft).__name__} and {meta.get('soft_labels')!r}")
    _check_soft(soft.detach(), _training_count(images, meta), path)
    return LoadedSet(images, labels, meta, soft.detach())


def _training_count(images: torch.Tensor, meta: dict[str, Any]) -> int:
    """Images trained on: four per stored 2x2 mosaic when the set is one (meta aug)."""
    return len(images) * (4 if meta.get("aug") else 1)


def _check_soft(soft: torch.Tensor, count: int, path: Path) -> None:
    if soft.ndim != 2 or not soft.is_floating_point() or len(soft) != count or not torch.isfinite(soft).all():
        raise DataError(f"{path}: soft labels must be a finite float tensor [N, C] with one row per training "
                        f"image (N = {count}), got {soft.dtype} of shape {tuple(soft.shape)}")


def _sibling(images_path: Path, word: str) -> Path:
    """The file named as ``images_path`` with its last ``images`` replaced by ``word``."""
    head, _, tail = images_path.name.rpartition("images")
    return images_path.with_name(f"{head}{word}{tail}")


def _read_paired(images_path: Path) -> LoadedSet:
    """MTT's naming: images, labels and optionally lr (and soft_labels) in tensor files side by side;
    float [N, C] labels are learned soft labels (DATM), their argmax the hard labels."""
    labels_path, lr_path, soft_path = (_sibling(images_path, word) for word in ("labels", "lr", "soft_labels"))
    if not images_path.is_file() or not labels_path.is_file():
        raise DataError(f"{images_path.parent}: a set of tensor files needs both {images_path.name} and "
                        f"{labels_path.name}; copy the missing file next to the other")
    images, labels = _tensor(images_path, "images"), _tensor(labels_path, "labels")
    learned = labels.ndim == 2 and labels.is_floating_point()
    if learned:
        soft, labels = labels.float(), labels.argmax(dim=1)
    else:
        soft = _tensor(soft_path, "soft labels").float() if soft_path.is_file() else None
        if labels.is_floating_point() and torch.equal(labels, labels.round()):
            labels = labels.long()  # class numbers saved as floats, read as DC-BENCH does (.long())
    meta: dict[str, Any] = {"format": "tensor_files", "zca": None}
    if soft is not None:
        _check_soft(soft, len(images), labels_path if learned else soft_path)
        meta["soft_labels"] = "logits"
    if images_path.name.startswith("images_"):
        meta["method"] = "datm" if learned else "mtt"
    return LoadedSet(images, labels, meta, soft, _read_lr(lr_path) if lr_path.is_file() else None)


def _read_lr(path: Path) -> float:
    lr = _tensor(path, "learning rate")
    if lr.numel() != 1 or not lr.is_floating_point():
        raise DataError(f"{path}: expected one float learning rate, got {lr.dtype} of shape {tuple(lr.shape)}")
    return float(lr)


def _read_parts(folder: Path) -> LoadedSet:
    """DC-BENCH's TinyImageNet IPC 50 TM set: images_best_<k>.pt + labels_best_<k>.pt, k = 0, 1, ..."""
    parts = []
    while (folder / f"images_best_{len(parts)}.pt").is_file():
        parts.append(_read_paired(folder / f"images_best_{len(parts)}.pt"))
    return LoadedSet(torch.cat([part.images for part in parts]), torch.cat([part.labels for part in parts]),
                     {"format": "tensor_files", "zca": None, "method": "mtt"})


def _read_directory(path: Path, experiment: int) -> LoadedSet:
    if (path / "sets").is_dir():
        raise DataError(_directory_message(path))
    for folder in (path, path / "Normal"):  # DATM writes its files under <run>/Normal/
        if (folder / "images_best.pt").is_file():
            return _read_paired(folder / "images_best.pt")
    if (path / "images_best_0.pt").is_file():
        return _read_parts(path)
    candidates = sorted(path.glob("res_*.pt")) + [p for p in sorted(path.glob("*images*.pt"))
                                                   if _sibling(p, "labels").is_file()]
    if len(candidates) > 1:
        raise DataError(f"{path} holds {len(candidates)} sets ({', '.join(p.name for p in candidates)}); "
                        "pass one of the files")
    if candidates:
        return _read_file(candidates[0], experiment)
    if any(path.glob("*.npz")):
        raise DataError(f"{path}: KIP's .npz sets are not supported (they are whitened with KIP's own ZCA, "
                        "which no dataset here reproduces)")
    classes = _class_folders(path)
    if classes:
        return _read_image_folder(path, classes)
    raise DataError(_directory_message(path))


def _directory_message(path: Path) -> str:
    """Today's message for a run directory; elsewhere it also names the folders of other projects."""
    sets = sorted((path / "sets").glob("exp*_it*.pt"))
    example = sets[-1] if sets else path / "sets" / "exp0_it000100.pt"
    message = f"{path} is a directory; pass one set file, e.g. {example}"
    if (path / "sets").is_dir():
        return message
    return (f"{message}, or a directory of another project's set (MTT's images_best.pt, a DC-BENCH IPC "
            "folder, or one sub-directory of images per class)")


def _dc_bench_meta(folder: Path) -> dict[str, Any]:
    """What DC-BENCH's distilled_results/<method>/<dataset>/IPC<n>/ says: method, IPC, our dataset name."""
    match = IPC_FOLDER.fullmatch(folder.name)
    if match is None:
        return {}
    meta: dict[str, Any] = {"method": folder.parent.parent.name.lower(), "ipc": int(match.group(1))}
    ours = {name.lower(): name for name in dataset_names()}.get(folder.parent.name.lower())
    return {**meta, "dataset": ours} if ours else meta


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def _class_folders(path: Path) -> list[Path]:
    """Sub-directories (sorted by name, as ImageFolder indexes them) when any holds image files."""
    folders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    return folders if any(_image_files(folder) for folder in folders) else []


def _header(path: Path) -> tuple[str, tuple[int, int]]:
    try:
        with Image.open(path) as image:
            return image.mode, image.size
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read image {path} ({one_line(error)}); replace or remove the file") from None


def _read_image_folder(path: Path, classes: list[Path]) -> LoadedSet:
    """Class folders of images as [0,1] pixels, labelled by folder, decoded at their own (one) size."""
    files = [_image_files(folder) for folder in classes]
    empty = [folder.name for folder, found in zip(classes, files) if not found]
    if empty:
        raise DataError(f"{path}: class folder {empty[0]} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                        "add its images or remove the folder")
    flat = [file for found in files for file in found]
    headers = [_header(file) for file in flat]
    sizes = sorted({size for _, size in headers})
    if len(sizes) != 1 or sizes[0][0] != sizes[0][1]:
        raise DataError(f"{path}: images must all be square and of one size, found (width, height) "
                        f"{', '.join(map(str, sizes[:3]))}; save the set at the dataset's image size")
    mode = "L" if all(mode in GRAYSCALE_MODES for mode, _ in headers) else "RGB"
    images = decode_images(flat, sizes[0][0], mode).float().div_(255)
    labels = torch.repeat_interleave(torch.arange(len(classes)), torch.tensor([len(found) for found in files]))
    return LoadedSet(images, labels, {"format": "image_folder", "pixels": True,
                                      "class_names": [folder.name for folder in classes]})


def _with_labels(loaded: LoadedSet, path: Path, labels_path: Path) -> LoadedSet:
    """--labels: the hard labels of an images tensor that has none."""
    if loaded.meta.get("labels") != CLASS_BLOCKS:
        raise ConfigError(f"{path} carries its own labels; drop --labels (it is for a DD-Ranking images tensor)")
    labels = _tensor(labels_path, "labels")
    if labels.shape != (len(loaded.images),) or labels.is_floating_point():
        raise DataError(f"{labels_path}: labels must be an integer tensor [N] for {len(loaded.images)} images, "
                        f"got {labels.dtype} of shape {tuple(labels.shape)}; give soft labels with --soft_labels")
    return replace(loaded, labels=labels, meta={**loaded.meta, "labels": "file"})


def _with_soft_labels(loaded: LoadedSet, path: Path, soft_path: Path) -> LoadedSet:
    """--soft_labels: teacher logits [N, C] for a set whose files carry none (DD-Ranking's mode S)."""
    if loaded.soft_labels is not None:
        raise ConfigError(f"{path} carries its own soft labels; drop --soft_labels")
    soft = _tensor(soft_path, "soft labels")
    _check_soft(soft, _training_count(loaded.images, loaded.meta), soft_path)
    return replace(loaded, soft_labels=soft.float(), meta={**loaded.meta, "soft_labels": "logits"})


def fit_to_dataset(loaded: LoadedSet, dataset: Dataset) -> LoadedSet:
    """Finish what needs the dataset: DD-Ranking's inferred labels, folder pixels, the soft labels' width."""
    if loaded.meta.get("labels") == CLASS_BLOCKS:
        loaded = _class_block_labels(loaded, dataset.num_classes)
    if loaded.meta.get("pixels"):
        loaded = normalise_pixels(loaded, dataset)
    if loaded.soft_labels is not None and loaded.soft_labels.shape[1] != dataset.num_classes:
        raise DataError(f"the set's soft labels have {loaded.soft_labels.shape[1]} classes but {dataset.name} has "
                        f"{dataset.num_classes}; use the soft labels made for this dataset")
    return loaded


def _class_block_labels(loaded: LoadedSet, num_classes: int) -> LoadedSet:
    """DD-Ranking's rule for an images tensor without labels: IPC images per class, in class order."""
    count = len(loaded.images)
    if count % num_classes:
        raise DataError(f"{count} images do not split into {num_classes} classes of equal size, so their labels "
                        "cannot be inferred (IPC images per class, in class order); pass --labels FILE")
    ipc = count // num_classes
    return replace(loaded, labels=set_labels(range(num_classes), ipc), meta={**loaded.meta, "labels": "inferred",
                                                                              "ipc": ipc})


def normalise_pixels(loaded: LoadedSet, dataset: Dataset) -> LoadedSet:
    """[0,1] pixels transformed as the dataset's own images are: ZCA-whitened when it is, else
    normalised with its mean/std, so a folder of PNGs trains like the tensors it was saved from."""
    images = loaded.images
    if tuple(images.shape[1:]) != (dataset.channel, *dataset.im_size):
        raise DataError(f"the set's images are {'x'.join(map(str, images.shape[1:]))} (channels x height x width) "
                        f"but {dataset.name} images are {dataset.channel}x{dataset.im_size[0]}x{dataset.im_size[1]}")
    if dataset.zca is not None:
        images = dataset.zca.to(images.device).transform(images)
    else:
        mean = torch.tensor(dataset.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(dataset.std, device=images.device).view(1, -1, 1, 1)
        images = (images - mean) / std
    return replace(loaded, images=images, meta={**loaded.meta, "pixels": False, "mean": dataset.mean,
                                                "std": dataset.std, "zca": dataset.zca is not None})


def export_dd_ranking(set_file: Path, out_dir: Path) -> dict[str, Path]:
    """Write DD-Ranking's input for the set at ``set_file`` into ``out_dir`` (see ``dd_ranking_tensors``);
    returns the files written, by name."""
    return _write_tensors(dd_ranking_tensors(load_set_file(set_file), set_file), out_dir)


def dd_ranking_tensors(loaded: LoadedSet, source: Path) -> dict[str, torch.Tensor]:
    """DD-Ranking's input: images [N, C, H, W] as stored (normalised, or whitened when meta zca), sorted
    by class so DD-Ranking's inferred labels (IPC per class, in class order) are right; labels [N];
    soft_labels [N, C] as logits (probabilities p become log p) and lr when the set has them. Mosaic
    sets (meta aug) are exported DECODED: DD-Ranking trains on the images it is given, so it gets the
    four images per mosaic that evaluate.py trains on."""
    if loaded.meta.get("pixels") or loaded.meta.get("labels") == CLASS_BLOCKS:
        raise DataError(f"{source} is DD-Ranking input already; give it to DD-Ranking as it is")
    images, labels = decoded_set(loaded.images, loaded.labels, bool(loaded.meta.get("aug")))
    if labels.shape != (len(images),) or labels.is_floating_point() or int(labels.min()) < 0:
        raise DataError(f"{source}: labels must be class numbers [N] for {len(images)} images, got "
                        f"{labels.dtype} of shape {tuple(labels.shape)}")
    counts = torch.bincount(labels)
    if (counts != counts[0]).any():
        raise DataError(f"{source}: DD-Ranking needs the same number of images in every class, got "
                        f"{counts.tolist()} per class")
    order = torch.argsort(labels, stable=True)
    tensors = {"images": images[order], "labels": labels[order]}
    if loaded.soft_labels is not None:
        soft = loaded.soft_labels
        if loaded.meta.get("soft_labels") == "probabilities":
            soft = logits_of_probabilities(soft)
        tensors["soft_labels"] = soft[order]
    if loaded.lr is not None:
        tensors["lr"] = torch.tensor(loaded.lr)
    return tensors


def _write_tensors(tensors: dict[str, torch.Tensor], out_dir: Path) -> dict[str, Path]:
    written = {name: out_dir / f"{name}.pt" for name in tensors}
    for name, tensor in tensors.items():
        atomic_write(written[name], lambda tmp, tensor=tensor: torch.save(tensor, tmp))
    return written


def _export_command(set_file: Path, out_dir: Path) -> None:
    loaded = load_set_file(set_file)
    tensors = dd_ranking_tensors(loaded, set_file)
    written = _write_tensors(tensors, out_dir)
    ipc = len(tensors["labels"]) // (int(tensors["labels"].max()) + 1)
    print(f"wrote {', '.join(str(path) for path in written.values())}: {len(tensors['images'])} images, IPC {ipc}")
    if loaded.meta.get("zca"):
        print("the images are ZCA-whitened: evaluate them in DD-Ranking with use_zca=True")
    elif "mean" in loaded.meta:
        print(f"the images are normalised with mean {loaded.meta['mean']} and std {loaded.meta['std']}; "
              "DD-Ranking normalises its real images with its own constants, which must be these")


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="set_formats.py", description="Convert distilled sets between formats.")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write DD-Ranking's input (images.pt, labels.pt, ...) for a set")
    export.add_argument("set_file", help="any set evaluate.py reads")
    export.add_argument("--out", required=True, help="directory to write into")
    args = parser.parse_args(argv)
    return exit_code_of("set_formats.py", lambda: _export_command(Path(args.set_file), Path(args.out)))


if __name__ == "__main__":
    sys.exit(main())
