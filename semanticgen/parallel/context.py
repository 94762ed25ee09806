"""Window-parallel context parallelism for stage 2: one clip split over a CP group by whole windows.

In blocked token order (:class:`~semanticgen.ops.WindowLayout` with ``order="blocked"``) the timeline is
cut into time blocks at the window edges of both parities, and every window of either parity is a run
of consecutive blocks. A rank of a context-parallel (CP) group owns a contiguous run of blocks:

* **unshifted layers**: rank ``r`` owns whole unshifted windows. Its attention needs no other rank.
* **shifted layers**: every shifted window goes to the rank that owns its *last* block in the unshifted
  ownership. A shifted window straddling a rank boundary is the tail block of rank ``r`` plus the head
  block of rank ``r + 1``, so between the parities rank ``r`` hands its tail block to rank ``r + 1``, and
  takes it back before the next unshifted layer.

What moves is the **hidden state** of that one block (``[B, L_block, C]``) and nothing else: ownership
itself shifts by a block between parities, so every per-token op of a shifted layer (norms, projections,
MLP, cross-attention) runs where its token now lives, and attention is local in both parities: every
window is computed whole by one rank with the unchanged single-GPU backends. A K/V halo with fixed
ownership would instead send K and V of the boundary blocks both ways on every shifted layer (``2 * C``
values per halo token each way, twice this scheme's bytes) and split the boundary windows' softmax across
ranks. :meth:`ContextPlan.bytes_per_layer` gives both, with Ulysses and ring attention for comparison.

Balance: unshifted windows are split into contiguous runs, one per rank, minimising the largest rank's
token count (exact, by dynamic programming over window boundaries); with ``W`` windows and ``C`` ranks a
rank then holds ``floor(W / C)`` or ``ceil(W / C)`` windows when windows are equal, and the shifted
ownership differs from it by one block at each end.

The exchange is :func:`shift_ownership`, an autograd function over ``torch.distributed`` point-to-point
ops (``batch_isend_irecv``): its backward sends the gradients of the moved block back the way it came.
:func:`~semanticgen.parallel.overlap.shift_ownership_overlapped` moves the same bytes but overlaps them with
the layer that follows: the windows of the new parity that need no moved-in block (:meth:`ContextPlan.halo_split`)
run while the block is in flight.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.distributed as dist

from semanticgen._checks import check_bool, check_int
from semanticgen.errors import UsageError
from semanticgen.ops import WindowLayout, WindowShard

__all__ = [
    "ContextPlan",
    "ContextGroup",
    "HaloSplit",
    "CommCounter",
    "shift_ownership",
    "gather_tokens",
    "COMM_COUNTER",
]


def _partition(weights: Sequence[int], parts: int) -> list[int]:
    """Boundaries ``[0, ..., len(weights)]`` of ``parts`` contiguous non-empty runs minimising the largest sum."""
    n = len(weights)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    # best[k][i]: smallest possible max-run-sum of the first i items in k runs; cut[k][i]: start of the last run.
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    bounds = [n]
    for k in range(parts, 0, -1):
        bounds.append(cut[k][bounds[-1]])
    return bounds[::-1]


@dataclasses.dataclass(frozen=True)
class HaloSplit:
    """One rank's tokens of one parity, split by whether their windows need the block that moves in there.

    Ranges are local token coordinates of the rank's ownership in that parity (``0`` is the first token of
    :meth:`ContextPlan.token_range`). ``interior``: the windows made only of tokens the rank held in the other
    parity too, which can run while the moved-in block is in flight; ``boundary``: the window(s) holding a
    moved-in token. Each is one contiguous run of whole windows, or empty (``(0, 0)``, shard ``None``); together
    they are all of the rank's tokens, the boundary at the end the block arrives on.
    """

    interior: tuple[int, int]
    boundary: tuple[int, int]
    interior_shard: WindowShard | None
    boundary_shard: WindowShard | None


@dataclasses.dataclass(frozen=True)
class ContextPlan:
    """Which blocked-order tokens each rank of a CP group owns, per layer parity.

    Build with :meth:`build`. ``unshifted_blocks[r]`` and ``shifted_blocks[r]`` are rank ``r``'s block ranges
    ``[first, end)`` in the layout's :meth:`~semanticgen.ops.WindowLayout.blocks`.

    Example:
        >>> layout = WindowLayout(vae_frames=16, vae_tokens_per_frame=4, sem_frames=2, sem_tokens_per_frame=3,
        ...                       window=4, order="blocked")
        >>> plan = ContextPlan.build(layout, 2)
        >>> plan.unshifted_blocks, plan.shifted_blocks
        (((0, 4), (4, 8)), ((0, 3), (3, 8)))
    """

    layout: WindowLayout
    size: int
    unshifted_blocks: tuple[tuple[int, int], ...]
    shifted_blocks: tuple[tuple[int, int], ...]
    # One WindowShard (and one HaloSplit) per (rank, parity), built once: a shard caches the backends' per-device
    # tables (Triton tile tables, varlen cu_seqlens), so a fresh shard per layer would rebuild and upload them on
    # every layer.
    _shards: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    @classmethod
    def build(cls, layout: WindowLayout, size: int) -> ContextPlan:
        """Split ``layout`` (blocked order) over ``size`` ranks, each holding at least one unshifted window.

        Raises:
            TypeError: ``layout`` is not a blocked-order :class:`WindowLayout`, or ``size`` not an int.
            ValueError: ``size < 1``, or fewer unshifted windows than ranks.
        """
        if not isinstance(layout, WindowLayout) or layout.order != "blocked":
            raise TypeError(f"ContextPlan: layout must be a WindowLayout in blocked order, got {layout!r}")
        check_int("size", size, minimum=1, who="ContextPlan", type_error=TypeError)
        windows = layout.window_blocks(False)
        if len(windows) < size:
            raise UsageError(
                f"context parallelism over {size} ranks needs at least {size} unshifted windows per clip; this clip "
                f"has {len(windows)} ({layout.vae_frames} latent frames, window {layout.window}): use a smaller "
                f"context_parallel, a shorter window or a longer clip"
            )
        offsets = layout.block_token_offsets()
        tokens = [offsets[end] - offsets[first] for first, end in windows]
        cuts = _partition(tokens, size)
        unshifted = tuple((windows[cuts[r]][0], windows[cuts[r + 1] - 1][1]) for r in range(size))
        # A shifted window belongs to the rank owning its last block.
        owner_of_block = {}
        for r, (first, end) in enumerate(unshifted):
            for b in range(first, end):
                owner_of_block[b] = r
        starts = [None] * size
        for first, end in layout.window_blocks(True):
            r = owner_of_block[end - 1]
            if starts[r] is None:
                starts[r] = first
        num_blocks = len(layout.blocks())
        # Every rank's last unshifted block ends some shifted window, so every rank owns a shifted window.
        shifted = tuple((starts[r], starts[r + 1] if r + 1 < size else num_blocks) for r in range(size))
        return cls(layout, size, unshifted, shifted)

    # ----------------------------------------------------------------------------------- queries
    def _check_rank(self, rank: int) -> None:
        check_int("rank", rank, minimum=0, maximum=self.size - 1, who="ContextPlan")

    def blocks(self, rank: int, shifted: bool) -> tuple[int, int]:
        """Rank ``rank``'s block range ``[first, end)`` on layers of parity ``shifted``."""
        self._check_rank(rank)
        return (self.shifted_blocks if shifted else self.unshifted_blocks)[rank]

    def shard(self, rank: int, shifted: bool) -> WindowShard:
        """Rank ``rank``'s tokens on layers of parity ``shifted``, as a :class:`~semanticgen.ops.WindowShard`."""
        first, end = self.blocks(rank, shifted)
        key = (rank, bool(shifted))
        shard = self._shards.get(key)
        if shard is None:
            shard = self._shards.setdefault(key, WindowShard(self.layout, first, end, shifted))
        return shard

    def halo_split(self, rank: int, shifted: bool) -> HaloSplit:
        """Rank ``rank``'s windows of parity ``shifted`` split into interior and boundary (see :class:`HaloSplit`).

        Arriving at parity ``shifted`` a rank receives the blocks it owns there but not in the other parity
        (at its start going to shifted ownership, at its end going back). The windows holding them are the
        boundary; every other window of the rank is interior. Built once per ``(rank, parity)``.

        Example:
            >>> layout = WindowLayout(16, 4, 2, 3, 4, order="blocked")  # 8 blocks of 2 frames
            >>> split = ContextPlan.build(layout, 2).halo_split(1, True)  # rank 1 receives block 3
            >>> split.boundary, split.interior  # the shifted window of blocks 3-4, then blocks 5-7
            ((0, 19), (19, 43))
        """
        key = ("halo_split", rank, bool(shifted))
        split = self._shards.get(key)
        if split is not None:
            return split
        first, end = self.blocks(rank, shifted)
        old_first, old_end = self.blocks(rank, not shifted)
        moved_in = set(range(first, end)) - set(range(old_first, old_end))
        windows = [(f, e) for f, e in self.layout.window_blocks(shifted) if first <= f < end]
        needs_halo = [any(b in moved_in for b in range(f, e)) for f, e in windows]
        interior = [w for w, halo in zip(windows, needs_halo) if not halo]
        boundary = [w for w, halo in zip(windows, needs_halo) if halo]
        offsets = self.layout.block_token_offsets()

        def local(run: list[tuple[int, int]]) -> tuple[tuple[int, int], WindowShard | None]:
            if not run:
                return (0, 0), None
            run_first, run_end = run[0][0], run[-1][1]
            shard = WindowShard(self.layout, run_first, run_end, bool(shifted))
            return (offsets[run_first] - offsets[first], offsets[run_end] - offsets[first]), shard

        (i_range, i_shard), (b_range, b_shard) = local(interior), local(boundary)
        split = HaloSplit(i_range, b_range, i_shard, b_shard)
        return self._shards.setdefault(key, split)

    def token_range(self, rank: int, shifted: bool) -> tuple[int, int]:
        """``(start, end)`` of rank ``rank``'s tokens in the clip's blocked order."""
        first, end = self.blocks(rank, shifted)
        offsets = self.layout.block_token_offsets()
        return offsets[first], offsets[end]

    def handover(self, rank: int) -> tuple[int, int]:
        """Tokens rank ``rank`` hands to ``rank + 1`` going from unshifted to shifted ownership (its tail), and
        takes from ``rank - 1`` (that rank's tail): ``(sent, received)``. The reverse move swaps them."""
        self._check_rank(rank)
        offsets = self.layout.block_token_offsets()
        sent = (
            0
            if rank == self.size - 1
            else offsets[self.unshifted_blocks[rank][1]] - offsets[self.shifted_blocks[rank + 1][0]]
        )
        received = 0 if rank == 0 else offsets[self.unshifted_blocks[rank][0]] - offsets[self.shifted_blocks[rank][0]]
        return sent, received

    def bytes_per_layer(self, hidden: int, batch: int = 1, element_size: int = 2) -> dict[str, float]:
        """Bytes one rank sends per layer, forward, on average over a pair of layers (one of each parity).

        ``halo_hidden``: this scheme (the busiest rank's tail block going to shifted ownership plus its head block
        going back, per pair of layers). ``halo_kv``: a K/V halo with fixed ownership (K and V of the boundary
        blocks, both ways, on shifted layers). ``ulysses``: all-to-all of q, k, v and out (``(C - 1) / C`` of
        each of 4 local tensors). ``ring``: K and V of every other rank's tokens passed around the ring. Backward
        moves the same again in each scheme.
        """
        per_token = hidden * element_size * batch
        # Per pair of layers a rank sends its tail going to shifted ownership and its head going back.
        moved = max(sum(self.handover(r)) for r in range(self.size))
        local = max(e - s for s, e in (self.token_range(r, False) for r in range(self.size)))
        n, c = self.layout.num_tokens, self.size
        return {
            "halo_hidden": moved / 2 * per_token,
            "halo_kv": 2 * moved / 2 * per_token,  # K and V of both boundary blocks, on every other layer
            "ulysses": 4 * local * per_token * (c - 1) / c,
            "ring": 2 * (n - local) * per_token,
        }


