"""The network pool of BACON and IDM.

The pool is the reference's growing list of networks: new random nets are
appended on a schedule (the oldest dropped once full), a few are picked to
update the images, and a few are trained on real batches every iteration,
each with its own optimiser and running training-accuracy meter (which
weights the synthetic cross-entropy), trained on real batches
(sampling.RealSampler) from streams keyed by net. Under torchrun every process holds the same pool: the nets trained in an
iteration are dealt out and broadcast back (distributed.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from data import Dataset
from distributed import SINGLE, World
from fast_paths import FastPaths
from monitor import FiniteWatch
from networks import Network, get_network
from precision import autocast
from rng import make_generator
from sampling import RealSampler

if TYPE_CHECKING:
    from config import Config

INITIAL_POOL_SIZE = 3


@dataclass
class AccuracyMeter:
    """A pool net's training accuracy since the last reset: correct predictions and images seen, both
    device tensors, so that neither training nor sharing a net waits on the device."""

    correct: torch.Tensor
    count: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.count is None:
            self.count = torch.zeros_like(self.correct)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.correct = self.correct + (logits.argmax(dim=1) == labels).sum()
        self.count = self.count + labels.numel()

    def percent(self) -> torch.Tensor:
        """Accuracy in percent, 0 when the meter has seen nothing (as the reference)."""
        return self.correct * 100.0 / self.count.clamp(min=1)

    def reset(self) -> None:
        self.correct = torch.zeros_like(self.correct)
        self.count = torch.zeros_like(self.count)


@dataclass
class PoolNet:
    net: Network
    optimizer: torch.optim.Optimizer
    meter: AccuracyMeter


class NetPool:
    """The reference's list of networks that grows, trains on real data and is sampled."""

    def __init__(self, config: Config, dataset: Dataset, seed_key: tuple[object, ...], device: torch.device,
                 fast: FastPaths = FastPaths(), world: World = SINGLE) -> None:
        self.config = config
        self.dataset = dataset
        self.device = device
        self.fast = fast
        self.world = world
        self.seed_key = seed_key
        self.init_generator = make_generator(config.seed, *seed_key, "pool-init")
        self.pick_generator = make_generator(config.seed, *seed_key, "pool-pick")
        self.nets: list[PoolNet] = []

    def fresh_network(self) -> Network:
        """A randomly initialised network of ``--model`` (train mode)."""
        d = self.dataset
        net = get_network(self.config.model, d.channel, d.num_classes, d.im_size,
                          generator=self.init_generator, device=self.device)
        return self.fast.prepare(net).train()

    def _new_net(self) -> PoolNet:
        net = self.fresh_network()
        if self.config.net_decay:
            optimizer = torch.optim.SGD(net.parameters(), lr=self.config.lr_net, momentum=0.9, weight_decay=0.0005)
        else:
            optimizer = torch.optim.SGD(net.parameters(), lr=self.config.lr_net)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        return PoolNet(net, optimizer, AccuracyMeter(correct))

    def push(self, count: int) -> None:
        """Append ``count`` fresh nets, dropping the oldest once the pool is full."""
        for _ in range(count):
            if len(self.nets) == self.config.net_num:
                self.nets.pop(0)
            self.nets.append(self._new_net())

    def _shuffled(self, candidates: list[int]) -> list[int]:
        order = torch.randperm(len(candidates), generator=self.pick_generator).tolist()
        return [candidates[i] for i in order]

    def pick_for_images(self) -> list[PoolNet]:
        """train_net_num distinct nets; from pool[net_begin:net_end] when that holds > 10."""
        candidates = list(range(len(self.nets)))
        window = candidates[self.config.net_begin:self.config.net_end]
        if len(window) > 10:
            candidates = window
        return [self.nets[i] for i in self._shuffled(candidates)[:self.config.train_net_num]]

    def train_on_real(self, key: tuple[object, ...], watch: FiniteWatch | None = None) -> None:
        """Train fetch_net_num distinct nets for model_train_steps SGD steps each; the nets are dealt
        out to the processes and every trained net is then broadcast from the one that trained it.
        Net ``slot`` draws its batches from a stream keyed by (``key``, slot)."""
        chosen = self._shuffled(list(range(len(self.nets))))[:self.config.fetch_net_num]
        for slot in self.world.deals(len(chosen)):
            generator = make_generator(self.config.seed, *self.seed_key, "pool-batches", *key, slot,
                                       device=self.device)
            self._train(self.nets[chosen[slot]], RealSampler(self.dataset.train, generator), watch)
        for slot, index in enumerate(chosen):
            self._share(self.nets[index], self.world.dealer_of(slot))

    def _train(self, entry: PoolNet, sampler: RealSampler, watch: FiniteWatch | None) -> None:
        entry.net.train()
        for _ in range(self.config.model_train_steps):
            images, labels = sampler.batch(self.config.trained_bs)
            with autocast(self.device, self.fast.precision):
                logits = entry.net(images)
            loss = F.cross_entropy(logits.float(), labels)
            if watch is not None:
                watch.check(-1, "pool_ce", loss)
            entry.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            entry.optimizer.step()
            entry.meter.update(logits.detach(), labels)

    def _share(self, entry: PoolNet, trainer: int) -> None:
        """Make every process's copy of ``entry`` the trainer's: weights, buffers, momentum, meter."""
        if not self.world.distributed:
            return
        tensors = [*entry.net.parameters(), *entry.net.buffers()]
        if self.config.net_decay:  # SGD with momentum: its buffers are state too
            state = entry.optimizer.state
            for param in entry.net.parameters():
                state[param].setdefault("momentum_buffer", torch.zeros_like(param))
                tensors.append(state[param]["momentum_buffer"])
        self.world.broadcast_([*tensors, entry.meter.correct, entry.meter.count], trainer)

    def check_replicas(self, iteration: int) -> None:
        """Stop if the processes' pools differ (``--check_replicas``): they must be identical."""
        tensors = [t for entry in self.nets for t in (*entry.net.parameters(), entry.meter.correct)]
        sums = self.world.checksum(tensors)
        if len(set(sums)) > 1:
            raise RuntimeError(f"the network pools of the processes differ after iteration {iteration} "
                               f"(checksums {sums}); please report this with the command")

    def reset_meters(self) -> None:
        for entry in self.nets:
            entry.meter.reset()

    def state_dict(self) -> dict[str, Any]:
        return {
            "nets": [{"net": e.net.state_dict(), "optimizer": e.optimizer.state_dict(),
                      "correct": e.meter.correct, "count": e.meter.count} for e in self.nets],
            "init_generator": self.init_generator.get_state(), "pick_generator": self.pick_generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rebuild the saved nets; generator states are restored last (building draws from them)."""
        self.nets = []
        for saved in state["nets"]:
            entry = self._new_net()
            entry.net.load_state_dict(saved["net"])
            entry.optimizer.load_state_dict(saved["optimizer"])
            entry.meter.correct = saved["correct"].to(self.device)
            entry.meter.count = torch.as_tensor(saved["count"], device=self.device)  # an int in older checkpoints
            self.nets.append(entry)
        self.init_generator.set_state(state["init_generator"])
        self.pick_generator.set_state(state["pick_generator"])
