"""Teachers (teachers.py): trained on the whole training split, cached, resumable, ensembled, loaded."""

import hashlib
import signal
from pathlib import Path
from typing import Iterator

import pytest
import torch

from data.splits import Dataset, make_dataset
from errors import ConfigError, DataError, Interrupted
from networks import get_network
from rng import make_generator
from runtime import STOP
from teachers import (MemberTraining, TeacherRecipe, checkpoint_path, data_key, get_teachers, load_teacher,
                      teacher_path)

CLASSES, SIZE = 3, 8
# Short, so every training takes a fraction of a second: 3 passes of 5 batches. The MLP learns the toy
# data in that time; the narrow ConvNet (which needs more steps) checks that the training state of a
# convolutional network resumes too.
RECIPE = TeacherRecipe(model="MLP", epochs=2, batch=8)
CONV_RECIPE = TeacherRecipe(model="ConvNetW32", epochs=3, batch=8)  # learning-rate drop after epoch 2


def banded_images(per_class: int, seed: int, channel: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 noise with one bright horizontal band per class: separable, and unchanged in kind by
    DSA's horizontal flips, small shifts and rotations."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(CLASSES).repeat_interleave(per_class)
    images = torch.randint(0, 60, (len(labels), channel, SIZE, SIZE), generator=generator)
    rows = torch.arange(SIZE) * CLASSES // SIZE
    bright = (rows.view(1, 1, SIZE, 1) == labels.view(-1, 1, 1, 1)).expand_as(images)
    return (images + 150 * bright).to(torch.uint8), labels


def toy_dataset(channel: int = 3, train_per_class: int = 12) -> Dataset:
    return make_dataset("Toy", [f"c{c}" for c in range(CLASSES)], [0.4] * channel, [0.3] * channel,
                        banded_images(train_per_class, 0, channel), banded_images(20, 1, channel))


class EpochLog:
    """An on_epoch callback that records the epoch indices trained and can act at one of them."""

    def __init__(self, at: int | None = None, action=None) -> None:
        self.epochs: list[int] = []
        self.at, self.action = at, action

    def __call__(self, epoch: int) -> None:
        self.epochs.append(epoch)
        if epoch == self.at:
            self.action()


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from threads, and where the cores are busy with other work OpenMP
    threads wait on each other, which can cost a training step far more than its arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return toy_dataset()


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, dataset: Dataset) -> Path:
    """A cache holding members 0 and 1 of seed 0."""
    directory = tmp_path_factory.mktemp("teachers")
    get_teachers(dataset, RECIPE, 0, 2, directory, "cpu")
    return directory


def test_recipe_key_is_a_stable_hash_of_every_field() -> None:
    """The recipe key is sha256 of the recipe's canonical JSON: fixed across processes and versions
    (cache names must not change silently), and different when any field differs."""
    canonical = (b'{"batch":256,"dsa_strategy":"color_crop_cutout_flip_scale_rotate","epochs":20,"lr":0.01,'
                 b'"model":"ConvNet"}')
    assert TeacherRecipe().key() == hashlib.sha256(canonical).hexdigest()[:12] == "3a087b7c2fb4"
    variants = [TeacherRecipe(model="MLP"), TeacherRecipe(epochs=21), TeacherRecipe(lr=0.02),
                TeacherRecipe(batch=128), TeacherRecipe(dsa_strategy="none")]
    assert len({TeacherRecipe().key(), *(recipe.key() for recipe in variants)}) == 1 + len(variants)


def test_recipe_rejects_settings_that_cannot_train() -> None:
    """Negative epochs, an empty batch or a non-positive learning rate are ConfigErrors."""
    for fields in ({"epochs": -1}, {"batch": 0}, {"lr": 0.0}):
        with pytest.raises(ConfigError):
            TeacherRecipe(**fields)


def test_cache_file_is_named_by_dataset_model_recipe_data_seed_and_member(dataset: Dataset) -> None:
    """teacher_path = <dataset>_<model>_<recipe key>_<data key>_seed<s>_k<k>.pt, and the data key
    changes with whatever changes the training data (here: its length, the normalisation)."""
    path = teacher_path(Path("cache"), dataset, RECIPE, 3, 1)
    assert path == Path("cache") / f"Toy_MLP_{RECIPE.key()}_{data_key(dataset)}_seed3_k1.pt"
    assert checkpoint_path(path).name == path.name.replace(".pt", ".partial.pt")
    other_mean = make_dataset("Toy", dataset.class_names, [0.5] * 3, [0.3] * 3, banded_images(12, 0),
                              banded_images(20, 1))
    keys = {data_key(dataset), data_key(toy_dataset(train_per_class=11)), data_key(other_mean)}
    assert len(keys) == 3


