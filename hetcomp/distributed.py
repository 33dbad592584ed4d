"""torch.distributed, the one switch: when a default process group is initialized, hetcomp shards its work
(the Hessian passes' batches, evaluation's repeats, row remap's measurements, LAFT and mac-greedy training
data-parallel) and only rank 0 writes files (saved folders, checkpoints) and prints; otherwise nothing
changes. ``init()`` starts the group from torchrun's environment, so the same script (or ``torchrun
--nproc-per-node N -m hetcomp compile ...``) runs on one process or many; ``shutdown()`` ends it when the script
is done. The helpers below (``on_main``, ``all_agree``, ``all_gather_tree``, ``broadcast_tensors``,
``make_peer_groups``, ``share_rows``, ``barrier``) are no-ops or plain calls in a single process. ``share_rows``
joins rows split over some of the ranks, by an all-gather over their group, which every rank first makes with
``make_peer_groups`` unless it is every rank (evaluation's ranks exchange the parts of a group's programming they
drew); ``all_gather_tree`` gathers structures of tensors through the backend (evaluation's metric parts).
``gather_batch`` lets a loss that compares a batch's samples with each other (an in-batch contrastive loss) see
the global batch while a data-parallel fine-tuning step holds one slice of it per rank.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

from hetcomp.data import move
from hetcomp.errors import ConfigError

T = TypeVar("T")
_SLICED: ContextVar[bool] = ContextVar("hetcomp_sliced_batch", default=False)
_ALIGN = 16  # bytes: where each tensor starts in a flat buffer of all_gather_tree or share_rows (_byte_pieces)


def active() -> bool:
    """Whether a default process group is initialized."""
    return dist.is_available() and dist.is_initialized()


def group() -> Any:
    """The default process group, or None in a single process."""
    return dist.group.WORLD if active() else None


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes files and prints (rank 0, or the only process)."""
    return rank() == 0


def init(backend: str | None = None) -> bool:
    """Start the default process group from torchrun's environment (WORLD_SIZE, RANK, MASTER_ADDR, ...): NCCL
    when there is a GPU for every local rank (each rank on GPU LOCAL_RANK), else gloo (``default_backend``; with
    fewer GPUs than local ranks, rank LOCAL_RANK's current GPU is LOCAL_RANK modulo their number, so ranks share
    them: results as on one process, times no speedup). Returns whether a group is active; a no-op in a single
    process or when a group is already initialized."""
    if active():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # torchrun sets LOCAL_WORLD_SIZE; without it every rank is taken to be on this host (the same on every rank)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus:
        torch.cuda.set_device(local_rank % gpus)
    dist.init_process_group(backend or default_backend(local_world, gpus))
    return True


def shutdown(finished: bool = True) -> None:
    """Tear down the default process group (a no-op without one): when every rank ``finished`` its work, after a
    barrier, so that no rank closes its connections while a peer still uses them (gloo then aborts the process at
    exit: "terminate called without an active exception"); after an error, at once (a peer may never arrive)."""
    if not active():
        return
    if finished and world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


