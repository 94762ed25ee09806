"""The halo exchange of window-parallel CP, overlapped with the windows that do not need the halo.

At a change of window parity a rank hands one block of hidden states to a neighbour and receives one
(:func:`~semanticgen.parallel.shift_ownership`). Of the windows it owns in the new parity only the one holding the
received block needs it (the *boundary*); the others (*interior*) are made of tokens the rank already holds.
:func:`shift_ownership_overlapped` therefore starts the point-to-point ops and hands the caller's layer the interior
tokens and a function that waits for the block and returns the boundary window's tokens: the layer runs on the
interior windows, calls it, and runs on the boundary window, all in one call. A layer is windowed attention plus
per-token ops (and per-sample conditioning), so running it on two disjoint unions of whole windows and concatenating
is running it once. One call per layer matters under FSDP2: a transformer block is an FSDP unit, and FSDP gathers a
unit's parameters once per call (:meth:`~semanticgen.models.blocks.SplitForward.forward_split`, registered as an
FSDP forward method, is that one call).

Backward mirrors it: the boundary window's backward runs first (its nodes were recorded last), its gradient for the
received block is sent back at once, and the interior windows' backward runs while it travels; the rank then waits
for the gradient of the block it sent and assembles its input gradient in one concatenation.

The bytes and messages are those of :func:`~semanticgen.parallel.shift_ownership` (one batch per direction, each
counted in :data:`~semanticgen.parallel.COMM_COUNTER`). Whether the transfer really runs under the compute is the
backend's: gloo's and NCCL's ``isend``/``irecv`` both return before the transfer ends (gloo moves bytes on its own
I/O threads, NCCL on its own CUDA stream).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .context import ContextPlan, HaloSplit, post_p2p, shift_ownership

__all__ = ["shift_ownership_overlapped"]

# compute(interior [B, n_i, ...] | None, boundary: () -> [B, n_b, ...] | None, split) -> (out_i | None, out_b | None):
# the layer on the new ownership's interior windows, then on its boundary window (see shift_ownership_overlapped).
SplitCompute = Callable[
    [torch.Tensor | None, Callable[[], torch.Tensor] | None, HaloSplit], tuple[torch.Tensor | None, torch.Tensor | None]
]


@dataclasses.dataclass
class _Halo:
    """One parity change of one rank: which slice of ``x`` leaves, to whom, and what arrives, from whom.

    ``out_range``: the tokens of ``x`` (old ownership) that leave for group rank ``out_peer``; ``in_count`` tokens
    arrive from ``in_peer``. ``out_count == 0`` / ``in_count == 0`` mean no message that way.
    """

    out_range: tuple[int, int]
    out_peer: int
    in_count: int
    in_peer: int
    group: object
    works: list = dataclasses.field(default_factory=list)
    keep: list = dataclasses.field(default_factory=list)  # sent tensors stay alive until their works are done
    received: torch.Tensor | None = None
    like: torch.Tensor | None = None  # [B, 0, ...]: dtype, device and shape of x's tokens
    grad_works: list | None = None
    grad_received: torch.Tensor | None = None

    @property
    def out_count(self) -> int:
        return self.out_range[1] - self.out_range[0]

    def start(self, x: torch.Tensor) -> None:
        self.like = x.new_empty((x.shape[0], 0, *x.shape[2:]))
        sends, recvs = [], []
        if self.out_count:
            sends.append((x[:, self.out_range[0] : self.out_range[1]].contiguous(), self.out_peer))
        if self.in_count:
            self.received = self._buffer(self.in_count)
            recvs.append((self.received, self.in_peer))
        self.keep = [t for t, _ in sends]
        self.works = post_p2p(sends, recvs, self.group)

    def finish(self) -> torch.Tensor | None:
        for work in self.works:
            work.wait()
        self.works, self.keep = [], []
        return self.received

    def _buffer(self, tokens: int) -> torch.Tensor:
        return self.like.new_empty((self.like.shape[0], tokens, *self.like.shape[2:]))

    def start_backward(self, grad_received: torch.Tensor | None) -> None:
        """Send the received block's gradient back and post the receive of the sent block's (once)."""
        if self.grad_works is not None:
            return
        sends, recvs = [], []
        if self.in_count:
            # None only if nothing downstream used the received block; the sender waits for a gradient anyway.
            grad = grad_received if grad_received is not None else self._buffer(self.in_count).zero_()
            sends.append((grad.contiguous(), self.in_peer))
        if self.out_count:
            self.grad_received = self._buffer(self.out_count)
            recvs.append((self.grad_received, self.out_peer))
        self.keep = [t for t, _ in sends]
        self.grad_works = post_p2p(sends, recvs, self.group)

    def finish_backward(self) -> torch.Tensor | None:
        for work in self.grad_works:
            work.wait()
        # Reset, so that a second backward through the same graph (retain_graph) exchanges again.
        self.grad_works, self.keep = None, []
        return self.grad_received


class _StartHalo(torch.autograd.Function):
    """Starts the exchange; returns views of the kept interior and boundary tokens and an empty anchor that
    orders :class:`_FinishHalo` after it. Backward waits for the sent block's gradient and concatenates."""

    @staticmethod
    def forward(ctx, x, halo, interior_range, boundary_range):
        halo.start(x)
        ctx.halo = halo
        # The input gradient is these three slices of x, in x's order.
        ctx.order = sorted([(interior_range, 0), (boundary_range, 1), (halo.out_range, 2)])
        interior = x[:, interior_range[0] : interior_range[1]]
        boundary = x[:, boundary_range[0] : boundary_range[1]]
        return interior, boundary, x.new_empty(0)

    @staticmethod
    def backward(ctx, grad_interior, grad_boundary, grad_anchor):
        halo = ctx.halo
        halo.start_backward(None)  # no-op where _FinishHalo's backward posted it already
        grad_out = halo.finish_backward()
        parts = {0: grad_interior, 1: grad_boundary, 2: grad_out}
        grad = torch.cat([parts[i] for (start, end), i in ctx.order if end > start], 1)
        return grad, None, None, None


