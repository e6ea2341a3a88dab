"""How processes join and talk: NCCL bound to this process's GPU, decisions on a patient CPU group,
and the few collectives an iteration costs.

The CUDA parts are checked by what ``join`` asks of torch.distributed (recorded
through stand-ins), the waiting by two real gloo processes, and the count of
collectives by an experiment whose process group is a recorder.
"""

import datetime
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed
from distill import NoCheckpoints
from distributed import CONTROL_TIMEOUT, TIMEOUT, World, group_options, join
from outputs import RunDirectory
from helpers import tiny_config, tiny_experiment


def test_nccl_is_given_this_processs_gpu_and_gloo_no_device() -> None:
    gpu = torch.device("cuda", 3)
    assert group_options("nccl", gpu) == {"backend": "nccl", "timeout": TIMEOUT, "device_id": gpu}
    assert group_options("gloo", torch.device("cpu")) == {"backend": "gloo", "timeout": TIMEOUT}


def test_a_gpu_process_makes_its_gpu_current_before_the_process_group_exists(monkeypatch) -> None:
    """Without that NCCL guesses the GPU from the global rank: wrong on the second node of a job, or
    when a node runs fewer processes than it has GPUs."""
    calls: list[tuple] = []
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "6")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "rendezvous", lambda url: iter([(dist.HashStore(), 5, 6)]))
    monkeypatch.setattr(dist, "init_process_group", lambda **options: calls.append(("init", options)))
    monkeypatch.setattr(dist, "new_group", lambda **options: calls.append(("new_group", options)) or "control")
    world, device = join("cuda", "auto")
    assert device == torch.device("cuda", 1) and world.control == "control"
    assert [call[0] for call in calls] == ["set_device", "init", "new_group"] and calls[0] == ("set_device", 1)
    init = calls[1][1]
    assert (init["backend"], init["device_id"], init["rank"], init["world_size"]) == ("nccl", device, 5, 6)
    assert calls[2][1] == {"backend": "gloo", "timeout": CONTROL_TIMEOUT}


def _gather_after_a_long_wait(rank: int, port: int, results: "mp.Queue") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    distributed.TIMEOUT = datetime.timedelta(seconds=1)
    world, _ = join("cpu", "gloo")
    if rank == 1:
        time.sleep(3)  # training evaluation networks the other process has finished
    results.put((rank, world.gather_objects(rank)))
    distributed.leave(world)


def test_gathers_wait_out_work_longer_than_the_tensor_collectives_timeout() -> None:
    """Evaluation networks dealt out unevenly leave a process waiting for hours at the gather of the
    accuracies; that wait must not be cut by the tensor group's timeout (here 1 s against 3 s)."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = 29400 + os.getpid() % 500
    processes = [context.Process(target=_gather_after_a_long_wait, args=(rank, port, results)) for rank in (0, 1)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [process.exitcode for process in processes] == [0, 0]
    assert sorted(results.get(timeout=5) for _ in processes) == [(0, [0, 1]), (1, [0, 1])]


class RecordedCollectives:
    """Stand-ins for torch.distributed's collectives that record (name, group) and act as if every
    other process held the same values."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[str, object]] = []
        for name in ("broadcast", "all_reduce", "all_gather", "all_gather_object", "broadcast_object_list",
                     "barrier"):
            monkeypatch.setattr(dist, name, self.recorder(name))

    def recorder(self, name: str):
        def collective(*args, group=None, **kwargs):
            self.calls.append((name, group))
            if name in ("all_gather", "all_gather_object"):
                out, value = args[0], args[1]
                for i in range(len(out)):
                    out[i] = value.clone() if isinstance(value, torch.Tensor) else value
        return collective

    def since(self, start: int) -> list[tuple[str, object]]:
        return self.calls[start:]


def test_an_iteration_costs_one_agreement_and_one_broadcast_per_dtype_of_each_trained_net(
        monkeypatch, image_folder: Path, tmp_path: Path) -> None:
    recorded = RecordedCollectives(monkeypatch)
    config = tiny_config(image_folder, tmp_path, fetch_net_num=2, precision="fp32")
    experiment = tiny_experiment(config, RunDirectory(tmp_path), World(0, 2, control="control"))
    experiment.step.start()
    for it in range(3):
        start = len(recorded.calls)
        experiment.step.iteration(it)
        experiment.end_iteration(NoCheckpoints(), it + 1)
        calls = recorded.since(start)
        # each trained net: its float32 weights and momentum in one broadcast, its int64 meter in another
        assert calls.count(("broadcast", None)) == 2 * config.fetch_net_num
        assert calls.count(("all_reduce", "control")) == 1  # stop requested? checkpoint due?
        assert len(calls) == 2 * config.fetch_net_num + 1


def test_a_broadcast_restores_every_tensor_from_one_buffer_per_dtype(monkeypatch) -> None:
    sent: list[torch.Tensor] = []

    def broadcast(flat: torch.Tensor, source: int, group=None) -> None:
        sent.append(flat.clone())
        flat.copy_(torch.arange(len(flat), dtype=flat.dtype))  # the source's values

    monkeypatch.setattr(dist, "broadcast", broadcast)
    weight = torch.zeros(3, 4).t()  # not contiguous
    bias, count = torch.zeros(2), torch.zeros((), dtype=torch.long)
    World(1, 2).broadcast_([weight, count, bias], source=0)
    assert [(len(flat), flat.dtype) for flat in sent] == [(14, torch.float32), (1, torch.long)]
    assert torch.equal(weight, torch.arange(12.0).view(4, 3)) and torch.equal(bias, torch.tensor([12.0, 13.0]))
    assert count.item() == 0


@pytest.mark.parametrize("backend, device, expected", [("auto", "cuda", "nccl"), ("auto", "cpu", "gloo"),
                                                        ("gloo", "cuda", "gloo")])
def test_the_backend_follows_the_device_unless_named(backend: str, device: str, expected: str) -> None:
    assert distributed.resolve_backend(backend, device) == expected
