"""The layerwise optimizer's communication: gradients to their owners, weights back to every rank.

Gradients: as backward produces each trained tensor's gradient (a post-accumulate-grad
hook), its items go into a bucket; a full bucket is reduced to the owners (one
`reduce` per owner, asynchronous, so it overlaps the rest of backward) and the
gradient is dropped on every rank at once. Owners accumulate their share in fp32 over
micro-batches (a single micro-batch's gradient is kept as it came). The bucket budget (`reduce_bucket_size`) is split in two halves: one is
reduced while the other fills, so a rank holds its owned share plus one budget's worth of
gradients, never every active gradient. `reduce` is what NCCL and gloo both have;
DeepSpeed's ZeRO-2 reduces to partition owners the same way.

Weights: with replicated weights (stage 0) the owner updates its copy and broadcasts
the item. Under ZeRO-3 a rank holds only its partition of each weight (`ds_tensor`):
the owner of a whole matrix gathers the partitions, updates the matrix, and scatters
it back; the owner of a chunk of an always-trained tensor owns exactly its partition,
so it updates it in place with no traffic. Parameters DeepSpeed keeps whole on every
rank (`ds_persist`, the small norms) have their whole copy updated like replicated ones.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as torch_dist

from owlore_ds.layerwise.plan import Item

REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _owns_storage(t: torch.Tensor) -> bool:
    return t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class GradientReducer:
    """Bucketed reduction of item gradients to their owners, accumulated in fp32 there.

    A bucket holds at most half of `bucket_bytes`: a gradient larger than what is left of it is
    cut into pieces (reduced to the same owner). One half fills while the other is in flight,
    and a bucket's copy for its reduction exists only once the previous one has completed, so
    besides its owned share a rank never holds more than `bucket_bytes` of gradients, whatever
    the size of a matrix.
    """

    def __init__(self, rank: int, world: int, reduce_dtype: torch.dtype, bucket_bytes: int):
        self.rank, self.world = rank, world
        self.reduce_dtype = reduce_dtype
        element = torch.empty((), dtype=reduce_dtype).element_size()
        self.bucket_elements = max(1, bucket_bytes // element // 2)
        self.accumulated: dict[str, torch.Tensor] = {}  # key of an owned item -> fp32 gradient sum
        self._bucket: list[tuple[Item, int, torch.Tensor]] = []  # (item, offset in the item, piece)
        self._bucket_fill = 0
        self._pending: list[tuple[int, list[tuple[Item, int, int]], torch.Tensor, object]] = []
        self._held = {"accumulated": 0, "bucket": 0, "pending": 0}
        self.peak_held_bytes = 0  # high-water mark of gradient bytes this object held
        # Called with the items whose every element has been reduced in this backward, on
        # every rank at the same point of it (bucket layouts are the same everywhere).
        self.on_complete: Optional[Callable[[list[Item]], None]] = None
        self._arrived: dict[str, int] = {}  # item key -> elements reduced in this backward

    def add(self, item: Item, grad: torch.Tensor) -> None:
        """Takes `grad`, the flat gradient of `item` on this rank (a view the caller drops)."""
        if self.world == 1:
            self._accumulate(item, 0, grad)
            self._arrive([(item, 0, grad.numel())])
            return
        offset = 0
        while offset < grad.numel():
            take = min(grad.numel() - offset, self.bucket_elements - self._bucket_fill)
            piece = grad[offset : offset + take].to(self.reduce_dtype)
            if not _owns_storage(piece):  # a view would keep the whole gradient alive
                piece = piece.clone()
            self._bucket.append((item, offset, piece))
            self._bucket_fill += take
            self._held["bucket"] += _bytes(piece)
            self._note_peak()
            offset += take
            if self._bucket_fill >= self.bucket_elements:
                self._launch()

    def finish(self) -> None:
        """At the end of a backward: reduces what is left and waits for every reduction."""
        if self._bucket:
            self._launch()
        self._complete()
        self._arrived = {}

    def take(self, item: Item, device: torch.device) -> torch.Tensor:
        """The owner's summed gradient of `item` (zeros if no micro-batch produced one): fp32,
        or the dtype of the one gradient that came when a single micro-batch made it."""
        grad = self.accumulated.pop(item.key, None)
        if grad is None:
            return torch.zeros(item.numel, dtype=torch.float32, device=device)
        self._held["accumulated"] -= _bytes(grad)
        return grad

    def held_bytes(self) -> int:
        return sum(self._held.values())

    def reset_peak(self) -> None:
        self.peak_held_bytes = self.held_bytes()

    # ------------------------------------------------------------------ internals

    def _note_peak(self) -> None:
        self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes())

    def _launch(self) -> None:
        self._complete()  # one bucket in flight at a time bounds the memory
        by_owner: dict[int, list[tuple[Item, int, torch.Tensor]]] = {}
        for entry in self._bucket:
            by_owner.setdefault(entry[0].owner, []).append(entry)
        for owner in sorted(by_owner):
            entries = by_owner[owner]
            if len(entries) == 1:
                flat = entries[0][2]
            else:  # one message per owner: a copy beside the pieces until the bucket is dropped
                flat = torch.cat([piece for _, _, piece in entries])
                self._held["pending"] += _bytes(flat)
                self._note_peak()
            handle = torch_dist.reduce(flat, dst=owner, op=torch_dist.ReduceOp.SUM, async_op=True)
            layout = [(item, offset, piece.numel()) for item, offset, piece in entries]
            self._pending.append((owner, layout, flat, handle))
        self._bucket, self._bucket_fill = [], 0
        self._held["bucket"] = 0
        self._held["pending"] = sum(_bytes(flat) for _, _, flat, _ in self._pending)
        self._note_peak()

    def _complete(self) -> None:
        for owner, layout, flat, handle in self._pending:
            handle.wait()
            position = 0
            for item, offset, length in layout:
                if owner == self.rank:
                    self._accumulate(item, offset, flat[position : position + length])
                position += length
                # Piece by piece (the same points on every rank): an item this piece completes is
                # updated, and its sum freed, before the next item's sum is made, so beside the
                # bucket in flight a rank holds one item's sum, not two.
                self._arrive([(item, offset, length)])
        self._pending = []
        self._held["pending"] = 0

    def _arrive(self, pieces: list[tuple[Item, int, int]]) -> None:
        complete = []
        for item, _, length in pieces:
            self._arrived[item.key] = self._arrived.get(item.key, 0) + length
            if self._arrived[item.key] == item.numel:
                complete.append(item)
            elif self._arrived[item.key] > item.numel and self.on_complete is not None:
                # A second gradient in one backward (a weight shared across layers): the item
                # was already updated with the first part alone.
                raise RuntimeError(f"{item.name}: a gradient arrived twice in one backward; --update_in_backward "
                                   "needs each trained tensor to be used once per forward")
        if complete and self.on_complete is not None:
            self.on_complete(complete)

    def _accumulate(self, item: Item, offset: int, grad: torch.Tensor) -> None:
        total = self.accumulated.get(item.key)
        if total is None:
            if offset == 0 and grad.numel() == item.numel and _owns_storage(grad):
                # The gradient itself, which nobody else holds, in the dtype it came in: one
                # micro-batch needs no fp32 copy (a bf16 model on one rank keeps bf16 gradients).
                total = grad
            else:
                total = torch.zeros(item.numel, dtype=torch.float32, device=grad.device)
                total[offset : offset + grad.numel()].copy_(grad)
            self.accumulated[item.key] = total
            self._held["accumulated"] += _bytes(total)
            self._note_peak()
            return
        if total.dtype != torch.float32:  # a second micro-batch: the sum is kept in fp32
            widened = total.float()
            self._held["accumulated"] += _bytes(widened) - _bytes(total)
            total = self.accumulated[item.key] = widened
            self._note_peak()
        total[offset : offset + grad.numel()].add_(grad)


# ---------------------------------------------------------------------- weights


def _whole_copy(p: torch.nn.Parameter) -> bool:
    """Under ZeRO-3: whether DeepSpeed holds the whole parameter now (the small ones it keeps
    gathered, `ds_persist`), besides the partition; the same on every rank."""
    return p.data.numel() == p.ds_numel


def _partition(p: torch.nn.Parameter) -> torch.Tensor:
    return p.ds_tensor.view(-1)


def gather_whole(p: torch.nn.Parameter, dst: int, device: torch.device) -> Optional[torch.Tensor]:
    """The whole flat tensor of a ZeRO-3 partitioned parameter on rank `dst` only (None elsewhere):
    one `gather` of the partitions, not DeepSpeed's all-gather to every rank. A collective."""
    part = _partition(p).to(device)
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    pieces = [torch.empty_like(part) for _ in range(world)] if rank == dst else None
    torch_dist.gather(part, pieces, dst=dst)
    return torch.cat(pieces)[: p.ds_numel] if pieces is not None else None


