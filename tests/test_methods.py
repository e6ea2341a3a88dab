"""BACON, IDM and DM share the loop: what each method changes, and only that."""

from pathlib import Path

import pytest
import torch

from config import Config
from distill import Experiment
from methods import METHODS
from outputs import RunDirectory
from pipeline import run
from helpers import tiny_config, tiny_experiment


def config_for(folder: Path, save_path: Path, method: str, **changes: object) -> Config:
    return tiny_config(folder, save_path, **{**dict(method=method, Iteration=3, eval_interval=3, num_exp=1, num_eval=1,
                                                    epoch_eval_train=0, run_name=method,
                                                    syn_ce=METHODS[method].step.trains_networks), **changes})


def experiment_for(folder: Path, tmp_path: Path, method: str, **changes: object) -> Experiment:
    config = config_for(folder, tmp_path, method, **changes)
    return tiny_experiment(config, RunDirectory.create(tmp_path, f"unit_{method}"))


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_end_to_end(method: str, image_folder: Path, tmp_path: Path) -> None:
    """Distil, save the set, evaluate it: the final accuracy is the evaluation network's count of correct
    test images (6 of them: 3 classes x 10 images, 20 % held out) as a percentage."""
    results = run(config_for(image_folder, tmp_path, method))
    assert results["method"] == method
    [accuracy] = results["final"]["ConvNet"]["accuracies"]
    assert results["final"]["ConvNet"]["mean"] == accuracy
    assert round(accuracy * 6 / 100, 6) in range(7)
    assert (tmp_path / method / "sets" / "exp0_it000003.pt").is_file()


def test_dm_takes_one_image_step_per_iteration_and_never_trains_a_network(image_folder: Path, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    experiment = experiment_for(image_folder, tmp_path, "dm")
    steps, networks = [], []
    step = experiment.synset.optimizer.step
    monkeypatch.setattr(experiment.synset.optimizer, "step", lambda *a, **k: steps.append(1) or step(*a, **k))
    fresh = experiment.pool.fresh_network

    def recording_fresh_network() -> torch.nn.Module:
        net = fresh()
        networks.append((net, [p.detach().clone() for p in net.parameters()]))
        return net

    monkeypatch.setattr(experiment.pool, "fresh_network", recording_fresh_network)
    monkeypatch.setattr(experiment.pool, "train_on_real", lambda *a: pytest.fail("DM trained a network"))
    experiment.run()
    assert len(steps) == experiment.config.Iteration
    assert len(networks) == experiment.config.Iteration and len({id(net) for net, _ in networks}) == 3
    for net, before in networks:
        assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert experiment.pool.nets == []


def test_dm_uses_its_published_defaults_unless_flags_override() -> None:
    from cli import resolve_config

    dm = resolve_config(["--method", "dm", "--dataset", "MNIST", "--ipc", "1"], {}).config
    assert (dm.lr_img, dm.batch_real, dm.syn_ce) == (1.0, 256, False)
    overridden = resolve_config(["--method", "dm", "--lr_img", "0.5"], {}).config
    assert overridden.lr_img == 0.5


def first_step_record(experiment: Experiment, monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """Train the pool once (so the CE weight is not 0), then log the first class step's terms."""
    experiment.pool.push(1)
    experiment.pool.train_on_real((0, 0))
    records: list[dict[str, torch.Tensor]] = []
    monkeypatch.setattr(experiment.log, "add", lambda values: records.append(values))
    experiment.step.match_under(experiment.pool.nets[0], (0, 0, 0))
    return records[0]


def test_idm_and_bacon_differ_only_in_the_matching_term(image_folder: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Same seed, same nets: the synthetic CE and its weight are identical, only the matching term
    differs. The CE part is recovered as loss minus matching term, which cancels in fp32: it is exact
    up to a few roundings of the loss itself (8 eps x |loss|)."""
    bacon = first_step_record(experiment_for(image_folder, tmp_path, "bacon", aug=False), monkeypatch)
    idm = first_step_record(experiment_for(image_folder, tmp_path, "idm", aug=False), monkeypatch)
    assert torch.equal(bacon["syn_ce"], idm["syn_ce"]) and torch.equal(bacon["syn_acc"], idm["syn_acc"])
    assert bacon["syn_ce"] > 0
    bacon_match = bacon["nll"] + 0.8 * bacon["tv"] + 0.2 * bacon["clip"]
    ce_part_bacon = bacon["loss"] - bacon_match
    ce_part_idm = idm["loss"] - idm["mean_distance"]
    rounding = 8 * torch.finfo(torch.float32).eps * max(bacon["loss"].abs().item(), idm["loss"].abs().item())
    assert ce_part_bacon.item() == pytest.approx(ce_part_idm.item(), rel=0, abs=rounding)
    assert ce_part_idm > 0
    assert not torch.isclose(bacon["loss"], idm["loss"])
