"""Image steps: how each method's synthetic images learn in one iteration, many classes per pass.

Two kinds, named by each method in ``methods.METHODS``:

- ``PoolMatching`` (BACON, IDM): grow the network pool, pick nets, and under
  each picked net take every class's image step in turn, matching the
  features of a real batch and of the class's synthetic images; then train
  pool nets on real data.
- ``FreshNetworkMatching`` (DM): one image step per iteration for all classes,
  under a fresh untrained network.

Both compute per-class losses in chunks of classes (``class_chunks``): one
batched pass per chunk, under one network. That is the reference computation
reordered, not changed: the picked net is frozen during its class steps, a
class's loss reaches only its own images, and every class's real batch and DSA
draw come from streams keyed by (iteration, round, pick, class); the
optimiser (image_optimizer.py) puts each class at its own turn before its
gradient is taken. ``--class_steps sequential`` runs the reference's order
instead (one class per pass, the whole set stepped at every turn) with the
same loss code, to compare against.

Chunk size (``class_chunk_size``): every chunk's synthetic forward and
backward keeps the activations of all its decoded images, so a chunk holds at
most CHUNK_BUDGET_BYTES of them, counted as 4 bytes per element every layer
outputs for one image (networks.activation_sizes), twice (the backward's
gradients), and at least one class; it holds at most ceil(C / MIN_CHUNKS)
classes, so that the classes spread over about MIN_CHUNKS chunks for processes
to own (exactly MIN_CHUNKS when C is a multiple of it, fewer between: 10
classes make 5 chunks of 2). The real batches
of a chunk are forwarded in pieces of at most CHUNK_BUDGET_BYTES / (8 bytes x
the largest layer output). None of it depends on the number of processes, so
a chunk's pass is the same computation wherever it runs. A network whose
forward mixes the samples of a batch (BatchNorm in train mode: DM's fresh
nets) takes all classes in one pass, as the reference's DM does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch
import torch.nn.functional as F

from augment import DSA, siamese_by_class
from distributed import even_chunks
from image_optimizer import ImageOptimizer
from losses import FeatureMoments
from networks import Network, activation_sizes, has_batch_norm
from pool import INITIAL_POOL_SIZE, PoolNet
from sampling import RealSampler
from synthetic import set_labels
from precision import autocast
from rng import make_generator

if TYPE_CHECKING:
    from config import Config
    from data import Dataset
    from distill import Experiment

CHUNK_BUDGET_BYTES = 2 * 2**30
MIN_CHUNKS = 8
BYTES_PER_ELEMENT = 4
IPC1_KEEP = 2560


def images_per_class(config: Config) -> int:
    """Training images a class's stored images decode to."""
    return 4 * config.ipc if config.aug else config.ipc


