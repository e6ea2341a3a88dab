"""set_formats.py: every published set format is read as its project writes it, and exported to DD-Ranking.

Each file below is built the way the named project saves it (torch.save of the same objects, the
same names and folders), with tiny tensors: 2 classes x 2 images of 1x8x8 unless a dataset is needed.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import set_formats
from data import DataOptions, get_dataset
from errors import ConfigError, DataError
from set_formats import LoadedSet, export_dd_ranking, fit_to_dataset, load_set_file, normalise_pixels
from synthetic import decoded_set

IMAGES = torch.arange(4 * 64, dtype=torch.float32).view(4, 1, 8, 8) / 256
LABELS = torch.tensor([0, 0, 1, 1])
LOGITS = torch.tensor([[2.0, -1.0], [1.5, 0.0], [-3.0, 1.0], [0.5, 0.6]])


@pytest.fixture(scope="module")
def folder_dataset(image_folder: Path):
    """The generated ImageFolder dataset: 3 classes of 3x16x16 images."""
    return get_dataset("ImageFolder", image_folder, DataOptions(im_size=16))


@pytest.fixture(scope="module")
def whitened_dataset(image_folder: Path):
    return get_dataset("ImageFolder", image_folder, DataOptions(im_size=16, zca=True))


def save(path: Path, payload: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


# This project's files and plain pairs


def test_own_set_files_keep_their_meta_and_may_carry_soft_labels(tmp_path: Path) -> None:
    """A dict images/labels/meta reads as before; soft_labels ride along with meta['soft_labels']
    saying what they are."""
    meta = {"dataset": "MNIST", "ipc": 2, "aug": False, "soft_labels": "probabilities"}
    path = save(tmp_path / "set.pt", {"images": IMAGES, "labels": LABELS, "meta": meta,
                                      "soft_labels": LOGITS.softmax(dim=1)})
    loaded = load_set_file(path)
    assert torch.equal(loaded.images, IMAGES) and torch.equal(loaded.labels, LABELS)
    assert loaded.meta == meta and torch.allclose(loaded.soft_labels, LOGITS.softmax(dim=1)) and loaded.lr is None


def test_own_soft_labels_must_say_whether_logits_or_probabilities(tmp_path: Path) -> None:
    path = save(tmp_path / "set.pt", {"images": IMAGES, "labels": LABELS, "meta": {}, "soft_labels": LOGITS})
    with pytest.raises(DataError, match=r"meta\['soft_labels'\] one of logits, probabilities"):
        load_set_file(path)


def test_a_mosaic_sets_soft_labels_have_one_row_per_decoded_image(tmp_path: Path) -> None:
    """Soft labels label what is trained on: four images per stored 2x2 mosaic."""
    path = save(tmp_path / "set.pt", {"images": IMAGES, "labels": LABELS, "meta": {"aug": True,
                                      "soft_labels": "logits"}, "soft_labels": LOGITS})
    with pytest.raises(DataError, match=r"one row per training image \(N = 16\)"):
        load_set_file(path)


def test_a_plain_pair_has_no_meta_but_its_format(tmp_path: Path) -> None:
    loaded = load_set_file(save(tmp_path / "pair.pt", (IMAGES, LABELS)))
    assert torch.equal(loaded.labels, LABELS) and loaded.meta == {"format": "pair"}


# DC/DSA/DM (VICO-UoE/DatasetCondensation): res_<method>_<dataset>_<model>_<ipc>ipc.pt


def res_file(path: Path) -> Path:
    return save(path, {"data": [[IMAGES, LABELS], [IMAGES + 1, LABELS]], "accs_all_exps": {"ConvNet": [0.5, 0.6]}})


def test_a_reference_results_file_gives_the_chosen_experiment(tmp_path: Path) -> None:
    path = res_file(tmp_path / "res_DM_MNIST_ConvNet_2ipc.pt")
    assert torch.equal(load_set_file(path).images, IMAGES)
    assert torch.equal(load_set_file(path, experiment=1).images, IMAGES + 1)
    with pytest.raises(ConfigError, match="holds 2 experiments; --experiment 2 is not one"):
        load_set_file(path, experiment=2)


# MTT (GeorgeCazenavette/mtt-distillation) and DATM: logged_files/<dataset>/<run>/images_best.pt ...


def mtt_run(folder: Path, labels: torch.Tensor = LABELS, lr: bool = True) -> Path:
    """What MTT's distill.py saves at its best iteration: the images, label_syn and syn_lr.detach().cpu()."""
    save(folder / "images_best.pt", IMAGES)
    save(folder / "labels_best.pt", labels)
    if lr:
        save(folder / "lr_best.pt", torch.tensor(0.01))
    return folder