def default_backend(local_world: int, gpus: int) -> str:
    """NCCL when the host has a GPU for each of its ``local_world`` ranks, else gloo: decided from what every rank
    of the host sees alike (NCCL refuses two ranks on one GPU, and ranks on different backends would hang)."""
    return "nccl" if gpus >= local_world >= 1 else "gloo"


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if active() and world_size() > 1:
        dist.barrier()


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank; an error ``fn`` raises on rank 0 is raised
    on every rank (so no rank waits forever in a collective its peers never reach). For work whose result
    every rank needs but only one should do: file writes, a search that must not differ between ranks."""
    if not active() or world_size() == 1:
        return fn()
    payload: list[Any] = [None]
    if is_main():
        try:
            payload[0] = ("ok", fn())
        except Exception as error:  # noqa: BLE001 - handed to every rank, raised there and here
            payload[0] = ("error", _portable(error))
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        raise value
    return value


def all_agree(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order, on every rank: for checks that must fail on every rank
    alike when the ranks disagree (every rank then takes the same branch)."""
    if not active() or world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def all_gather_tree(value: Any) -> list[Any]:
    """Every rank's ``value`` in rank order, on every rank, like ``all_agree``, for structures that hold many or
    large tensors (e.g. a metric's per-chunk embeddings): the dense tensors travel as one flat buffer per rank
    through the backend (NVLink for NCCL), only the structure around them is pickled. A received tensor is where
    the sender's was: on the CPU, or on this rank's GPU for a CUDA tensor. Leaves torch's pytree does not open (a
    sparse tensor, a container it does not know) are pickled with their tensors moved to the CPU (a mapping becomes
    a dict). An error preparing the send on any rank is raised on every rank."""
    if not active() or world_size() == 1:
        return [value]
    device = _backend_device()
    tensors: list[torch.Tensor] = []

    def slot(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor) and leaf.layout == torch.strided and type(leaf) is torch.Tensor:
            tensors.append(leaf.detach())
            return _TensorSlot(len(tensors) - 1)
        return move(leaf, torch.device("cpu"))  # pickled: unpickling must not look for the sender's GPU

    pieces: list[torch.Tensor] = []
    try:
        skeleton = pytree.tree_map(slot, value)
        pieces = _byte_pieces(tensors, device)
        layout = [(tuple(tensor.shape), tensor.dtype, tensor.device.type) for tensor in tensors]
        described: tuple[str, Any, Any, int] = ("ok", skeleton, layout, sum(piece.numel() for piece in pieces))
    except Exception as error:  # noqa: BLE001 - handed to every rank and raised there and here
        described, pieces = ("error", _portable(error), [], 0), []
    everyone = all_agree(described)
    for status, payload, _, _ in everyone:
        if status == "error":
            raise payload
    longest = max(size for _, _, _, size in everyone)
    buffers: list[torch.Tensor | None] = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in everyone]
    if longest:  # else every tensor is empty (or there is none): nothing to send, the slots are still filled below
        send = _joined_bytes(pieces, longest, device)
        dist.all_gather(buffers, send)
        del send
    here = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    gathered = []
    for index, (_, skeleton, layout, _) in enumerate(everyone):
        # copies, on the sender's kind of device: views of one buffer in several dtypes would not save
        views = _byte_views(buffers[index], [(shape, dtype) for shape, dtype, _ in layout])
        leaves = [view.to(torch.device("cpu") if kind == "cpu" else here, copy=True)
                  for view, (_, _, kind) in zip(views, layout, strict=True)]
        buffers[index] = None  # freed as soon as its tensors are copied out
        gathered.append(pytree.tree_map(lambda leaf, held=leaves: held[leaf.index] if isinstance(leaf, _TensorSlot)
                                        else leaf, skeleton))
    return gathered


class _TensorSlot:
    """Where a tensor sat in a structure ``all_gather_tree`` sends (picklable, no data)."""

    def __init__(self, index: int) -> None:
        self.index = index