# ------------------------------------------------------------------------------------ exchange
class CommCounter:
    """Bytes and messages sent through :func:`shift_ownership` in this process (tests read it)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.bytes_sent = 0
        self.messages = 0

    def add(self, tensor: torch.Tensor) -> None:
        self.bytes_sent += tensor.numel() * tensor.element_size()
        self.messages += 1


COMM_COUNTER = CommCounter()


def peer_rank(group, rank: int) -> int:
    """The global rank of ``rank`` in ``group`` (``None``: the default group), as P2P ops want it."""
    return dist.get_global_rank(group, rank) if group is not None else rank


def post_p2p(sends: Sequence[tuple[torch.Tensor, int]], recvs: Sequence[tuple[torch.Tensor, int]], group) -> list:
    """Start sends and receives (``(tensor, group rank)`` each) in one ``batch_isend_irecv``; returns the works.

    Sends are counted in :data:`COMM_COUNTER` and must be contiguous and stay alive until the works are waited on.
    """
    ops = []
    for tensor, r in sends:
        ops.append(dist.P2POp(dist.isend, tensor, peer_rank(group, r), group))
        COMM_COUNTER.add(tensor)
    ops.extend(dist.P2POp(dist.irecv, tensor, peer_rank(group, r), group) for tensor, r in recvs)
    return dist.batch_isend_irecv(ops) if ops else []


def _exchange(
    like: torch.Tensor,
    send_next: torch.Tensor | None,
    recv_prev_shape,
    send_prev: torch.Tensor | None,
    recv_next_shape,
    rank: int,
    size: int,
    group,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Send to ``rank +- 1`` and receive from them in one batch, and wait; returns ``(from_prev, from_next)``."""
    sends, recvs = [], []
    from_prev = from_next = None
    if send_next is not None and rank + 1 < size:
        sends.append((send_next.contiguous(), rank + 1))
    if send_prev is not None and rank > 0:
        sends.append((send_prev.contiguous(), rank - 1))
    if recv_prev_shape is not None and rank > 0:
        from_prev = torch.empty(recv_prev_shape, dtype=like.dtype, device=like.device)
        recvs.append((from_prev, rank - 1))
    if recv_next_shape is not None and rank + 1 < size:
        from_next = torch.empty(recv_next_shape, dtype=like.dtype, device=like.device)
        recvs.append((from_next, rank + 1))
    for work in post_p2p(sends, recvs, group):
        work.wait()
    return from_prev, from_next