def test_an_mtt_run_is_read_from_its_folder_or_any_of_its_files(tmp_path: Path) -> None:
    """Images, hard labels and the learned lr; whether it was whitened is unknown (meta zca None)."""
    run = mtt_run(tmp_path / "logged_files" / "CIFAR10" / "run")
    for path in (run, run / "images_best.pt", run / "labels_best.pt", run / "lr_best.pt"):
        loaded = load_set_file(path)
        assert torch.equal(loaded.images, IMAGES) and torch.equal(loaded.labels, LABELS)
        assert loaded.lr == pytest.approx(0.01) and loaded.soft_labels is None
        assert loaded.meta == {"format": "tensor_files", "zca": None, "method": "mtt"}


def test_an_mtt_set_without_lr_has_none(tmp_path: Path) -> None:
    assert load_set_file(mtt_run(tmp_path / "run", lr=False)).lr is None


def test_datm_soft_labels_are_logits_and_their_argmax_the_hard_labels(tmp_path: Path) -> None:
    """DATM saves learned float [N, C] labels (trained on as softmax of them) under <run>/Normal/."""
    run = tmp_path / "run"
    mtt_run(run / "Normal", labels=LOGITS.clone().requires_grad_(True))
    loaded = load_set_file(run)
    assert torch.equal(loaded.soft_labels, LOGITS) and loaded.labels.tolist() == [0, 0, 1, 1]
    assert loaded.meta["soft_labels"] == "logits" and loaded.meta["method"] == "datm"


def test_an_mtt_file_without_its_partner_is_refused(tmp_path: Path) -> None:
    save(tmp_path / "run" / "images_best.pt", IMAGES)
    with pytest.raises(DataError, match="needs both images_best.pt and labels_best.pt"):
        load_set_file(tmp_path / "run" / "lr_best.pt")


def evaluate_settings(path: Path, *flags: str):
    return evaluate.resolve_settings(evaluate.build_parser().parse_args([str(path), "--dataset", "CIFAR10", *flags]),
                                     load_set_file(path))


def test_a_set_whitened_when_distilled_needs_zca(tmp_path: Path) -> None:
    """meta zca True without --zca is refused; MTT's unknown (None) is left to the user's --zca."""
    path = save(tmp_path / "set.pt", {"images": IMAGES, "labels": LABELS, "meta": {"zca": True}})
    with pytest.raises(ConfigError, match="ZCA-whitened images; add --zca"):
        evaluate_settings(path)
    assert evaluate_settings(path, "--zca").zca
    assert not evaluate_settings(mtt_run(tmp_path / "run") / "images_best.pt").zca


# DC-BENCH (justincui03/dc_benchmark): distilled_results/<method>/<dataset>/IPC<n>/


def test_a_dc_bench_folder_names_method_ipc_and_dataset(tmp_path: Path) -> None:
    """DC/DSA/DM folders hold a res_*.pt; random/Kmeans an images/labels pair; TM MTT's files."""
    root = tmp_path / "distilled_results"
    res_file(root / "DM" / "CIFAR10" / "IPC2" / "res_DM_CIFAR10_ConvNet_2ipc.pt")
    save(root / "random" / "CIFAR10" / "IPC2" / "CIFAR10_IPC2_normalize_images.pt", IMAGES)
    save(root / "random" / "CIFAR10" / "IPC2" / "CIFAR10_IPC2_normalize_labels.pt", LABELS.float())
    mtt_run(root / "TM" / "CIFAR10" / "IPC2")
    for method, source in (("dm", "res"), ("random", "tensor_files"), ("mtt", "tensor_files")):
        folder = root / {"dm": "DM", "random": "random", "mtt": "TM"}[method] / "CIFAR10" / "IPC2"
        loaded = load_set_file(folder)
        assert (loaded.meta["method"], loaded.meta["ipc"], loaded.meta["dataset"]) == (method, 2, "CIFAR10")
        assert loaded.meta["format"] == source and loaded.labels.dtype == torch.int64


def test_dc_bench_tm_sets_split_in_parts_are_concatenated(tmp_path: Path) -> None:
    """TinyImageNet IPC 50 TM: images_best_<k>.pt + labels_best_<k>.pt, k = 0, 1, ... in order."""
    folder = tmp_path / "TM" / "tinyimagenet" / "IPC50"
    for k in range(2):
        save(folder / f"images_best_{k}.pt", IMAGES[2 * k:2 * k + 2])
        save(folder / f"labels_best_{k}.pt", LABELS[2 * k:2 * k + 2])
    loaded = load_set_file(folder)
    assert torch.equal(loaded.images, IMAGES) and torch.equal(loaded.labels, LABELS)
    assert loaded.meta["dataset"] == "TinyImageNet" and loaded.meta["ipc"] == 50


