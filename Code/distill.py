"""The distillation loop, with the reference's semantics (ALGORITHM.md).

One experiment: initialise the synthetic set, then for every iteration

1. evaluate (at positive multiples of eval_interval and at the last iteration),
2. grow the network pool (every net_generate_interval iterations),
3. pick train_net_num pool nets and, for each, take ONE step of the single
   image optimiser per class, matching the features of a real batch and of
   the class's synthetic images under one Siamese augmentation,
4. train fetch_net_num pool nets on real batches.

Methods without a network pool (DM) replace steps 2-4 by one image step that
matches every class under a fresh, untrained random network.

Each image step draws its real batch and its augmentation from streams keyed
by (iteration, round, pick, class), so the process that owns a class
(distributed.py) needs no other draw. Loss terms and accuracy meters stay on
the device and are read only at log points.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Any, Callable, ContextManager, Protocol

import torch
import torch.nn.functional as F
from tqdm import tqdm

from augment import DSA, ParamDiffAug
from config import Config, resolve_fast_paths
from data import Dataset
from distributed import SINGLE, World
from errors import Interrupted
from evaluation import EvalProtocol
from evaluation_points import BestOnTest, EvaluationPoints
from fast_paths import FastPaths
from methods import Method
from monitor import FiniteWatch, LossLog
from networks import Network
from outputs import RunDirectory
from pool import INITIAL_POOL_SIZE, NetPool, PoolNet, RealSampler
from precision import autocast
from rng import make_generator
from runtime import STOP
from synthetic import SyntheticSet, initial_images

IPC1_KEEP = 2560


class CheckpointSink(Protocol):
    """Where an experiment saves its state (checkpoint.Checkpoints)."""

    def save(self, experiment: "Experiment") -> None: ...

    def save_if_due(self, experiment: "Experiment", iterations_done: int) -> None: ...


class NoCheckpoints:
    """A sink that saves nothing: experiments run outside a run directory's lifecycle (benchmarks, tests)."""

    def save(self, experiment: "Experiment") -> None:
        pass

    def save_if_due(self, experiment: "Experiment", iterations_done: int) -> None:
        pass