def _to_shifted(x: torch.Tensor, sent: int, received: int, rank: int, size: int, group) -> torch.Tensor:
    """Hand the last ``sent`` tokens (dim 1) to ``rank + 1``; prepend ``received`` tokens from ``rank - 1``."""
    tail = x[:, x.shape[1] - sent :] if sent else None
    shape = (x.shape[0], received, *x.shape[2:]) if received else None
    from_prev, _ = _exchange(x, tail, shape, None, None, rank, size, group)
    kept = x[:, : x.shape[1] - sent]
    return torch.cat([from_prev, kept], dim=1) if from_prev is not None else kept.contiguous()


def _to_unshifted(x: torch.Tensor, sent: int, received: int, rank: int, size: int, group) -> torch.Tensor:
    """Inverse of :func:`_to_shifted`: return the first ``received`` tokens to ``rank - 1``, take back ``sent``."""
    head = x[:, :received] if received else None
    shape = (x.shape[0], sent, *x.shape[2:]) if sent else None
    _, from_next = _exchange(x, None, None, head, shape, rank, size, group)
    kept = x[:, received:]
    return torch.cat([kept, from_next], dim=1) if from_next is not None else kept.contiguous()


class _ShiftOwnership(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, to_shifted, sent, received, rank, size, group):
        ctx.args = (to_shifted, sent, received, rank, size, group)
        move = _to_shifted if to_shifted else _to_unshifted
        return move(x, sent, received, rank, size, group)

    @staticmethod
    def backward(ctx, grad):
        to_shifted, sent, received, rank, size, group = ctx.args
        # The gradient of a moved token goes back to the rank the token came from: the inverse move.
        move = _to_unshifted if to_shifted else _to_shifted
        return move(grad.contiguous(), sent, received, rank, size, group), None, None, None, None, None, None