def test_dc_bench_kip_and_ambiguous_folders_are_refused(tmp_path: Path) -> None:
    kip = tmp_path / "KIP" / "CIFAR10" / "IPC1"
    kip.mkdir(parents=True)
    np.savez(kip / "kip_cifar10_ConvNet3_ssize10_zca_nol_noaug_ckpt1000.npz", images=np.zeros((2, 8, 8, 1)))
    with pytest.raises(DataError, match="KIP's .npz sets are not supported"):
        load_set_file(kip)
    both = tmp_path / "DM" / "CIFAR10" / "IPC2"
    res_file(both / "res_DM_CIFAR10_ConvNet_2ipc.pt")
    res_file(both / "res_DM_CIFAR10_ConvNetD4_2ipc.pt")
    with pytest.raises(DataError, match="holds 2 sets .*; pass one of the files"):
        load_set_file(both)


# DD-Ranking (NUS-HPC-AI-Lab/DD-Ranking) input: an images tensor, or a folder of class folders


def test_a_dd_ranking_tensor_gets_ipc_labels_in_class_order(tmp_path: Path, folder_dataset) -> None:
    """Without labels, DD-Ranking's rule: N / num_classes images per class, in class order."""
    images = torch.randn(6, 3, 16, 16)
    loaded = load_set_file(save(tmp_path / "images.pt", images))
    assert loaded.meta["labels"] == "class_blocks"
    fitted = fit_to_dataset(loaded, folder_dataset)
    assert fitted.labels.tolist() == [0, 0, 1, 1, 2, 2] and fitted.meta["ipc"] == 2
    assert torch.equal(fitted.images, images)
    with pytest.raises(DataError, match="5 images do not split into 3 classes .* pass --labels FILE"):
        fit_to_dataset(load_set_file(save(tmp_path / "five.pt", images[:5])), folder_dataset)


def test_a_dd_ranking_tensor_takes_labels_and_soft_labels_files(tmp_path: Path, folder_dataset) -> None:
    images, labels, soft = torch.randn(3, 3, 16, 16), torch.tensor([2, 0, 1]), torch.randn(3, 3)
    loaded = load_set_file(save(tmp_path / "syn.pt", images), labels=save(tmp_path / "hard.pt", labels),
                           soft_labels=save(tmp_path / "soft.pt", soft))
    fitted = fit_to_dataset(loaded, folder_dataset)
    assert torch.equal(fitted.labels, labels) and torch.equal(fitted.soft_labels, soft)
    assert fitted.meta["soft_labels"] == "logits"


def test_labels_files_must_fit_and_are_only_for_tensors_without_labels(tmp_path: Path, folder_dataset) -> None:
    images = save(tmp_path / "syn.pt", torch.randn(3, 3, 16, 16))
    with pytest.raises(DataError, match=r"labels must be an integer tensor \[N\] for 3 images"):
        load_set_file(images, labels=save(tmp_path / "hard.pt", torch.tensor([0, 1])))
    with pytest.raises(ConfigError, match="carries its own labels; drop --labels"):
        load_set_file(save(tmp_path / "pair.pt", (IMAGES, LABELS)), labels=tmp_path / "hard.pt")
    wide = load_set_file(images, soft_labels=save(tmp_path / "soft.pt", torch.randn(3, 5)))
    with pytest.raises(DataError, match="soft labels have 5 classes but ImageFolder has 3"):
        fit_to_dataset(wide, folder_dataset)


def write_set_folder(root: Path, size: int = 16) -> torch.Tensor:
    """Class folders of PNGs as DD-Ranking's image_path expects; returns their pixels in class order."""
    pixels = torch.randint(0, 256, (6, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for index, image in enumerate(pixels):
        folder = root / f"class{index // 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.numpy()).save(folder / f"{index % 2}.png")
    return pixels.permute(0, 3, 1, 2).float() / 255


def test_an_image_folder_is_read_as_pixels_and_normalised_as_the_dataset(tmp_path: Path, folder_dataset,
                                                                         whitened_dataset) -> None:
    """Sorted class folders give the labels; [0,1] pixels become normalised (or whitened) images."""
    pixels = write_set_folder(tmp_path / "syn")
    loaded = load_set_file(tmp_path / "syn")
    assert torch.equal(loaded.images, pixels) and loaded.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert loaded.meta["pixels"] and loaded.meta["class_names"] == ["class0", "class1", "class2"]
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (folder_dataset.mean, folder_dataset.std))
    normalised = fit_to_dataset(loaded, folder_dataset)
    assert torch.allclose(normalised.images, (pixels - mean) / std) and not normalised.meta["pixels"]
    whitened = normalise_pixels(loaded, whitened_dataset)
    assert torch.allclose(whitened.images, whitened_dataset.zca.transform(pixels)) and whitened.meta["zca"]


def test_an_image_folder_of_mixed_sizes_is_refused(tmp_path: Path, folder_dataset) -> None:
    write_set_folder(tmp_path / "syn")
    Image.new("RGB", (8, 8)).save(tmp_path / "syn" / "class0" / "small.png")
    with pytest.raises(DataError, match="images must all be square and of one size"):
        load_set_file(tmp_path / "syn")
    small = LoadedSet(torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), {"pixels": True})
    with pytest.raises(DataError, match="images are 3x8x8 .* but ImageFolder images are 3x16x16"):
        normalise_pixels(small, folder_dataset)


