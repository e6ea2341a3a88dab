"""One distillation over several processes (torchrun), or over one: the same code path.

``World`` answers the questions the loop asks ("which classes are mine",
"gather this", "whose turn is it to train this net") and hides the process
group; a plain ``python BACON_*.py`` is the world of size 1, where every
collective is the identity. What is divided, and why it changes no result:

- Image steps: classes come in chunks that are always computed whole (one
  batched pass each, see ``image_steps.py``), and every process holds a
  contiguous run of whole chunks (``ClassLayout``). The chunks depend on the
  classes, the shapes and the memory budget, never on the number of
  processes, so each chunk's pass is the same computation wherever it runs.
  The image optimiser is elementwise and a class's loss reaches only that
  class's images, so a process steps its own classes at their turns and
  nothing else (the other classes' momentum-only moves happen in their own
  processes, in closed form). Real batches and DSA draws come from streams
  keyed by (iteration, pick, class), so no process draws another's samples.
- Pool training: the ``fetch_net_num`` nets trained in an iteration are dealt
  out whole, round-robin, and each trained net (weights, momentum, meter) is
  broadcast from the process that trained it. Splitting every batch over the
  processes instead would keep all of them busy when there are more processes
  than trained nets, but its all-reduced gradients sum in another order at
  every world size; whole nets keep each net's training the very computation
  a single process does, so the pool is the same at any world size.
- Evaluation: the ``num_eval`` x models networks are dealt out; each draws
  from streams keyed by its own name, and the accuracies are gathered.

Every process holds the whole dataset on its device; the first process reads
(or downloads) it before the others. Only the first process writes files.

Two process groups carry the traffic. Tensors (trained nets, synthetic
blocks) go through the run's backend, NCCL on CUDA, bound to this process's
GPU before the group exists. Decisions and small Python values (barriers,
gathered accuracies, the agreement at each iteration's end) go through a
second group on gloo, on the CPU: they never wait on a GPU queue, and its
timeout is long, because a process that finished its evaluation networks
waits there for as long as the others still train theirs (hours at
Tiny-ImageNet IPC 50 or with --eval_mode M), which would outlast the tensor
group's 30 minutes and kill the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

from errors import ConfigError

BACKENDS = ("auto", "gloo", "nccl")
TIMEOUT = datetime.timedelta(minutes=30)  # tensor collectives: a stuck process is reported after this
CONTROL_TIMEOUT = datetime.timedelta(hours=24)  # decisions and gathers, which wait out other processes' work


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    control: Any = field(default=None, compare=False, repr=False)  # the gloo group of decisions and gathers
    traffic: dict[str, int] = field(default_factory=dict, compare=False)  # payload bytes per collective
    calls: dict[str, int] = field(default_factory=dict, compare=False)  # calls per collective

    def _count(self, collective: str, tensors: Sequence[torch.Tensor] = ()) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors)
        self.traffic[collective] = self.traffic.get(collective, 0) + size
        self.calls[collective] = self.calls.get(collective, 0) + 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def block(self, count: int, rank: int | None = None) -> range:
        """The contiguous share of ``range(count)`` of ``rank`` (this process by default);
        shares differ in length by at most one and cover ``range(count)`` once."""
        rank = self.rank if rank is None else rank
        base, extra = divmod(count, self.size)
        start = rank * base + min(rank, extra)
        return range(start, start + base + (rank < extra))

    def deals(self, count: int) -> list[int]:
        """Which of ``count`` items, dealt round-robin, are this process's."""
        return list(range(self.rank, count, self.size))

    def dealer_of(self, item: int) -> int:
        return item % self.size

    def say(self, message: str) -> None:
        """Print on the first process only (the others would repeat it)."""
        if self.is_main:
            print(message, flush=True)

    def gather_blocks(self, block: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Every process's ``block`` of rows (``sizes[rank]`` rows on each), concatenated in rank
        order: the whole tensor."""
        if not self.distributed:
            return block
        padded = block.new_zeros((max(sizes), *block.shape[1:]))
        padded[:len(block)] = block
        pieces = [torch.empty_like(padded) for _ in range(self.size)]
        self._count("all_gather", pieces)
        dist.all_gather(pieces, padded)
        return torch.cat([piece[:rows] for piece, rows in zip(pieces, sizes)])

    def broadcast_(self, tensors: Sequence[torch.Tensor], source: int) -> None:
        """Overwrite ``tensors`` on every process with ``source``'s: one broadcast per dtype, of the
        tensors flattened into one buffer (a net is a few dozen tensors; each broadcast is a launch
        and a rendezvous)."""
        if not self.distributed:
            return
        with torch.no_grad():
            for group in _by_dtype(tensors):
                flat = torch.cat([t.reshape(-1) for t in group])
                self._count("broadcast", [flat])
                dist.broadcast(flat, source)
                for tensor, piece in zip(group, flat.split([t.numel() for t in group])):
                    tensor.copy_(piece.view_as(tensor))

    def gather_objects(self, value: Any) -> list[Any]:
        """Every process's ``value`` (picklable), in rank order (on the control group)."""
        if not self.distributed:
            return [value]
        gathered: list[Any] = [None] * self.size
        self._count("gather_objects")
        dist.all_gather_object(gathered, value, group=self.control)
        return gathered

    def main_value(self, value: Any) -> Any:
        """The first process's ``value``, on every process (on the control group)."""
        if not self.distributed:
            return value
        holder = [value]
        self._count("main_value")
        dist.broadcast_object_list(holder, 0, group=self.control)
        return holder[0]

    def agree(self, anyone: bool, main: bool) -> tuple[bool, bool]:
        """(whether ``anyone`` is true on any process, the first process's ``main``) on every process:
        one all-reduce of two CPU numbers on the control group, so no device queue is waited on."""
        if not self.distributed:
            return anyone, main
        votes = torch.tensor([int(anyone), int(main and self.is_main)])
        self._count("agree", [votes])
        dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=self.control)
        return bool(votes[0]), bool(votes[1])

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """The first process runs the block before the others (downloads, caches), then they do."""
        if self.distributed and not self.is_main:
            dist.barrier(group=self.control)
        yield
        if self.distributed and self.is_main:
            dist.barrier(group=self.control)

    def checksum(self, tensors: Sequence[torch.Tensor]) -> list[float]:
        """Every process's sum of ``tensors`` (a debugging check that replicated state agrees)."""
        local = float(sum(t.detach().double().sum().item() for t in tensors))
        return self.gather_objects(local)