def shift_ownership(x: torch.Tensor, plan: ContextPlan, rank: int, *, to_shifted: bool, group=None) -> torch.Tensor:
    """Move rank ``rank``'s hidden states between the unshifted and shifted ownership of ``plan``.

    Args:
        x: ``[B, n, ...]``: this rank's tokens in the ownership being left (``n`` is its token count there).
        plan: the CP plan; ``plan.size`` must equal the group's size.
        rank: this process's rank in ``group``.
        to_shifted: ``True`` for unshifted -> shifted ownership, ``False`` for the way back.
        group: the CP process group (``None``: the default group).

    Returns:
        ``[B, n', ...]``: this rank's tokens in the new ownership. Differentiable: gradients travel back.
    """
    start, end = plan.token_range(rank, not to_shifted)
    if x.shape[1] != end - start:
        raise ValueError(
            f"shift_ownership: rank {rank} holds {end - start} tokens in the "
            f"{'unshifted' if to_shifted else 'shifted'} ownership, got x with {x.shape[1]} along dim 1"
        )
    if plan.size == 1:
        return x
    sent, received = plan.handover(rank)
    return _ShiftOwnership.apply(x, to_shifted, sent, received, rank, plan.size, group)


@dataclasses.dataclass
class ContextGroup:
    """This process's place in a CP group: ``rank`` of ``size``, over ``group`` (``None``: the default group).

    ``overlap``: run the interior windows of a layer while its halo block is in flight
    (:func:`~semanticgen.parallel.overlap.shift_ownership_overlapped`) instead of waiting for the block first
    (:func:`shift_ownership`). Both give the same values and move the same bytes; see
    :meth:`~semanticgen.models.LatentGenerator.forward_context_parallel` for where the model uses it.

    Plans are built once per layout and cached (a training run sees a handful of clip shapes).
    """

    rank: int
    size: int
    group: object = None
    overlap: bool = True
    _plans: dict = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in ("rank", "size"):
            check_int(name, getattr(self, name), who="ContextGroup", error=TypeError)
        if not 0 <= self.rank < self.size:
            raise ValueError(f"ContextGroup: rank must be in [0, size={self.size}), got {self.rank}")
        check_bool("overlap", self.overlap, who="ContextGroup")

    @classmethod
    def from_group(cls, group=None, *, overlap: bool = True) -> ContextGroup:
        """The CP group of this process (``None``: the default process group)."""
        return cls(dist.get_rank(group), dist.get_world_size(group), group, overlap)

    def plan(self, layout: WindowLayout) -> ContextPlan:
        plan = self._plans.get(layout)
        if plan is None:
            if len(self._plans) >= 16:
                self._plans.clear()
            plan = self._plans[layout] = ContextPlan.build(layout, self.size)
        return plan