def test_second_call_loads_the_cache_instead_of_training(tmp_path: Path, dataset: Dataset) -> None:
    """A member whose file exists is loaded, not trained; only missing members train; each file holds
    the weights, the test accuracy, the recipe, seed, k and dataset, and no checkpoint is left."""
    first, second, third = EpochLog(), EpochLog(), EpochLog()
    trained = get_teachers(dataset, RECIPE, 0, 2, tmp_path, "cpu", on_epoch=first)
    loaded = get_teachers(dataset, RECIPE, 0, 2, tmp_path, "cpu", on_epoch=second)
    grown = get_teachers(dataset, RECIPE, 0, 3, tmp_path, "cpu", on_epoch=third)
    assert first.epochs == [0, 1, 2] * 2 and second.epochs == [] and third.epochs == [0, 1, 2]
    assert loaded.identity == trained.identity and loaded.member_accuracies == trained.member_accuracies
    assert grown.members == 3 and grown.identity != trained.identity
    payload = torch.load(teacher_path(tmp_path, dataset, RECIPE, 0, 1), weights_only=True)
    assert set(payload) == {"state_dict", "test_accuracy", "recipe", "seed", "k", "dataset"}
    assert (payload["recipe"], payload["seed"], payload["k"], payload["dataset"]) == (RECIPE.record(), 0, 1, "Toy")
    assert payload["test_accuracy"] == trained.member_accuracies[1]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        teacher_path(tmp_path, dataset, RECIPE, 0, k).name for k in range(3))


def _request_stop() -> None:
    STOP.signum = signal.SIGINT


def _crash() -> None:
    raise RuntimeError("killed")


@pytest.mark.parametrize(("recipe", "at", "action", "error"),
                         [(RECIPE, 0, _request_stop, Interrupted), (CONV_RECIPE, 2, _crash, RuntimeError)],
                         ids=["mlp-stop-request-after-epoch-0", "convnet-crash-after-epoch-2"])
def test_resumed_training_is_bit_identical_to_an_uninterrupted_one(tmp_path: Path, dataset: Dataset,
                                                                   recipe: TeacherRecipe, at: int, action,
                                                                   error: type) -> None:
    """A training stopped after an epoch (a stop request: Interrupted, after the checkpoint is
    saved; or a crash) resumes at the next epoch from its checkpoint, weights, momentum and random
    streams, and ends with exactly the weights of a training that never stopped. Epoch 2 is the
    learning-rate drop of a 3-epoch recipe, so the crash case resumes with the re-created optimiser."""
    reference = get_teachers(dataset, recipe, 5, 1, tmp_path / "whole", "cpu")
    stopped = tmp_path / "stopped"
    try:
        with pytest.raises(error):
            get_teachers(dataset, recipe, 5, 1, stopped, "cpu", on_epoch=EpochLog(at, action))
    finally:
        STOP.clear()
    path = teacher_path(stopped, dataset, recipe, 5, 0)
    assert not path.exists()
    assert torch.load(checkpoint_path(path), weights_only=True)["epoch"] == at + 1
    rest = EpochLog()
    resumed = get_teachers(dataset, recipe, 5, 1, stopped, "cpu", on_epoch=rest)
    assert rest.epochs == list(range(at + 1, recipe.epochs + 1))
    expected, actual = reference.nets[0].state_dict(), resumed.nets[0].state_dict()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    assert resumed.identity == reference.identity and resumed.test_accuracy == reference.test_accuracy
    assert not checkpoint_path(path).exists()


def test_schedule_is_the_evaluation_protocols(dataset: Dataset) -> None:
    """epochs + 1 passes; after epoch index epochs // 2 + 1 the optimiser is re-created at a tenth of
    the learning rate, losing its momentum (as evaluation.train_on_set does)."""
    training = MemberTraining(dataset, TeacherRecipe(model="MLP", epochs=3, batch=8, lr=0.1), 0, 0)
    rates, momentum = [], []
    while training.epoch < training.passes:
        training.train_epoch(dataset.train)
        rates.append(training.optimizer.param_groups[0]["lr"])
        momentum.append(bool(training.optimizer.state))
    assert rates == pytest.approx([0.1, 0.1, 0.01, 0.01]) and momentum == [True, True, False, True]


def test_ensemble_averages_the_members_float32_logits(cache: Path, dataset: Dataset) -> None:
    """An ensemble's logits are the mean of its members' float32 logits, without gradient; its test
    accuracy is the ensemble's own on the test split; it stays frozen in eval mode."""
    teacher = get_teachers(dataset, RECIPE, 0, 2, cache, "cpu")
    x = dataset.test.fetch(torch.arange(len(dataset.test)))
    members = [net(x) for net in teacher.nets]
    logits = teacher.logits(x)
    torch.testing.assert_close(logits, (members[0] + members[1]) / 2)
    assert logits.dtype == torch.float32 and not logits.requires_grad and teacher.members == 2
    hand_accuracy = 100.0 * (logits.argmax(1) == dataset.test.labels).float().mean().item()
    assert teacher.test_accuracy == pytest.approx(hand_accuracy)
    teacher.train()
    assert not teacher.training and not any(net.training for net in teacher.nets)
    assert not any(param.requires_grad for param in teacher.parameters())