def is_partitioned(p: torch.nn.Parameter) -> bool:
    """Held by ZeRO-3 as partitions only just now (the same answer on every rank)."""
    return hasattr(p, "ds_tensor") and not _whole_copy(p)


def read_weights(item: Item, zero3: bool, rank: int, device: torch.device, gather: bool = True) -> Optional[torch.Tensor]:
    """The item's current weights as a flat tensor on its owner (None elsewhere, and None on the
    owner of a partitioned matrix when `gather` is False: it updates its master copy instead).

    A collective under ZeRO-3 for a whole matrix with `gather` (the partitions are gathered
    to the owner), so every rank calls it for every item, in the same order, with the same `gather`.
    """
    p = item.param
    if not zero3 or _whole_copy(p):
        return p.data.view(-1)[item.lo : item.hi] if item.owner == rank else None
    if not item.whole:  # a chunk is the owner's own partition
        return _partition(p)[: item.numel].to(device) if item.owner == rank else None
    return gather_whole(p, item.owner, device) if gather else None


def write_weights(item: Item, weights: Optional[torch.Tensor], zero3: bool, rank: int, device: torch.device) -> None:
    """Puts the owner's updated `weights` of the item into every rank's copy or partition."""
    p = item.param
    world = torch_dist.get_world_size() if torch_dist.is_initialized() else 1
    if not zero3 or _whole_copy(p):
        target = p.data.view(-1)[item.lo : item.hi]
        if item.owner == rank and weights.data_ptr() != target.data_ptr():
            target.copy_(weights)
        if world > 1:
            torch_dist.broadcast(target, src=item.owner)
        if zero3:  # keep this rank's partition equal to the whole copy
            part = _partition(p)
            start = rank * part.numel()
            lo, hi = max(start, item.lo), min(start + part.numel(), item.hi)
            if hi > lo:
                part[lo - start : hi - start].copy_(p.data.view(-1)[lo:hi])
        return
    part = _partition(p)
    if not item.whole:  # the owner's own partition: no traffic
        if item.owner == rank:
            part[: item.numel].copy_(weights)
        return
    size = part.numel()
    pieces = None
    if item.owner == rank:
        padded = torch.zeros(size * world, dtype=part.dtype, device=device)
        padded[: item.numel].copy_(weights)
        pieces = list(padded.split(size))
    received = torch.empty(size, dtype=part.dtype, device=device)
    torch_dist.scatter(received, pieces, src=item.owner)
    part.copy_(received)
