"""--class_steps batched (chunks of classes in one pass, momentum caught up in closed form) distils what
--class_steps sequential (the reference's order: one class per pass, the whole set stepped at every turn)
does, for every method and the options that change an image step.

Both paths draw the same real batches and DSA parameters (streams keyed by class) and train the same
pool (on real data only, so bit-identical); they differ only in rounding: convolutions of a chunk
instead of one class sum in another order (features differ by ~1e-7 relative), and a catch-up rounds
once where the reference rounds at every turn (tests/test_image_optimizer.py bounds that).

How far apart whole runs may end depends on the network. With ReLU, a pre-activation within rounding
of zero flips and changes that step's gradient by a finite amount, and the trajectories jump apart: the
reference run against itself with its initial images nudged by one ulp ended up to 0.18 of a class's
update away after two iterations of four passes (ATEN_CPU_CAPABILITY=default, 32 px). These tests
therefore distil with smooth networks (Swish activations; DSA moves pixels by parameters that do not
depend on their values), where the same one-ulp nudge moves every class by 2e-6 of its update and the
two paths end 1e-6 to 2e-6 apart (7e-5 with BatchNorm) under default and scalar kernels; other
kernels round up to a few hundred times more (helpers.UPDATE_TOLERANCE's note), so each class must
end within UPDATE_TOLERANCE of its update. Two iterations hold every kind of catch-up (partial ones in the
first, C - 1 missed turns in the second). Bugs each moved a class by far more than the bound: a
catch-up one step short, one DSA draw for every class of an op group, every class given the first
class's cross-entropy, the IPC-1 rule skipped in chunks, Adam's catch-up with a frozen step count
(figures in docs/cost_model.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import image_steps
from config import Config
from distill import Experiment
from functools import partial

import networks
from helpers import UPDATE_TOLERANCE, tiny_experiment, write_image_folder
from outputs import RunDirectory

CLASSES = 5
ITERATIONS = 2
SMOOTH = "ConvNetASwish"
SMOOTH_BATCHNORM = "ConvNetBNSwish"  # registered for these tests: BatchNorm without ReLU's kinks


@pytest.fixture(autouse=True)
def smooth_batchnorm_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(networks.NETWORKS, SMOOTH_BATCHNORM,
                        partial(networks.ConvNet, net_norm="batchnorm", net_act="swish"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("class-steps")
    return {"even": write_image_folder(root / "even", classes=CLASSES, per_class=10),
            "uneven": write_image_folder(root / "uneven", classes=CLASSES, per_class=[6, 9, 12, 15, 20])}


def distil(folder: Path, tmp_path: Path, class_steps: str, method: str = "bacon",
           **changes: object) -> tuple[Experiment, torch.Tensor, torch.Tensor]:
    """ITERATIONS iterations of one experiment; the experiment, its initial set and its final set."""
    settings = dict(method=method, dataset="ImageFolder", data_path=str(folder), im_size=16, ipc=2, batch_real=6,
                    trained_bs=8, model_train_steps=1, device="cpu", precision="fp32", compile="off", model=SMOOTH,
                    memory_format="contiguous", syn_ce=method != "dm", class_steps=class_steps, class_chunk=2)
    settings.update(changes)
    experiment = tiny_experiment(Config(**settings), RunDirectory.create(tmp_path, class_steps))
    initial = experiment.synset.stored().clone()
    experiment.step.start()
    for it in range(ITERATIONS):
        experiment.step.iteration(it)
    return experiment, initial, experiment.synset.stored()


def class_distances(batched: torch.Tensor, sequential: torch.Tensor, initial: torch.Tensor) -> list[float]:
    """Per class, ||batched - sequential|| / ||sequential - initial|| over its stored images."""
    apart = (batched - sequential).view(CLASSES, -1).double().norm(dim=1)
    moved = (sequential - initial).view(CLASSES, -1).double().norm(dim=1)
    return (apart / moved).tolist()


CASES = {
    "bacon": dict(),
    "bacon-no-aug": dict(aug=False),
    "idm": dict(method="idm"),
    "dm": dict(method="dm", lr_img=1.0),
    "ipc1-rules": dict(ipc=1, aug=False, ipc1_rules=True),
    "two-picked-nets-two-rounds": dict(train_net_num=2, outer_loop=2),
    "adam": dict(optim="adam", lr_img=0.01),
    "batchnorm": dict(model=SMOOTH_BATCHNORM),
    "no-dsa": dict(dsa_strategy="none"),
}


@pytest.mark.parametrize("case", CASES)
def test_batched_class_steps_distil_what_sequential_ones_do(case: str, folders: dict[str, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image_steps, "IPC1_KEEP", 3)  # the rule keeps 3 of the 6 real images
    changes = CASES[case]
    batched, initial, final_batched = distil(folders["even"], tmp_path, "batched", **changes)
    _, same_initial, final_sequential = distil(folders["even"], tmp_path, "sequential", **changes)
    assert torch.equal(initial, same_initial)
    assert len(batched.layout.chunks) == 3  # 2 + 2 + 1 classes: the chunks really batch
    distances = class_distances(final_batched, final_sequential, initial)
    assert max(distances) < UPDATE_TOLERANCE, distances


def test_uneven_classes_take_capped_real_batches_of_their_own_size(folders: dict[str, Path], tmp_path: Path) -> None:
    """Classes of 4 to 16 training images with --batch_real 8: real batches of unequal size in one chunk."""
    _, initial, batched = distil(folders["uneven"], tmp_path, "batched", batch_real=8)
    _, _, sequential = distil(folders["uneven"], tmp_path, "sequential", batch_real=8)
    distances = class_distances(batched, sequential, initial)
    assert max(distances) < UPDATE_TOLERANCE, distances


def test_dm_with_batchnorm_matches_all_classes_in_one_pass_as_the_reference(folders: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    """A fresh net in train mode normalises by the batch: every class in one pass, on both paths, and no
    class ever misses a turn (DM steps all at once), so the two optimisers take identical steps."""
    batched, initial, final_batched = distil(folders["even"], tmp_path, "batched", method="dm", lr_img=1.0,
                                             model="ConvNetBN")
    sequential, _, final_sequential = distil(folders["even"], tmp_path, "sequential", method="dm", lr_img=1.0,
                                             model="ConvNetBN")  # ReLU: the two take the very same steps
    assert batched.layout.chunks == sequential.layout.chunks == (range(CLASSES),)
    assert torch.equal(final_batched, final_sequential)


@pytest.mark.parametrize("class_steps", ["batched", "sequential"])
def test_every_class_steps_once_per_picked_net(folders: dict[str, Path], tmp_path: Path, class_steps: str) -> None:
    """The optimiser's clock counts the reference's turns: one per class per picked net and round."""
    experiment, _, _ = distil(folders["even"], tmp_path, class_steps, train_net_num=2, outer_loop=2)
    assert experiment.synset.optimizer.clock == ITERATIONS * 2 * 2 * CLASSES


def test_auto_chunks_fit_the_activation_budget_and_leave_a_chunk_for_each_of_eight_processes() -> None:
    """ConvNet on 32x32 RGB at IPC 10 with mosaics: 40 images of 559,104 elements saved per class, 4 bytes,
    doubled: 179 MB per class, 12 classes in 2 GiB (below the 13 that 8 chunks of 100 classes allow); 40
    classes in at least 8 chunks: 5 each."""
    dataset = type("Shape", (), {"channel": 3, "im_size": (32, 32), "num_classes": 100})()
    config = Config(ipc=10, aug=True)
    assert image_steps.class_chunk_size(config, dataset) == 12
    dataset.num_classes = 40
    assert image_steps.class_chunk_size(config, dataset) == 5
    tiny = type("Shape", (), {"channel": 3, "im_size": (64, 64), "num_classes": 200})()
    assert image_steps.class_chunk_size(Config(ipc=50, aug=True), tiny) == 1  # one class is the floor
    assert image_steps.class_chunk_size(Config(ipc=50, class_chunk=7), tiny) == 7