class _FinishHalo(torch.autograd.Function):
    """Waits for the exchange and returns the received block; backward sends its gradient back at once."""

    @staticmethod
    def forward(ctx, anchor, halo):
        ctx.halo = halo
        return halo.finish()

    @staticmethod
    def backward(ctx, grad_received):
        ctx.halo.start_backward(grad_received)
        return torch.zeros(0, dtype=grad_received.dtype, device=grad_received.device), None


def shift_ownership_overlapped(
    x: torch.Tensor, plan: ContextPlan, rank: int, *, to_shifted: bool, compute: SplitCompute, group=None
) -> torch.Tensor:
    """Move ownership as :func:`~semanticgen.parallel.shift_ownership` does, and run the next layer under it.

    Equals the layer on ``shift_ownership(x, ...)`` and sends the same bytes, but the layer runs on the interior
    windows (:meth:`~semanticgen.parallel.ContextPlan.halo_split`) while the halo block is in flight, then on the
    boundary window once it has arrived (in backward: the boundary first, then the interior while its gradient
    travels back).

    Args:
        x: ``[B, n, ...]``: this rank's tokens in the ownership being left.
        plan, rank, to_shifted, group: as :func:`~semanticgen.parallel.shift_ownership`.
        compute: ``compute(interior, boundary, split) -> (out_interior, out_boundary)``, one call per layer (one FSDP
            unshard): ``interior`` is ``[B, n_i, ...]``, the new ownership's local tokens ``split.interior`` (whole
            windows of ``split.interior_shard``), or ``None``; ``boundary`` is a function to call after the interior
            part, which waits for the halo and returns the tokens ``split.boundary`` ``[B, n_b, ...]``, or
            ``None``. Each output is the layer on that part (``None`` for an absent part); the layer must act on
            each window independently (e.g. :meth:`~semanticgen.models.blocks.SplitForward.forward_split`).

    Returns:
        ``[B, n', ...]``: the layer's output over this rank's tokens in the new ownership. Differentiable.
    """
    start, end = plan.token_range(rank, not to_shifted)
    if x.shape[1] != end - start:
        raise ValueError(
            f"shift_ownership_overlapped: rank {rank} holds {end - start} tokens in the "
            f"{'unshifted' if to_shifted else 'shifted'} ownership, got x with {x.shape[1]} along dim 1"
        )
    sent, received = plan.handover(rank)
    if plan.size == 1 or sent + received == 0:
        moved = shift_ownership(x, plan, rank, to_shifted=to_shifted, group=group)
        whole = HaloSplit((0, moved.shape[1]), (0, 0), plan.shard(rank, to_shifted), None)
        return compute(moved, None, whole)[0]
    split = plan.halo_split(rank, to_shifted)
    n = x.shape[1]
    if to_shifted:  # x = [kept, tail -> rank + 1]; new = [from rank - 1, kept]
        halo = _Halo((n - sent, n), rank + 1, received, rank - 1, group)
        lead = received  # new-ownership tokens before the kept ones
    else:  # x = [head -> rank - 1, kept]; new = [kept, from rank + 1]
        halo = _Halo((0, received), rank - 1, sent, rank + 1, group)
        lead = -received
    kept_start, kept_end = (0, n - sent) if to_shifted else (received, n)
    (i0, i1), (b0, b1) = split.interior, split.boundary
    # In x's coordinates: the interior, and the boundary's kept tokens (the rest of that window arrives).
    i_kept = (i0 - lead, i1 - lead) if i1 > i0 else (kept_start, kept_start)
    b_kept = (max(b0 - lead, kept_start), min(b1 - lead, kept_end)) if b1 > b0 else (kept_start, kept_start)
    interior, boundary_kept, anchor = _StartHalo.apply(x, halo, i_kept, b_kept)

    def boundary() -> torch.Tensor:
        # Called again if activation checkpointing recomputes the layer: the works are done by then, so this only
        # returns the block already received (nothing is resent).
        block = _FinishHalo.apply(anchor, halo)
        return torch.cat([block, boundary_kept] if to_shifted else [boundary_kept, block], 1)

    # A rank that only sends (the first going to shifted ownership, the last going back) has no boundary window.
    out_interior, out_boundary = compute(interior if i1 > i0 else None, boundary if halo.in_count else None, split)
    if not halo.in_count:
        halo.finish()  # its send ran under the interior windows
    parts = [(i0, out_interior), (b0, out_boundary)]
    return torch.cat([out for _, out in sorted(parts, key=lambda p: p[0]) if out is not None], 1)