def broadcast_tensors(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite each tensor with rank 0's values, in place (every rank passes the same tensors in the same
    order). A tensor on another device than the backend's (NCCL: this rank's GPU; gloo: the CPU) goes through
    a copy there: a state dict mixes them (aihwkit hands its tile weights out on the CPU)."""
    if not active() or world_size() == 1:
        return
    device = _backend_device()
    for tensor in tensors:
        data = tensor.detach()
        if data.device.type == device.type:
            dist.broadcast(data, src=0)
            continue
        staged = data.to(device)
        dist.broadcast(staged, src=0)
        data.copy_(staged)


def share_rows(tensors: list[torch.Tensor], counts: list[int], peers: list[int]) -> list[torch.Tensor]:
    """Rows split over the ranks ``peers`` (ascending, this rank among them), joined on each of them: at its place i
    in ``peers`` this rank holds ``counts[i]`` rows of every tensor (same trailing shape and dtype on every peer), and
    each tensor returned holds every peer's rows in peer order. One all-gather over the peers' group (the default
    group when they are every rank, else the group ``make_peer_groups`` made for them), each rank's rows as one flat
    buffer padded to the largest part; ranks outside ``peers`` take no part, so groups of peers exchange at their own
    pace. With one peer it returns ``tensors``."""
    if len(peers) <= 1:
        return tensors
    place = peers.index(rank()) if len(counts) == len(peers) and rank() in peers else None
    if place is None or any(len(tensor) != counts[place] for tensor in tensors):
        raise ConfigError(f"share_rows on rank {rank()}: peers {list(peers)} must include this rank, with one count "
                         f"each ({list(counts)}), and this rank's tensors must hold its count of rows "
                         f"({[len(tensor) for tensor in tensors]})")
    device = _backend_device()
    group = _peer_group(peers)
    trailing = [(tuple(tensor.shape[1:]), tensor.dtype) for tensor in tensors]
    layouts = [[((count, *shape), dtype) for shape, dtype in trailing] for count in counts]
    widest = max(_byte_size(layout) for layout in layouts)
    send = _joined_bytes(_byte_pieces(tensors, device), widest, device)
    received = torch.empty(len(peers) * widest, dtype=torch.uint8, device=device)
    if widest:
        dist.all_gather(list(received.chunk(len(peers))), send, group=group)
    del send
    parts = [_byte_views(received[place * widest : (place + 1) * widest], layout)
             for place, layout in enumerate(layouts)]
    return [torch.cat([views[index] for views in parts]).to(tensor.device) for index, tensor in enumerate(tensors)]


# Process groups of some of the ranks (share_rows), by their ranks, for the default group they were made under.
_PEER_GROUPS: dict[str, Any] = {"world": None, "groups": {}}


def make_peer_groups(peer_sets: Iterable[list[int]]) -> None:
    """Make the process groups that ``share_rows`` will exchange over, for each set of ranks (ascending) of
    ``peer_sets`` not made yet under this default group (every rank: the default group when it is every rank). Every
    rank calls it with the same sets in the same order: torch makes a group with every rank of the default group
    (a group made by its members alone, ``use_local_synchronization``, hung in gloo's rendezvous when a rank made
    two overlapping groups in turn). Pairwise sends instead would open an NCCL communicator per pair of ranks: at 64
    ranks sharing one group of repeats, 2,016 of them."""
    if not active() or world_size() == 1:
        return
    if _PEER_GROUPS["world"] is not dist.group.WORLD:  # a new default group: the old groups went with the old one
        _PEER_GROUPS["world"], _PEER_GROUPS["groups"] = dist.group.WORLD, {}
    groups = _PEER_GROUPS["groups"]
    wanted = [tuple(peers) for peers in peer_sets]
    for key in wanted:  # all checked before any group is made
        if list(key) != sorted(set(key)) or not all(0 <= peer < world_size() for peer in key):
            raise ConfigError(f"a set of peer ranks must be ranks of the group, ascending without repeats, got "
                             f"{list(key)}")
    for key in wanted:
        if len(key) < world_size() and key not in groups:
            groups[key] = dist.new_group(list(key))


def _peer_group(peers: list[int]) -> Any:
    """The process group ``make_peer_groups`` made for ``peers`` (None: the default group, when they are every
    rank)."""
    if len(peers) == world_size():
        return None
    made = _PEER_GROUPS["groups"].get(tuple(peers)) if _PEER_GROUPS["world"] is dist.group.WORLD else None
    if made is None:
        raise ConfigError(f"no process group for ranks {list(peers)}: every rank calls make_peer_groups with the "
                           "sets of ranks that will share rows before share_rows")
    return made


def _byte_pieces(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """``tensors`` as flat byte pieces on ``device``, each tensor's bytes followed by zeros up to a multiple of
    ``_ALIGN``, so that each starts aligned for its dtype's view when the pieces are joined (``_byte_views``)."""
    pieces = []
    for tensor in tensors:
        data = tensor.detach().resolve_conj().resolve_neg().to(device).contiguous().reshape(-1).view(torch.uint8)
        pieces += [data, data.new_zeros(-data.numel() % _ALIGN)]
    return pieces