class Experiment:
    """One distillation from initialisation to the final evaluation, on this process's classes."""

    def __init__(self, config: Config, method: Method, dataset: Dataset, run_dir: RunDirectory,
                 index: int, device: torch.device, best: BestOnTest, world: World = SINGLE,
                 fast: FastPaths | None = None) -> None:
        """``fast``: the run's speed settings, when its caller has resolved them already."""
        self.config, self.method, self.dataset, self.run_dir = config, method, dataset, run_dir
        self.index, self.device, self.world = index, device, world
        self.classes = world.block(dataset.num_classes)
        self.synset = SyntheticSet(initial_images(config, dataset, index, self.classes, device), self.classes,
                                   config.ipc, config.aug, config.optim, config.lr_img)
        self.fast = fast if fast is not None else resolve_fast_paths(config, device)
        self.pool = NetPool(config, dataset, (index,), device, self.fast, world)
        self.dsa_param = ParamDiffAug(aug_mode=config.dsa_mode)
        protocol = EvalProtocol(config.epoch_eval_train, config.batch_train, config.lr_net, config.dsa_strategy,
                                self.dsa_param, self.fast)
        self.points = EvaluationPoints(config, dataset, run_dir, world, protocol, best, index)
        self.ipc1_rules = config.ipc1_rules and config.ipc == 1 and not config.aug
        self.log = LossLog(world)
        self.timer: Callable[[str], ContextManager[None]] = lambda phase: contextlib.nullcontext()
        self.health = FiniteWatch(device, index, world)
        self.started = False  # initial evaluation done and initial pool built
        self.next_iteration = 0
        self.evaluated_at = -1
        self.init: dict[str, list[float]] | None = None
        self.final: dict[str, list[float]] = {}

    def is_evaluation_point(self, it: int) -> bool:
        return it == self.config.Iteration or (it > 0 and it % self.config.eval_interval == 0)

    def run(self, checkpoints: CheckpointSink = NoCheckpoints()) -> dict[str, Any]:
        """Distil (from the start or from a loaded state) and return {'final': ..., 'init': ...}.

        Between iterations it honours a stop request (SIGINT/SIGTERM, on any
        process) by raising ``Interrupted`` with the state at an iteration
        boundary, ready to save.
        """
        config = self.config
        if not self.started:
            self.init = self.evaluate(0, final=True) if config.eval_init else None
            if self.method.network_pool:
                self.pool.push(INITIAL_POOL_SIZE)
            self.started = True
        iterations = range(self.next_iteration, config.Iteration + 1)
        with tqdm(iterations, initial=self.next_iteration, total=config.Iteration + 1, desc=f"exp {self.index}",
                  unit="it", disable=None if self.world.is_main else True) as progress:
            self.log.restart_clock()
            for it in progress:
                self.next_iteration = self.health.iteration = it
                last = it == config.Iteration
                if last and self.log.iterations:
                    self.health.raise_if_bad()
                    self.write_log(it - 1, progress)  # the iterations since the last record
                if self.is_evaluation_point(it) and self.evaluated_at != it:
                    self.health.raise_if_bad()
                    self.final = self.evaluate(it, final=last)
                    self.pool.reset_meters()
                    self.evaluated_at = it
                    checkpoints.save(self)
                if last:
                    break
                if self.method.network_pool:
                    self.pool_iteration(it)
                else:
                    self.update_images_with_fresh_network(it)
                self.log.iterations += 1
                self.next_iteration = it + 1
                if it % config.log_every == 0:
                    self.health.raise_if_bad()
                    self.write_log(it, progress)
                self.stop_if_asked()
                checkpoints.save_if_due(self, it + 1)
        return {"final": self.final, "init": self.init}

    def stop_if_asked(self) -> None:
        """Raise ``Interrupted`` when any process was asked to stop (all stop at the same boundary)."""
        if self.world.any(STOP.signum is not None, self.device):
            raise Interrupted(STOP.signum or signal.SIGTERM)

    def state_dict(self) -> dict[str, Any]:
        """Everything that determines the rest of this experiment (see checkpoint.py); a collective call."""
        return {
            "index": self.index, "started": self.started, "next_iteration": self.next_iteration,
            "evaluated_at": self.evaluated_at, "init": self.init, "final": self.final,
            **self.synset.state_dict(self.world, self.dataset.num_classes),
            "pool": self.pool.state_dict(), "log": self.log.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.started, self.next_iteration, self.evaluated_at = state["started"], state["next_iteration"], \
            state["evaluated_at"]
        self.init, self.final = state["init"], state["final"]
        self.synset.load_state_dict(state)
        self.pool.load_state_dict(state["pool"])
        self.log.load_state_dict(state["log"], self.device)

    def streams(self, *key: object) -> tuple[RealSampler, DSA]:
        """The real-batch sampler and the DSA of one image step, keyed by its place in the run."""
        seed, index, device = self.config.seed, self.index, self.device
        sampler = RealSampler(self.dataset.train, make_generator(seed, index, "real", *key, device=device))
        dsa = DSA(self.config.dsa_strategy, make_generator(seed, index, "dsa-choice", *key),
                  make_generator(seed, index, "dsa-values", *key, device=device), self.dsa_param)
        return sampler, dsa

    def pool_iteration(self, it: int) -> None:
        """Grow the pool on schedule, update the images under picked nets, train the pool."""
        config = self.config
        if it % config.net_generate_interval == 0:
            self.pool.push(config.net_push_num)
        nets = self.pool.pick_for_images()
        for round_ in range(config.outer_loop):
            for pick, entry in enumerate(nets):
                self.update_images(entry, (it, round_, pick))
            with self.timer("pool_training"):
                self.pool.train_on_real((it, round_), self.health)
        if config.check_replicas:
            self.pool.check_replicas(it)

    def update_images_with_fresh_network(self, it: int) -> None:
        """DM: one image step on the loss summed over classes, under a new untrained network."""
        net = self.pool.fresh_network().requires_grad_(False)
        reals, syns = [], []
        for c in self.classes:
            sampler, dsa = self.streams(it, c)
            syn, _ = self.synset.class_batch(c)
            real, syn = dsa.siamese(sampler.class_batch(c, self.config.batch_real), syn)
            reals.append(real)
            syns.append(syn)
        if not reals:  # more processes than classes: this one only follows the momentum
            self.step_images(-1, None)
            return
        with autocast(self.device, self.fast.precision):
            with torch.no_grad():
                real_features = embed_per_class(net, reals, self.config.embed_last)
            syn_features = embed_per_class(net, syns, self.config.embed_last)
        matches = [self.method.loss(r, s) for r, s in zip(real_features, syn_features)]
        loss = torch.stack([match.total for match in matches]).sum()
        terms = {name: torch.stack([m.terms[name] for m in matches]).sum() for name in matches[0].terms}
        self.step_images(-1, {"loss": loss, **terms})

    def update_images(self, entry: PoolNet, key: tuple[int, int, int]) -> None:
        """One image-optimiser step per class, matching features under ``entry.net``; other
        processes' classes are momentum-only steps here."""
        config, net = self.config, entry.net
        net.eval()
        net.requires_grad_(False)  # only the images need gradients; saves the weight backward
        ce_weight = config.ce_weight * entry.meter.percent() if config.syn_ce else None
        for c in range(self.dataset.num_classes):
            if c not in self.classes:
                self.step_images(c, None)
                continue
            sampler, dsa = self.streams(*key, c)
            syn, labels = self.synset.class_batch(c)
            real, syn = dsa.siamese(sampler.class_batch(c, config.batch_real), syn)
            with self.timer("real_forward"), autocast(self.device, self.fast.precision), torch.no_grad():
                real_features = self.real_features(net, real, c)
            with self.timer("synthetic"):
                with autocast(self.device, self.fast.precision):
                    syn_features = net.embed(syn, config.embed_last)
                    logits = net.classifier(syn_features) if net.embed_is_full(config.embed_last) else net(syn)
                match = self.method.loss(real_features, syn_features)
                ce = F.cross_entropy(logits.float(), labels)
                loss = match.total
                if ce_weight is not None:
                    if self.ipc1_rules:
                        ce = ce * (logits.argmax(dim=1)[0] != c)
                    loss = loss + ce_weight * ce
                accuracy = (logits.argmax(dim=1) == labels).float().mean()
                self.step_images(c, {"loss": loss, **match.terms, "syn_ce": ce}, syn_acc=accuracy)
        net.requires_grad_(True)

    def step_images(self, c: int, terms: dict[str, torch.Tensor] | None, **logged: torch.Tensor) -> None:
        """One image-optimiser step on ``terms['loss']``, watching every term, the gradient and the images;
        ``terms`` None is another process's class (a momentum-only step, nothing to watch or log)."""
        for name, value in (terms or {}).items():
            self.health.check(c, name, value)
        gradient = self.synset.compute_gradient(None if terms is None else terms["loss"])
        if terms is not None:
            self.health.check(c, "gradient", gradient)
        self.synset.optimizer.step()
        if terms is not None:
            self.health.check(c, "image", self.synset.images)
            self.log.add({**terms, **logged})

    def real_features(self, net: Network, real: torch.Tensor, c: int) -> torch.Tensor:
        """Embeddings of the real batch; with the IPC-1 rules only its lowest-CE images."""
        features = net.embed(real, self.config.embed_last)
        if not self.ipc1_rules:
            return features
        logits = net.classifier(features) if net.embed_is_full(self.config.embed_last) else net(real)
        targets = torch.full((len(real),), c, device=real.device)
        ce = F.cross_entropy(logits.float(), targets, reduction="none")
        keep = ce.topk(min(IPC1_KEEP, len(real)), largest=False).indices
        return features[keep]

    def write_log(self, iteration: int, progress: tqdm) -> None:
        record = {"event": "train", "experiment": self.index, "iteration": iteration, **self.log.record()}
        pool = f", {len(self.pool.nets)} nets" if self.method.network_pool else ""
        if self.method.network_pool:
            record["pool_size"] = len(self.pool.nets)
        self.run_dir.append_metrics(record)
        progress.set_postfix(loss=f"{record['loss']:.4g}")
        if progress.disable:
            self.world.say(f"exp {self.index} it {iteration}: loss {record['loss']:.4f} "
                           f"({record['s_per_iteration']:.2f} s/it{pool})")

    def evaluate(self, iteration: int, final: bool) -> dict[str, list[float]]:
        """Evaluate the whole current set (gathered from every process), save and log it."""
        accuracies, seconds = self.points.evaluate(self.synset.stored(self.world, self.dataset.num_classes),
                                                   iteration, final)
        self.log.exclude(seconds)
        if self.config.test_pool_nets:
            self.points.test_pool_nets([entry.net for entry in self.pool.nets], iteration, self.fast.precision)
        return accuracies


def embed_per_class(net: Network, batches: list[torch.Tensor], last: int) -> list[torch.Tensor]:
    """Embeddings of each class's batch: one joint pass when BatchNorm's batch statistics
    must span all classes (as in DM's reference), else one pass per class (less memory)."""
    if any(isinstance(module, torch.nn.modules.batchnorm._BatchNorm) for module in net.modules()):
        return list(net.embed(torch.cat(batches), last).split([len(b) for b in batches]))
    return [net.embed(batch, last) for batch in batches]