def test_logits_under_autocast_come_back_in_float32(cache: Path, dataset: Dataset) -> None:
    """With a precision the member forwards run under autocast, and the logits are still float32,
    close to the fp32 ones."""
    teacher = get_teachers(dataset, RECIPE, 0, 1, cache, "cpu")
    x = dataset.test.fetch(torch.arange(8))
    low = teacher.logits(x, torch.bfloat16)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, teacher.logits(x), atol=0.1, rtol=0.05)


def test_identity_survives_save_and_load_and_tells_weights_apart(cache: Path, tmp_path: Path,
                                                                  dataset: Dataset) -> None:
    """load_teacher takes comma-separated cache files or plain state_dicts; the same weights give the
    same identity however they were obtained, other weights (another seed, another member order) a
    different one; accuracies are measured again at load."""
    trained = get_teachers(dataset, RECIPE, 0, 2, cache, "cpu")
    paths = [teacher_path(cache, dataset, RECIPE, 0, k) for k in range(2)]
    loaded = load_teacher(",".join(map(str, paths)), dataset, RECIPE.model, "cpu")
    assert loaded.identity == trained.identity and loaded.members == 2
    assert loaded.member_accuracies == trained.member_accuracies and loaded.test_accuracy == trained.test_accuracy
    plain = tmp_path / "plain.pt"
    torch.save(trained.nets[0].state_dict(), plain)
    assert load_teacher([plain], dataset, RECIPE.model, "cpu").identity == \
        load_teacher(paths[0], dataset, RECIPE.model, "cpu").identity
    assert load_teacher(paths[::-1], dataset, RECIPE.model, "cpu").identity != trained.identity
    assert load_teacher(paths[:1], dataset, RECIPE.model, "cpu").identity != trained.identity


def _one_line_data_error(paths, dataset: Dataset, model: str) -> str:
    with pytest.raises(DataError) as caught:
        load_teacher(paths, dataset, model, "cpu")
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_load_teacher_errors_name_the_problem_and_the_fix(cache: Path, tmp_path: Path, dataset: Dataset) -> None:
    """A missing file, a corrupt file, a file without weights, and weights of another architecture or
    dataset are one-line DataErrors naming the file and, for misfits, the model, the key and
    --teacher_model."""
    assert "no such file" in _one_line_data_error(tmp_path / "nowhere.pt", dataset, RECIPE.model)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file at all")
    assert "cannot be read as PyTorch weights" in _one_line_data_error(corrupt, dataset, RECIPE.model)
    empty = tmp_path / "empty.pt"
    torch.save({"accuracy": 1.0}, empty)
    assert "holds no network weights" in _one_line_data_error(empty, dataset, RECIPE.model)
    narrow = tmp_path / "narrow.pt"
    weights = get_network("ConvNetW32", 3, CLASSES, (SIZE, SIZE), generator=make_generator(0, "w")).state_dict()
    torch.save(weights, narrow)
    wider = _one_line_data_error(narrow, dataset, "ConvNet")
    assert "ConvNet for Toy (3x8x8, 3 classes)" in wider and str(narrow) in wider and "--teacher_model" in wider
    assert "features.0.weight is [32, 3, 3, 3] in the file, [128, 3, 3, 3] in the model" in wider
    member = teacher_path(cache, dataset, RECIPE, 0, 0)
    grey = _one_line_data_error(member, toy_dataset(channel=1), RECIPE.model)
    assert "features.1.weight is [128, 192] in the file, [128, 64] in the model" in grey
    assert "the file lacks features.0.weight" in _one_line_data_error(member, dataset, "ConvNetW32")
    extra = tmp_path / "extra.pt"
    torch.save({"state_dict": {**weights, "head.weight": torch.zeros(1)}}, extra)
    assert "the file has head.weight, which the model lacks" in _one_line_data_error(extra, dataset, "ConvNetW32")


def test_a_short_training_beats_chance_on_separable_data(cache: Path, dataset: Dataset) -> None:
    """Three passes on three banded classes (chance: 33 %) already classify nearly all test images,
    for each member and for the ensemble (a training that fits labels to the wrong images, or does not
    step, stays near chance)."""
    teacher = get_teachers(dataset, RECIPE, 0, 2, cache, "cpu")
    assert min(teacher.member_accuracies) >= 90.0 and teacher.test_accuracy >= 90.0


def test_an_ensemble_needs_a_member(tmp_path: Path, dataset: Dataset) -> None:
    """count < 1 is a ConfigError, before anything is trained."""
    with pytest.raises(ConfigError):
        get_teachers(dataset, RECIPE, 0, 0, tmp_path, "cpu")


def test_a_damaged_cache_file_is_a_data_error_saying_delete_it(tmp_path: Path, dataset: Dataset) -> None:
    """A cache file that cannot be read is never silently trained over: a one-line DataError names it
    and says to delete it."""
    path = teacher_path(tmp_path, dataset, RECIPE, 0, 0)
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(DataError, match="delete it to train that teacher again") as caught:
        get_teachers(dataset, RECIPE, 0, 1, tmp_path, "cpu")
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