def _joined_bytes(pieces: list[torch.Tensor], size: int, device: torch.device) -> torch.Tensor:
    """``pieces`` joined into one buffer of ``size`` bytes (zeros after them: every rank sends the same size); the
    list is emptied, so the pieces are freed as soon as they are copied."""
    own = sum(piece.numel() for piece in pieces)
    joined = torch.cat([*pieces, torch.zeros(size - own, dtype=torch.uint8, device=device)])
    pieces.clear()
    return joined


def _byte_size(layout: list[tuple[tuple[int, ...], torch.dtype]]) -> int:
    """The bytes ``_byte_pieces`` takes for tensors of these (shape, dtype)."""
    sizes = [math.prod(shape) * dtype.itemsize for shape, dtype in layout]
    return sum(size + (-size % _ALIGN) for size in sizes)


def _byte_views(buffer: torch.Tensor, layout: list[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
    """The tensors of (shape, dtype) ``layout`` that ``_byte_pieces`` joined into ``buffer``: views of it."""
    views, offset = [], 0
    for shape, dtype in layout:
        size = math.prod(shape) * dtype.itemsize
        views.append(buffer[offset : offset + size].view(dtype).reshape(shape))
        offset += size + (-size % _ALIGN)
    return views


def _backend_device() -> torch.device:
    """Where the default group's backend takes tensors: this rank's GPU for NCCL (also a "cpu:gloo,cuda:nccl"
    group), else the CPU."""
    if "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def sliced_batch(sliced: bool = True) -> Iterator[None]:
    """Inside the block each rank holds its slice of one global batch (a data-parallel fine-tuning step: the
    stage enters it around the forward and the loss), so ``gather_batch`` gathers; outside it, it does not."""
    token = _SLICED.set(sliced and world_size() > 1)
    try:
        yield
    finally:
        _SLICED.reset(token)


def gather_batch(rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the global batch's ``rows``, where this rank's rows start in it). In a data-parallel fine-tuning step
    (``sliced_batch``) every rank's rows [n_r, ...] are gathered in rank order, with autograd: the gradient of the
    gathered rows flows back to the rank that holds them, summed over the ranks' losses, so a loss that scores
    its own rows against the gathered ones (each query against every document of the global batch), weighted as
    the stage weights a slice's mean loss, gives one process's gradient after DDP's average. Slices may differ in
    size (a last batch that does not divide evenly). Elsewhere (one process, the Hessian passes' whole batches,
    evaluation) it returns ``(rows, 0)``. Every rank must call it the same number of times per step."""
    if not _SLICED.get():
        return rows, 0
    sizes = torch.tensor([rows.shape[0]], device=rows.device)
    every = [torch.zeros_like(sizes) for _ in range(world_size())]
    dist.all_gather(every, sizes)
    counts = [int(count) for count in every]
    padded = rows
    if rows.shape[0] < max(counts):  # all_gather takes equal shapes: pad, then cut each rank's rows back out
        padded = torch.cat([rows, rows.new_zeros(max(counts) - rows.shape[0], *rows.shape[1:])])
    parts = _GatherRows.apply(padded)
    gathered = torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)])
    return gathered, sum(counts[: rank()])


class _GatherRows(torch.autograd.Function):
    """Every rank's equally shaped rows, stacked [world, ...]; backward: the gradient of this rank's rows summed
    over every rank's loss (an all-reduce, which gloo has, where a reduce-scatter would do)."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(rows) for _ in range(world_size())]
        dist.all_gather(parts, rows.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[rank()]


def _portable(error: Exception) -> Exception:
    """``error`` if it survives pickling (to reach the other ranks), else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any pickling failure: fall back to the text
        return RuntimeError(f"{type(error).__name__} on rank 0: {error}")