def class_chunk_size(config: Config, dataset: Dataset) -> int:
    """Classes per batched pass: ``--class_chunk`` when set, else the module docstring's rule."""
    if config.class_chunk:
        return config.class_chunk
    saved, _ = activation_sizes(config.model, dataset.channel, dataset.im_size)
    per_class = images_per_class(config) * saved * BYTES_PER_ELEMENT * 2
    spread = -(-dataset.num_classes // MIN_CHUNKS)
    return max(1, min(CHUNK_BUDGET_BYTES // per_class, spread))


def real_piece_size(config: Config, dataset: Dataset) -> int:
    """Real images per forward of a chunk's real batches (no gradient: one layer's input and output live)."""
    _, largest = activation_sizes(config.model, dataset.channel, dataset.im_size)
    return max(1, CHUNK_BUDGET_BYTES // (largest * BYTES_PER_ELEMENT * 2))


def rows_of_classes(classes: range, counts: Sequence[int], device: torch.device) -> torch.Tensor:
    """The class of each row of a batch holding ``counts[k]`` rows of class ``classes[k]`` in turn."""
    if len(set(counts)) == 1:
        return set_labels(classes, counts[0], device)
    return torch.cat([torch.full((n,), c, device=device) for c, n in zip(classes, counts)])


@dataclass
class ChunkResult:
    """A chunk's gradient on its stored images and its per-class terms ([K] each, ``loss`` first)."""

    gradient: torch.Tensor
    terms: dict[str, torch.Tensor]


class ImageStep:
    """What both kinds share: the chunks, the per-class loss of a chunk under a network, the step."""

    trains_networks: ClassVar[bool]  # and so has the synthetic cross-entropy, weighted by their accuracy
    extra_terms: ClassVar[tuple[str, ...]] = ()  # per-class terms besides the loss's own, watched and logged

    def __init__(self, experiment: Experiment) -> None:
        self.experiment = experiment
        self.config, self.dataset = experiment.config, experiment.dataset
        self.loss = experiment.method.loss
        # a batch-mixing net must see each class's real batch whole
        self.real_piece = None if self.mixes_classes(self.config) else real_piece_size(self.config, self.dataset)

    @classmethod
    def mixes_classes(cls, config: Config) -> bool:
        """Whether this kind's networks mix the samples of a batch, so all classes need one pass."""
        return False

    @classmethod
    def class_chunks(cls, config: Config, dataset: Dataset) -> tuple[range, ...]:
        """The chunks of classes computed in one pass each (one class each on the sequential path)."""
        if cls.mixes_classes(config):
            return (range(dataset.num_classes),)
        size = 1 if config.class_steps == "sequential" else class_chunk_size(config, dataset)
        return even_chunks(dataset.num_classes, size)

    @classmethod
    def watched_terms(cls, loss_terms: Sequence[str]) -> tuple[str, ...]:
        """The per-class values the NaN watch checks, in the order they are checked."""
        return ("loss", *loss_terms, *cls.extra_terms)

    @property
    def classes_per_step(self) -> int:
        """Classes one optimiser step updates (the loss log averages per step)."""
        return 1

    @property
    def optimizer(self) -> ImageOptimizer:
        return self.experiment.synset.optimizer

    def start(self) -> None:
        """Before the first iteration."""

    def iteration(self, it: int) -> None:
        raise NotImplementedError

    def record(self) -> dict[str, Any]:
        """Fields this kind adds to a training record."""
        return {}

    def streams(self, key: tuple[object, ...], c: int) -> tuple[RealSampler, DSA]:
        """The real-batch sampler and the DSA of class c's step at ``key``, from streams of their own."""
        e = self.experiment
        seed, index, device = self.config.seed, e.index, e.device
        sampler = RealSampler(self.dataset.train, make_generator(seed, index, "real", *key, c, device=device))
        dsa = DSA(self.config.dsa_strategy, make_generator(seed, index, "dsa-choice", *key, c),
                  make_generator(seed, index, "dsa-values", *key, c, device=device), e.dsa_param)
        return sampler, dsa

    def chunk_result(self, net: Network, classes: range, stored: torch.Tensor, key: tuple[object, ...],
                     ce_weight: torch.Tensor | None = None, lowest_ce: bool = False) -> ChunkResult:
        """Every class's loss and the gradient on the stored images of ``classes`` (consecutive), under
        ``net``: each class's real batch and its synthetic images under that class's Siamese DSA draw.
        ``ce_weight``: add the synthetic cross-entropy with this weight; ``lowest_ce``: the IPC-1 rules."""
        config, e = self.config, self.experiment
        leaf = stored.detach().requires_grad_(True)
        per_class = images_per_class(config)
        reals, draws = [], []
        for c in classes:
            sampler, dsa = self.streams(key, c)
            reals.append(sampler.class_batch(c, config.batch_real))
            draws.append(dsa.siamese_draw(*stored.shape[2:]))
        syns = e.synset.training_images(leaf, len(classes)).split(per_class)
        reals, syns = siamese_by_class(draws, reals, syns)
        with e.timer("real_forward"), autocast(e.device, e.fast.precision), torch.no_grad():
            real = self.real_moments(net, torch.cat(reals), classes, [len(r) for r in reals], lowest_ce)
        with e.timer("synthetic"):
            syn = torch.cat(syns)
            with autocast(e.device, e.fast.precision):
                features = net.embed(syn, config.embed_last)
                logits = (net.classifier(features) if net.embed_is_full(config.embed_last) else net(syn)) \
                    if self.trains_networks else None
            match = self.loss(real, features.float().view(len(classes), per_class, -1).mean(dim=1))
            total, terms = match.total, dict(match.terms)
            if logits is not None:
                ce, terms["syn_acc"] = self.cross_entropy(logits, classes, per_class)
                if ce_weight is not None:
                    if lowest_ce:  # the CIFAR-10 script at IPC 1: only when the (only) image is wrong
                        first = logits.view(len(classes), per_class, -1)[:, 0].argmax(dim=-1)
                        ce = ce * (first != rows_of_classes(classes, [1] * len(classes), logits.device))
                    total = total + ce_weight * ce
                terms["syn_ce"] = ce
            gradient, = torch.autograd.grad(total.sum(), leaf)
        return ChunkResult(gradient, {"loss": total, **terms})

    @staticmethod
    def cross_entropy(logits: torch.Tensor, classes: range, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per class, the mean cross-entropy of its synthetic images and their accuracy."""
        labels = rows_of_classes(classes, [per_class] * len(classes), logits.device)
        ce = F.cross_entropy(logits.float(), labels, reduction="none").view(len(classes), per_class).mean(dim=1)
        hits = (logits.argmax(dim=1) == labels).float().view(len(classes), per_class).mean(dim=1)
        return ce, hits

    def real_moments(self, net: Network, real: torch.Tensor, classes: range, counts: list[int],
                     lowest_ce: bool = False) -> FeatureMoments:
        """Feature moments of each class's real batch (``counts[k]`` rows of class k in turn), forwarded in
        pieces; ``lowest_ce``: of the IPC1_KEEP images of each class with the lowest cross-entropy."""
        last = self.config.embed_last
        pieces = real.split(self.real_piece) if self.real_piece else (real,)
        features = torch.cat([net.embed(piece, last) for piece in pieces])
        if not lowest_ce:
            return FeatureMoments.of(features, counts)
        logits = net.classifier(features) if net.embed_is_full(last) else torch.cat([net(p) for p in pieces])
        ce = F.cross_entropy(logits.float(), rows_of_classes(classes, counts, real.device), reduction="none")
        if len(set(counts)) == 1:
            keep = min(IPC1_KEEP, counts[0])
            kept = ce.view(len(counts), -1).topk(keep, dim=1, largest=False).indices
            per_class = features.view(len(counts), counts[0], -1)
            chosen = per_class.gather(1, kept.unsqueeze(-1).expand(-1, -1, per_class.shape[-1]))
            return FeatureMoments.of(chosen.flatten(0, 1), [keep] * len(counts))
        chosen = [f[c.topk(min(IPC1_KEEP, len(c)), largest=False).indices]
                  for f, c in zip(features.split(counts), ce.split(counts))]
        return FeatureMoments.of(torch.cat(chosen), [len(f) for f in chosen])

    def step_chunk(self, classes: range, result: ChunkResult) -> None:
        """The optimiser step of ``classes`` on their gradient, every value watched and the terms logged."""
        e = self.experiment
        watch = e.health
        for name in self.watched_terms(self.loss.terms):
            watch.check(classes.start, name, result.terms[name])
        watch.check(classes.start, "gradient", result.gradient.view(len(classes), -1))
        with e.timer("synthetic"):
            self.optimizer.step(classes, result.gradient)
        stepped = self.optimizer.images[self.optimizer.rows.of(classes)]
        watch.check(classes.start, "image", stepped.view(len(classes), -1))
        e.log.add(result.terms)


class PoolMatching(ImageStep):
    """BACON and IDM: image steps class by class under picked pool nets, pool nets trained on real data."""

    trains_networks = True
    extra_terms = ("syn_ce",)

    def start(self) -> None:
        self.experiment.pool.push(INITIAL_POOL_SIZE)

    def iteration(self, it: int) -> None:
        """Grow the pool on schedule, update the images under picked nets, train the pool."""
        config, e = self.config, self.experiment
        if it % config.net_generate_interval == 0:
            e.pool.push(config.net_push_num)
        nets = e.pool.pick_for_images()
        for round_ in range(config.outer_loop):
            for pick, entry in enumerate(nets):
                self.match_under(entry, (it, round_, pick))
            with e.timer("pool_training"):
                e.pool.train_on_real((it, round_), e.health)
        if config.check_replicas:
            e.pool.check_replicas(it)

    def match_under(self, entry: PoolNet, key: tuple[int, int, int]) -> None:
        """One image step per class under ``entry.net``: class c's at turn (start + c), this process's
        classes chunk by chunk."""
        config, net = self.config, entry.net
        net.eval()
        net.requires_grad_(False)  # only the images need gradients; saves the weight backward
        ce_weight = config.ce_weight * entry.meter.percent() if config.syn_ce else None
        lowest_ce = config.ipc1_rules and config.ipc == 1 and not config.aug
        start = self.optimizer.clock
        for chunk in self.experiment.layout.my_chunks:
            stored = self.optimizer.images_at(chunk, [start + c for c in chunk])
            self.step_chunk(chunk, self.chunk_result(net, chunk, stored, key, ce_weight, lowest_ce))
        self.optimizer.advance_to(start + self.dataset.num_classes)
        net.requires_grad_(True)

    def record(self) -> dict[str, Any]:
        return {"pool_size": len(self.experiment.pool.nets)}


class FreshNetworkMatching(ImageStep):
    """DM: one image step per iteration on the loss summed over classes, under a new untrained network."""

    trains_networks = False

    @classmethod
    def mixes_classes(cls, config: Config) -> bool:
        """Fresh nets run in train mode: BatchNorm normalises by the statistics of the whole batch."""
        return has_batch_norm(config.model)

    @property
    def classes_per_step(self) -> int:
        return self.dataset.num_classes

    def iteration(self, it: int) -> None:
        """Every class's loss under one fresh net, chunk by chunk, then the one step of this process's classes."""
        net = self.experiment.pool.fresh_network().requires_grad_(False)
        start = self.optimizer.clock
        results = [self.chunk_result(net, chunk, self.optimizer.images_at(chunk, [start] * len(chunk)), (it,))
                   for chunk in self.experiment.layout.my_chunks]
        if results:
            self.step_chunk(self.experiment.layout.mine, ChunkResult(
                torch.cat([r.gradient for r in results]),
                {name: torch.cat([r.terms[name] for r in results]) for name in results[0].terms}))
        self.optimizer.advance_to(start + 1)