def test_directories_that_hold_no_set_keep_todays_message(tmp_path: Path) -> None:
    (tmp_path / "run" / "sets").mkdir(parents=True)
    with pytest.raises(DataError, match="is a directory; pass one set file, e.g. .*exp0_it000100.pt$"):
        load_set_file(tmp_path / "run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is a directory; pass one set file.*or a directory of another project"):
        load_set_file(tmp_path / "empty")


# Export to DD-Ranking


def test_export_writes_decoded_class_sorted_tensors_that_read_back(tmp_path: Path) -> None:
    """A mosaic set is exported decoded (4 images per mosaic), sorted by class; probabilities become
    log-probabilities (logits); the written folder reads back as the same set."""
    images = torch.randn(4, 1, 8, 8)
    probabilities = torch.rand(16, 2).softmax(dim=1)
    path = save(tmp_path / "set.pt", {"images": images, "labels": LABELS, "soft_labels": probabilities,
                                      "meta": {"aug": True, "soft_labels": "probabilities", "zca": False}})
    written = export_dd_ranking(path, tmp_path / "out")
    assert sorted(written) == ["images", "labels", "soft_labels"]
    decoded, labels = decoded_set(images, LABELS, True)
    order = torch.argsort(labels, stable=True)
    exported = {name: torch.load(file, weights_only=True) for name, file in written.items()}
    assert torch.equal(exported["images"], decoded[order])
    assert exported["labels"].tolist() == [0] * 8 + [1] * 8
    assert torch.allclose(exported["soft_labels"], probabilities[order].log())
    back = load_set_file(tmp_path / "out")
    assert torch.equal(back.images, decoded[order]) and torch.equal(back.labels, exported["labels"])
    assert torch.allclose(back.soft_labels.softmax(dim=1), probabilities[order])


def test_export_keeps_an_mtt_learning_rate(tmp_path: Path) -> None:
    written = export_dd_ranking(mtt_run(tmp_path / "run"), tmp_path / "out")
    assert torch.load(written["lr"], weights_only=True).item() == pytest.approx(0.01)


def test_the_export_command_and_its_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = save(tmp_path / "set.pt", {"images": IMAGES, "labels": LABELS, "meta": {"mean": [0.5], "std": [0.2]}})
    assert set_formats.main(["export", str(path), "--out", str(tmp_path / "out")]) == 0
    assert "4 images, IPC 2" in capsys.readouterr().out
    uneven = save(tmp_path / "uneven.pt", (IMAGES, torch.tensor([0, 0, 0, 1])))
    assert set_formats.main(["export", str(uneven), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "same number of images in every class, got [3, 1]" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


# End to end


def test_evaluate_trains_on_a_dd_ranking_image_folder(image_folder: Path, tmp_path: Path) -> None:
    """Two real PNGs per class copied into class folders evaluate like any set (IPC 2, normalised)."""
    for folder in sorted((image_folder / "train").iterdir()):
        (tmp_path / "syn" / folder.name).mkdir(parents=True)
        for png in sorted(folder.glob("*.png"))[:2]:
            shutil.copy(png, tmp_path / "syn" / folder.name / png.name)
    code = evaluate.main([str(tmp_path / "syn"), "--dataset", "ImageFolder", "--data_path", str(image_folder),
                          "--im_size", "16", "--num_eval", "2", "--epoch_eval_train", "1", "--batch_train", "8",
                          "--device", "cpu", "--save_path", str(tmp_path / "evals"), "--run_name", "ev"])
    results = json.loads((tmp_path / "evals" / "ev" / "results.json").read_text())
    assert code == 0 and results["ipc"] == 2 and results["final"]["ConvNet"]["n"] == 2