SINGLE = World()


def _by_dtype(tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``tensors`` grouped by dtype, in order of first appearance."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault(tensor.dtype, []).append(tensor)
    return list(groups.values())


@dataclass(frozen=True)
class ClassLayout:
    """Classes in ``chunks`` (consecutive ranges covering every class once) and which process holds
    which: each a contiguous run of whole chunks, ``World.block`` of the chunk list."""

    chunks: tuple[range, ...]
    world: World = SINGLE

    def classes(self, rank: int | None = None) -> range:
        """The classes of ``rank`` (this process by default); empty when it holds no chunk."""
        share = self.world.block(len(self.chunks), rank)
        if not share:
            start = self.chunks[share.start].start if share.start < len(self.chunks) else self.chunks[-1].stop
            return range(start, start)
        return range(self.chunks[share.start].start, self.chunks[share.stop - 1].stop)

    @property
    def mine(self) -> range:
        return self.classes()

    @property
    def my_chunks(self) -> tuple[range, ...]:
        return tuple(self.chunks[i] for i in self.world.block(len(self.chunks)))

    @property
    def num_classes(self) -> int:
        return self.chunks[-1].stop

    def gather(self, block: torch.Tensor, rows_per_class: int) -> torch.Tensor:
        """The whole tensor of every class from each process's ``block`` (``rows_per_class`` rows per
        class of its own), in class order (a collective call)."""
        sizes = [len(self.classes(rank)) * rows_per_class for rank in range(self.world.size)]
        return self.world.gather_blocks(block, sizes)


def even_chunks(count: int, size: int) -> tuple[range, ...]:
    """``range(count)`` in ceil(count / size) consecutive chunks whose lengths differ by at most one."""
    return tuple(World(rank, -(-count // size)).block(count) for rank in range(-(-count // size)))


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def reports_errors() -> bool:
    """Whether this process prints a user error: one per machine (local rank 0), since every process
    of a run raises the same one (same flags, same data, errors raised collectively)."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def process_device(name: str, world: World) -> torch.device:
    """The device of this process: its own GPU (LOCAL_RANK) on CUDA, made the current one."""
    if name == "cuda" and world.distributed:
        if torch.cuda.device_count() < world.local_size:
            raise ConfigError(f"{world.local_size} processes per node but {torch.cuda.device_count()} CUDA "
                              "devices; use --nproc_per_node at most the number of GPUs")
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return torch.device(name)


def threads_per_process(world: World) -> int:
    """This process's share of the CPU cores: several processes each using all cores oversubscribe
    them, and every process then runs several times slower (figures: docs/benchmarks.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // world.local_size)


def resolve_backend(backend: str, device_name: str) -> str:
    """``auto``: NCCL between GPUs, gloo between CPU processes."""
    if backend == "auto":
        return "nccl" if device_name == "cuda" else "gloo"
    return backend


def group_options(backend: str, device: torch.device) -> dict[str, Any]:
    """Keyword arguments of ``init_process_group`` beyond rank and size. NCCL is given this process's
    GPU (``device_id``): without it NCCL guesses the GPU from the global rank at the first collective,
    which is wrong when a node runs fewer processes than it has GPUs or ranks are not mapped by node."""
    options: dict[str, Any] = {"backend": backend, "timeout": TIMEOUT}
    if backend == "nccl":
        options["device_id"] = device
    return options


def torchrun_world() -> World:
    """This process's place as torchrun's environment variables describe it."""
    return World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)),
                 int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])))


def join(device_name: str, backend: str) -> tuple[World, torch.device]:
    """Join the process group torchrun describes (environment variables), or make the world of one;
    returns it with this process's device, which is chosen (and on CUDA made current) first."""
    if not launched_by_torchrun():
        return SINGLE, torch.device(device_name)
    world = torchrun_world()
    device = process_device(device_name, world)
    if not dist.is_initialized():
        store, rank, size = next(dist.rendezvous("env://"))
        # torchrun keeps one store across restarts: without a per-attempt prefix, a restarted
        # process can read the address a killed one published and fail to connect.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(store=dist.PrefixStore(f"attempt{attempt}", store), rank=rank, world_size=size,
                                **group_options(resolve_backend(backend, device_name), device))
    world = dataclasses.replace(world, control=dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT))
    if device_name == "cpu":
        torch.set_num_threads(threads_per_process(world))
    return world, device


def leave(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