def gather_tokens(local: torch.Tensor, index: torch.Tensor, total: int, cp: ContextGroup) -> torch.Tensor:
    """Assemble the whole sequence from every CP rank's slice (no autograd; for sampling and checks).

    Args:
        local: ``[B, n_r, ...]``: this rank's tokens.
        index: ``LongTensor[n_r]``: where they go along dim 1 of the result.
        total: tokens in the whole sequence.

    Returns:
        ``[B, total, ...]`` on every rank.
    """
    out = local.new_zeros((local.shape[0], total, *local.shape[2:]))
    if cp.size == 1:
        out[:, index] = local
        return out
    sizes = torch.tensor([index.numel()], device=local.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(cp.size)]
    dist.all_gather(all_sizes, sizes, group=cp.group)
    longest = int(max(s.item() for s in all_sizes))
    pad = longest - index.numel()
    padded = torch.cat([local, local.new_zeros((local.shape[0], pad, *local.shape[2:]))], 1).contiguous()
    padded_index = torch.cat([index, index.new_zeros(pad)]).contiguous()
    values = [torch.empty_like(padded) for _ in range(cp.size)]
    indices = [torch.empty_like(padded_index) for _ in range(cp.size)]
    dist.all_gather(values, padded, group=cp.group)
    dist.all_gather(indices, padded_index, group=cp.group)
    for size, value, idx in zip(all_sizes, values, indices):
        n = int(size.item())
        out[:, idx[:n]] = value[:, :n]
    return out
