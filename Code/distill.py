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

All randomness is drawn from generators derived from ``--seed``; loss terms
and accuracy meters stay on the device and are read only at log points.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Protocol

import torch
import torch.nn.functional as F
from tqdm import tqdm

from augment import DSA, ParamDiffAug, decode_labels, decode_mosaic, encode_mosaic
from config import Config, is_reduced_budget, resolve_eval_batched
from data import Dataset
from evaluation import EvalProtocol, evaluate_set, summarize, test_accuracy
from methods import Method
from errors import NonFiniteError
from networks import Network, get_eval_pool
from outputs import RunDirectory
from pool import INITIAL_POOL_SIZE, NetPool, PoolNet, RealSampler
from precision import autocast, resolve_precision
from rng import make_generator
from runtime import STOP

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


class SyntheticSet:
    """The learnable images (mosaics when ``aug``) and their fixed labels."""

    def __init__(self, images: torch.Tensor, num_classes: int, ipc: int, aug: bool) -> None:
        self.images = images.detach().clone().requires_grad_(True)
        self.ipc = ipc
        self.aug = aug
        self.labels = torch.arange(num_classes, device=images.device).repeat_interleave(ipc)

    def class_batch(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The training images of class c (decoded to 4 ipc when aug), with gradient."""
        span = slice(c * self.ipc, (c + 1) * self.ipc)
        return self._decoded(self.images[span], self.labels[span])

    def training_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole decoded set, detached: what evaluation networks train on."""
        return self._decoded(self.images.detach(), self.labels)

    def _decoded(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (decode_mosaic(images), decode_labels(labels)) if self.aug else (images, labels)


def initial_images(config: Config, dataset: Dataset, generator: torch.Generator) -> torch.Tensor:
    """Random real images per class (four per mosaic with aug), or standard normal noise."""
    if config.init == "noise":
        shape = (dataset.num_classes * config.ipc, dataset.channel, *dataset.im_size)
        return torch.randn(shape, generator=generator, device=generator.device)
    sampler = RealSampler(dataset.train, generator)
    per_class = []
    for c in range(dataset.num_classes):
        if config.aug:
            per_class.append(encode_mosaic(*(sampler.class_batch(c, config.ipc) for _ in range(4))))
        else:
            per_class.append(sampler.class_batch(c, config.ipc))
    return torch.cat(per_class)


def image_optimizer(config: Config, images: torch.Tensor) -> torch.optim.Optimizer:
    """ONE optimiser over the whole set: momentum carries across the per-class steps."""
    if config.optim == "adam":
        return torch.optim.Adam([images], lr=config.lr_img)
    return torch.optim.SGD([images], lr=config.lr_img, momentum=0.5)


@dataclass
class LossLog:
    """Sums of loss terms on the device since the last record; read at log points only."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: int = 0
    iterations: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            detached = value.detach().float()
            self.sums[name] = self.sums[name] + detached if name in self.sums else detached
        self.steps += 1

    def restart_clock(self) -> None:
        self.started = time.perf_counter()

    def exclude(self, seconds: float) -> None:
        """Leave time spent outside image updates and pool training (evaluation) out of s/iteration."""
        self.started += seconds

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self.sums, "steps": self.steps, "iterations": self.iterations}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.sums = {name: total.to(device) for name, total in state["sums"].items()}
        self.steps, self.iterations = state["steps"], state["iterations"]

    def record(self) -> dict[str, float]:
        """Per-step averages and seconds per iteration; resets the log."""
        averages = {name: total.item() / self.steps for name, total in self.sums.items()}
        averages["s_per_iteration"] = (time.perf_counter() - self.started) / max(self.iterations, 1)
        self.sums, self.steps, self.iterations, self.started = {}, 0, 0, time.perf_counter()
        return averages


class FiniteWatch:
    """Remembers, on the device, the first loss, gradient or image that was NaN or inf.

    Checking costs a few tiny kernels per step and no host sync; the flag is
    read only at log, evaluation and checkpoint points, which then stop the run
    before anything non-finite is evaluated or checkpointed.
    """

    TERMS = ("loss", "nll", "tv", "clip", "mean_distance", "syn_ce", "gradient", "image", "pool_ce")

    def __init__(self, device: torch.device, experiment: int) -> None:
        self.first = torch.full((), -1, dtype=torch.long, device=device)
        self.experiment = experiment
        self.iteration = 0

    def check(self, c: int, term: str, value: torch.Tensor) -> None:
        """Record (iteration, class c, term) if ``value`` has a non-finite entry; c = -1: all classes."""
        code = (self.iteration * 100_000 + (c + 1)) * len(self.TERMS) + self.TERMS.index(term)
        bad = ~torch.isfinite(value.detach()).all()
        self.first = torch.where(bad & (self.first < 0), code, self.first)

    def raise_if_bad(self) -> None:
        code = int(self.first)
        if code < 0:
            return
        where, term = divmod(code, len(self.TERMS))
        iteration, c = divmod(where, 100_000)
        scope = "pool training" if self.TERMS[term] == "pool_ce" else (
            "all classes" if c == 0 else f"class {c - 1}")
        raise NonFiniteError(
            f"the {self.TERMS[term]} became NaN or inf at experiment {self.experiment}, iteration {iteration}, "
            f"{scope}; nothing after it was saved (the last checkpoint and sets hold finite values); "
            "lower --lr_img or --lr_net and start again")


@dataclass
class BestOnTest:
    """The set with the best training-model test accuracy seen so far in the run.

    This selection uses the test set, so it is kept for convenience and always
    labelled "best on test"; it is never the run's result.
    """

    mean: float = float("-inf")
    experiment: int = -1
    iteration: int = -1


class Experiment:
    """One distillation from initialisation to the final evaluation."""

    def __init__(self, config: Config, method: Method, dataset: Dataset, run_dir: RunDirectory,
                 index: int, device: torch.device, best: BestOnTest) -> None:
        self.config, self.method, self.dataset, self.run_dir = config, method, dataset, run_dir
        self.index, self.device, self.best = index, device, best
        seed = config.seed
        self.sampler = RealSampler(dataset.train, make_generator(seed, index, "real-batches", device=device))
        init = initial_images(config, dataset, make_generator(seed, index, "init", device=device))
        self.synset = SyntheticSet(init, dataset.num_classes, config.ipc, config.aug)
        self.optimizer = image_optimizer(config, self.synset.images)
        self.precision = resolve_precision(config.precision, device)
        self.pool = NetPool(config, dataset, (index,), device, self.precision)
        param = ParamDiffAug(aug_mode=config.dsa_mode)
        self.dsa = DSA(config.dsa_strategy, make_generator(seed, index, "dsa-choice"),
                       make_generator(seed, index, "dsa-values", device=device), param)
        self.protocol = EvalProtocol(config.epoch_eval_train, config.batch_train, config.lr_net,
                                     config.dsa_strategy, param, self.precision,
                                     resolve_eval_batched(config.eval_batched, device), config.compile)
        self.ipc1_rules = config.ipc1_rules and config.ipc == 1 and not config.aug
        self.log = LossLog()
        self.timer: Callable[[str], ContextManager[None]] = lambda phase: contextlib.nullcontext()
        self.health = FiniteWatch(device, index)
        self.started = False  # initial evaluation done and initial pool built
        self.next_iteration = 0
        self.evaluated_at = -1
        self.init: dict[str, list[float]] | None = None
        self.final: dict[str, list[float]] = {}

    def is_evaluation_point(self, it: int) -> bool:
        return it == self.config.Iteration or (it > 0 and it % self.config.eval_interval == 0)

    def run(self, checkpoints: CheckpointSink = NoCheckpoints()) -> dict[str, Any]:
        """Distil (from the start or from a loaded state) and return {'final': ..., 'init': ...}.

        Between iterations it honours a stop request (SIGINT/SIGTERM) by raising
        ``Interrupted`` with the state at an iteration boundary, ready to save.
        """
        config = self.config
        if not self.started:
            self.init = self.evaluate(0, final=True) if config.eval_init else None
            if self.method.network_pool:
                self.pool.push(INITIAL_POOL_SIZE)
            self.started = True
        iterations = range(self.next_iteration, config.Iteration + 1)
        with tqdm(iterations, initial=self.next_iteration, total=config.Iteration + 1, desc=f"exp {self.index}",
                  unit="it", disable=None) as progress:
            self.log.restart_clock()
            for it in progress:
                self.next_iteration = self.health.iteration = it
                last = it == config.Iteration
                if last and self.log.steps:
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
                    self.update_images_with_fresh_network()
                self.log.iterations += 1
                self.next_iteration = it + 1
                if it % config.log_every == 0:
                    self.health.raise_if_bad()
                    self.write_log(it, progress)
                STOP.check()
                checkpoints.save_if_due(self, it + 1)
        return {"final": self.final, "init": self.init}

    def state_dict(self) -> dict[str, Any]:
        """Everything that determines the rest of this experiment (see checkpoint.py)."""
        return {
            "index": self.index, "started": self.started, "next_iteration": self.next_iteration,
            "evaluated_at": self.evaluated_at, "init": self.init, "final": self.final,
            "images": self.synset.images.detach(), "optimizer": self.optimizer.state_dict(),
            "pool": self.pool.state_dict(), "log": self.log.state_dict(),
            "generators": {name: generator.get_state() for name, generator in self._generators().items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.started, self.next_iteration, self.evaluated_at = state["started"], state["next_iteration"], \
            state["evaluated_at"]
        self.init, self.final = state["init"], state["final"]
        with torch.no_grad():
            self.synset.images.copy_(state["images"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.pool.load_state_dict(state["pool"])
        self.log.load_state_dict(state["log"], self.device)
        for name, generator in self._generators().items():
            generator.set_state(state["generators"][name])

    def _generators(self) -> dict[str, torch.Generator]:
        return {"real_batches": self.sampler.generator, "dsa_choice": self.dsa.choice_generator,
                "dsa_values": self.dsa.value_generator}

    def pool_iteration(self, it: int) -> None:
        """Grow the pool on schedule, update the images under picked nets, train the pool."""
        config = self.config
        if it % config.net_generate_interval == 0:
            self.pool.push(config.net_push_num)
        nets = self.pool.pick_for_images()
        for _ in range(config.outer_loop):
            for entry in nets:
                self.update_images(entry)
            with self.timer("pool_training"):
                self.pool.train_on_real(self.sampler, self.health)

    def update_images_with_fresh_network(self) -> None:
        """DM: one image step on the loss summed over classes, under a new untrained network."""
        net = self.pool.fresh_network().requires_grad_(False)
        reals, syns = [], []
        for c in range(self.dataset.num_classes):
            real = self.sampler.class_batch(c, self.config.batch_real)
            syn, _ = self.synset.class_batch(c)
            real, syn = self.dsa.siamese(real, syn)
            reals.append(real)
            syns.append(syn)
        with autocast(self.device, self.precision):
            with torch.no_grad():
                real_features = embed_per_class(net, reals, self.config.embed_last)
            syn_features = embed_per_class(net, syns, self.config.embed_last)
        matches = [self.method.loss(r, s) for r, s in zip(real_features, syn_features)]
        loss = torch.stack([match.total for match in matches]).sum()
        terms = {name: torch.stack([m.terms[name] for m in matches]).sum() for name in matches[0].terms}
        self.step_images(-1, {"loss": loss, **terms})

    def update_images(self, entry: PoolNet) -> None:
        """One image-optimiser step per class, matching features under ``entry.net``."""
        config, net = self.config, entry.net
        net.eval()
        net.requires_grad_(False)  # only the images need gradients; saves the weight backward
        ce_weight = config.ce_weight * entry.meter.percent() if config.syn_ce else None
        for c in range(self.dataset.num_classes):
            real = self.sampler.class_batch(c, config.batch_real)
            syn, labels = self.synset.class_batch(c)
            real, syn = self.dsa.siamese(real, syn)
            with self.timer("real_forward"), autocast(self.device, self.precision), torch.no_grad():
                real_features = self.real_features(net, real, c)
            with self.timer("synthetic"):
                with autocast(self.device, self.precision):
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

    def step_images(self, c: int, terms: dict[str, torch.Tensor], **logged: torch.Tensor) -> None:
        """One image-optimiser step on ``terms['loss']``, watching every term, the gradient and the images."""
        for name, value in terms.items():
            self.health.check(c, name, value)
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        self.health.check(c, "gradient", self.synset.images.grad)
        self.optimizer.step()
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
            print(f"exp {self.index} it {iteration}: loss {record['loss']:.4f} "
                  f"({record['s_per_iteration']:.2f} s/it{pool})", flush=True)

    def eval_models(self, final: bool) -> list[str]:
        """The whole eval pool at the final iteration, the distilled model before."""
        if final:
            return get_eval_pool(self.config.eval_mode, self.config.model)
        return [self.config.model]

    def evaluate(self, iteration: int, final: bool) -> dict[str, list[float]]:
        """Evaluate the current set, save it with a PNG, and log the accuracies."""
        started = time.perf_counter()
        images, labels = self.synset.training_set()
        accuracies = evaluate_set(images, labels, self.eval_models(final), self.config.num_eval, self.dataset,
                                  self.protocol, self.config.seed, ("eval", self.index, iteration),
                                  description=f"exp {self.index} eval it {iteration}")
        seconds = time.perf_counter() - started
        self.log.exclude(seconds)
        summary = {model: summarize(values) for model, values in accuracies.items()}
        self.run_dir.append_metrics({"event": "eval", "experiment": self.index, "iteration": iteration,
                                     "accuracies": accuracies, "summary": summary, "seconds": seconds})
        for model, stats in summary.items():
            print(f"exp {self.index} it {iteration}: {model} test accuracy "
                  f"{stats['mean']:.2f} ± {stats['std']:.2f} % ({stats['n']} nets, {seconds:.0f} s)", flush=True)
        self.save_set(iteration, summary)
        if self.config.test_pool_nets:
            self.test_pool_nets(iteration)
        return accuracies

    def save_set(self, iteration: int, summary: dict[str, Any]) -> None:
        name = f"exp{self.index}_it{iteration:06d}"
        meta = set_metadata(self.config, self.dataset, experiment=self.index, iteration=iteration, accuracy=summary)
        stored = self.synset.images.detach()
        self.run_dir.save_set(name, stored, self.synset.labels, meta)
        self.run_dir.save_grid(name, self.dataset.denormalize(stored), nrow=self.config.ipc)
        stats = summary.get(self.config.model)
        if stats is not None and iteration > 0 and stats["mean"] > self.best.mean:
            self.best.mean, self.best.experiment, self.best.iteration = stats["mean"], self.index, iteration
            meta["selection"] = "best on test: chosen by test accuracy, not a result"
            self.run_dir.save_set("best_on_test", stored, self.synset.labels, meta)

    def test_pool_nets(self, iteration: int) -> None:
        """Optional diagnostic of the reference: every pool net on the test set."""
        accuracies = [test_accuracy(entry.net, self.dataset.test, precision=self.precision)
                      for entry in self.pool.nets]
        self.run_dir.append_metrics({"event": "pool_test", "experiment": self.index, "iteration": iteration,
                                     "accuracies": accuracies})


def embed_per_class(net: Network, batches: list[torch.Tensor], last: int) -> list[torch.Tensor]:
    """Embeddings of each class's batch: one joint pass when BatchNorm's batch statistics
    must span all classes (as in DM's reference), else one pass per class (less memory)."""
    if any(isinstance(module, torch.nn.modules.batchnorm._BatchNorm) for module in net.modules()):
        return list(net.embed(torch.cat(batches), last).split([len(b) for b in batches]))
    return [net.embed(batch, last) for batch in batches]


def set_metadata(config: Config, dataset: Dataset, **extra: Any) -> dict[str, Any]:
    """What a saved set needs to be loaded, decoded and evaluated on its own."""
    return {
        "dataset": dataset.name, "method": config.method, "model": config.model, "ipc": config.ipc,
        "aug": config.aug, "decoding": "mosaic_2x2" if config.aug else "none",
        "num_classes": dataset.num_classes, "channel": dataset.channel, "im_size": list(dataset.im_size),
        "mean": list(dataset.mean), "std": list(dataset.std), "zca": dataset.zca is not None,
        "class_names": list(dataset.class_names), "seed": config.seed, "iterations": config.Iteration,
        "reduced_budget": is_reduced_budget(config), **extra,
    }
