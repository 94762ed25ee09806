"""Shared pieces of the Triton kernels: launch configurations, per-architecture config tables, helpers.

A kernel's launch parameters are split in two:

* *block sizes* (the tile: rows of one program; the inner block: rows per step of its loop over the
  window): fixed per ``(architecture class, padded head dim, dtype class)``. The tile decides the
  tile table the launcher builds, and the inner block decides the order in which a row's scores are
  reduced, so fixing both makes results bitwise independent of what the autotuner picks;
* ``num_warps`` and ``num_stages``: the only things the autotuner varies. It is keyed on the head dim,
  the tile and a power-of-two bucket of the longest window (:func:`window_bucket`).

Config tables are keyed by architecture class (``"sm80"``: A100-class, ``"sm90"``: H100-class,
``"interpreter"``: ``TRITON_INTERPRET=1`` on CPU tensors) and by padded head dimension. The first
config of each list is the *default*: the only one used when autotuning is off
(``SEMANTICGEN_TRITON_AUTOTUNE=0``), and the one ``semanticgen kernels`` holds to zero spills.

Windows are addressed without a per-token index map: a tile table row holds its window's two token
ranges and the tile's first row (:func:`tile_rows`), and inner loops walk each range as an affine run
of rows, full blocks unmasked and one masked tail (see the kernels).

TMA: on Hopper, bf16/fp16 kernels may load full key/value blocks through device-side tensor
descriptors (``tl.make_tensor_descriptor``, present in Triton >= 3.4 and so in 3.6 and 3.8), which
need a global scratch allocator (:func:`ensure_tma_allocator`). :func:`tma_available` says whether
this Triton has the API; ``SEMANTICGEN_TRITON_TMA=0`` turns it off.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

__all__ = [
    "KernelConfig",
    "ConfigTable",
    "interpreter_enabled",
    "arch_class",
    "device_arch_class",
    "padded_head_dim",
    "autotune_enabled",
    "window_bucket",
    "tma_available",
    "tma_enabled",
    "ensure_tma_allocator",
    "MAX_WINDOW_BUCKET",
]

LOG2E = 1.4426950408889634


def interpreter_enabled() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def autotune_enabled() -> bool:
    """``SEMANTICGEN_TRITON_AUTOTUNE=0`` turns autotuning off: every launch then uses the default config."""
    return os.environ.get("SEMANTICGEN_TRITON_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


MAX_WINDOW_BUCKET = 8192


def window_bucket(max_window_length: int) -> int:
    """Autotuning bucket of a launch: next power of two of the longest window, in ``[64, 8192]``.

    Short windows (few key blocks per program) and long ones favour different pipeline depths, so
    the autotuner keys on this instead of retuning for every window length.
    """
    return min(MAX_WINDOW_BUCKET, max(64, triton.next_power_of_2(int(max_window_length))))


def tma_available() -> bool:
    """Whether this Triton has device-side tensor descriptors (``tl.make_tensor_descriptor``, Triton >= 3.4)."""
    return hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")


def tma_enabled() -> bool:
    """:func:`tma_available` and not turned off with ``SEMANTICGEN_TRITON_TMA=0``."""
    off = os.environ.get("SEMANTICGEN_TRITON_TMA", "1").strip().lower() in ("0", "false", "no", "off")
    return tma_available() and not off


def _tma_scratch(size: int, alignment: int, stream):
    # Device-side descriptors are written to this global scratch by the kernel's prologue (128 bytes
    # per program); torch's caching allocator returns 256-byte aligned blocks, above TMA's 64.
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_tma_allocator() -> None:
    """Install a scratch allocator for device-side tensor descriptors unless one is set.

    Triton keeps the allocator in a ``ContextVar``, so a thread that never set one (the autograd
    engine's device threads run the backward) sees Triton's null allocator; launchers call this
    right before launching a kernel that builds descriptors. An allocator the user set is kept.
    """
    from triton.runtime import _allocation

    current = _allocation._allocator.get()
    if isinstance(current, _allocation.NullAllocator):
        triton.set_allocator(_tma_scratch)


def arch_class(capability: tuple[int, int] | None) -> str:
    """Config table for a device: ``None`` (CPU under the interpreter) -> ``"interpreter"``.

    Hopper (9.x) and newer data-centre parts use the ``"sm90"`` table (228 KiB shared memory per SM);
    Ampere/Ada (8.x) use ``"sm80"`` (164 KiB on A100, 100 KiB on consumer 8.6/8.9, where the
    autotuner drops configs that do not fit).
    """
    if capability is None:
        return "interpreter"
    return "sm90" if capability[0] >= 9 else "sm80"


def device_arch_class(device: torch.device) -> str:
    """:func:`arch_class` of the device a tensor lives on (CPU tensors run under the interpreter)."""
    if device.type != "cuda":
        return "interpreter"
    return arch_class(torch.cuda.get_device_capability(device))


def padded_head_dim(head_dim: int) -> int:
    """Head dim rounded up to a power of two, at least 16 (``tl.dot`` needs K >= 16); 80 -> 128."""
    return max(16, triton.next_power_of_2(head_dim))


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One launch configuration: constexpr block sizes plus warps and pipeline stages."""

    blocks: tuple[tuple[str, int], ...]
    num_warps: int
    num_stages: int

    @classmethod
    def make(cls, num_warps: int, num_stages: int, **blocks: int) -> KernelConfig:
        return cls(tuple(sorted(blocks.items())), num_warps, num_stages)

    @property
    def kwargs(self) -> dict[str, int]:
        return dict(self.blocks)

    def to_triton(self) -> triton.Config:
        return triton.Config(self.kwargs, num_warps=self.num_warps, num_stages=self.num_stages)

    def label(self) -> str:
        parts = [f"{k}={v}" for k, v in self.blocks] + [f"warps={self.num_warps}", f"stages={self.num_stages}"]
        return ",".join(parts)

    def key(self) -> tuple:
        return (self.blocks, self.num_warps, self.num_stages)


@dataclasses.dataclass(frozen=True)
class ConfigTable:
    """Tile size and autotune configs of one kernel, per ``(arch class, padded head dim)``.

    ``entries[(arch, head_dim_pad)] = (tile, [default, alternatives...])``; the configs of one entry
    must share their block sizes (checked at construction), so they differ only in ``num_warps`` and
    ``num_stages`` and every choice computes bitwise the same result. Head dims not listed use
    the next larger listed one (so 32 uses the 64 entry). ``fp32_entries[head_dim_pad]`` replaces
    them for fp32 inputs on any GPU: full-precision fp32 dots run on FMA units with far larger
    register tiles than bf16 MMAs (the bf16 tiles spilled kilobytes), so they need their own small tiles.
    ``variant_entries[(variant, arch or "fp32", head_dim_pad)]`` replaces an entry for one kernel variant:
    ``"pointer"`` (a half-precision forward that cannot use TMA: pointer tensors cost registers that
    descriptors do not) and ``"atomic_dq"`` (the dK/dV kernel with the extra dQ tile). Variants follow
    from the tensors' strides and the user's opt-in, never from the autotuner, so results stay
    independent of what it picks.
    """

    kernel: str
    tile_name: str
    entries: dict[tuple[str, int], tuple[int, tuple[KernelConfig, ...]]]
    fp32_entries: dict[int, tuple[int, tuple[KernelConfig, ...]]] = dataclasses.field(default_factory=dict)
    variant_entries: dict[tuple[str, str, int], tuple[int, tuple[KernelConfig, ...]]] = dataclasses.field(
        default_factory=dict
    )

    def __post_init__(self) -> None:
        # Alternatives may differ only in warps and stages: block sizes fix the reduction order.
        for key, (_, configs) in [*self.entries.items(), *self.fp32_entries.items(), *self.variant_entries.items()]:
            if len({c.blocks for c in configs}) != 1:
                raise ValueError(
                    f"{self.kernel}: configs of {key} differ in block sizes: {[c.label() for c in configs]}"
                )

    def lookup(
        self, arch: str, head_dim_pad: int, *, fp32: bool = False, variant: str | None = None
    ) -> tuple[int, tuple[KernelConfig, ...]]:
        """``(tile, configs)`` for an architecture class, padded head dim, input precision and kernel variant.

        ``variant`` (``"pointer"``: a half-precision forward without TMA; ``"atomic_dq"``: the atomic-dQ
        dK/dV kernel) selects ``variant_entries[(variant, arch or "fp32", head_dim_pad)]`` where the table
        has one, and the plain entry otherwise.
        """
        if fp32 and arch != "interpreter" and self.fp32_entries:
            dims = sorted(self.fp32_entries)
            dim = next((d for d in dims if d >= head_dim_pad), dims[-1])
            key, plain = ("fp32", dim), self.fp32_entries[dim]
        else:
            dims = sorted(d for a, d in self.entries if a == arch)
            if not dims:
                raise ValueError(f"{self.kernel}: no configs for architecture class {arch!r}")
            key = (arch, next((d for d in dims if d >= head_dim_pad), dims[-1]))
            plain = self.entries[key]
        return self.variant_entries.get((variant, *key), plain) if variant else plain

    def all_triton_configs(self) -> list[triton.Config]:
        """Every config of every arch (fp32 and variants included), deduplicated: the autotuner's list.

        The autotuner prunes it per launch to the list of the tensors' architecture (see :meth:`pruner`).
        """
        seen: dict[tuple, KernelConfig] = {}
        tables = [*self.entries.values(), *self.fp32_entries.values(), *self.variant_entries.values()]
        for _, configs in tables:
            for cfg in configs:
                seen.setdefault(cfg.key(), cfg)
        return [c.to_triton() for c in seen.values()]

    def pruner(self, select):
        """``early_config_prune`` hook keeping the configs that ``select(named_args, kwargs)`` returns.

        ``select`` returns the ``KernelConfig`` tuple for the launch. Matching is by value (block
        sizes, warps, stages), so it also works on the config copies ``torch.compile`` makes.
        """

        def prune(configs, named_args, **kwargs):
            wanted = select(named_args, kwargs)
            if not autotune_enabled():
                wanted = wanted[:1]
            keys = {c.key() for c in wanted}
            kept = [c for c in configs if (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) in keys]
            return kept or [wanted[0].to_triton()]

        return prune


@triton.jit
def tile_rows(TILES, tile, BLOCK: tl.constexpr):
    """Rows of one tile: ``(start0, end0, start1, end1, ok, tok)``, no per-row index load.

    ``TILES[tile] = (start0, end0, start1, end1, first_row)``: the tile's window is tokens
    ``[start0, end0) + [start1, end1)`` in the caller's order (see ``WindowLayout.segments``) and the
    tile covers window rows ``first_row + arange(BLOCK)`` of their concatenation. A row ``r`` is token
    ``start0 + r`` in range 0 and ``start1 + (r - len0)`` in range 1, so the tokens are computed in
    registers (a tile may straddle the two ranges); ``ok`` masks rows past the window's end and
    ``tok`` (int64) are the tokens (0 where not ``ok``).
    """
    row = TILES + 5 * tile
    start0 = tl.load(row)
    end0 = tl.load(row + 1)
    start1 = tl.load(row + 2)
    end1 = tl.load(row + 3)
    first = tl.load(row + 4)
    offs = first + tl.arange(0, BLOCK)
    len0 = end0 - start0
    ok = offs < len0 + (end1 - start1)
    tok = start0 + offs + tl.where(offs >= len0, start1 - end0, 0)
    tok = tl.where(ok, tok, 0).to(tl.int64)
    return start0, end0, start1, end1, ok, tok


@triton.jit
def load_rows(
    base,
    rows,
    row_ok,
    stride_n,
    stride_d,
    offs_d,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK_ROWS: tl.constexpr,
    TRANS: tl.constexpr,
):
    """Load ``base[rows, :HEAD_DIM]`` as ``[R, BLOCK_D]`` (``[BLOCK_D, R]`` when ``TRANS``), zero-padded.

    Masks only what can be out of range: rows when ``MASK_ROWS`` (the ragged tail of a range), the
    head dim only when it is padded (``HEAD_DIM < BLOCK_D``), so full blocks of a power-of-two head
    dim load without predicates.
    """
    if TRANS:
        ptrs = base + rows[None, :] * stride_n + offs_d[:, None] * stride_d
        if MASK_ROWS and HEAD_DIM < BLOCK_D:
            x = tl.load(ptrs, mask=row_ok[None, :] & (offs_d < HEAD_DIM)[:, None], other=0.0)
        elif MASK_ROWS:
            x = tl.load(ptrs, mask=row_ok[None, :], other=0.0)
        elif HEAD_DIM < BLOCK_D:
            x = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[:, None], other=0.0)
        else:
            x = tl.load(ptrs)
    else:
        ptrs = base + rows[:, None] * stride_n + offs_d[None, :] * stride_d
        if MASK_ROWS and HEAD_DIM < BLOCK_D:
            x = tl.load(ptrs, mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        elif MASK_ROWS:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        elif HEAD_DIM < BLOCK_D:
            x = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def store_rows(base, rows, row_ok, stride_n, stride_d, offs_d, x, HEAD_DIM: tl.constexpr):
    """Store ``x [R, BLOCK_D]`` to ``base[rows, :HEAD_DIM]`` for the rows in ``row_ok``."""
    ptrs = base + rows[:, None] * stride_n + offs_d[None, :] * stride_d
    tl.store(ptrs, x, mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def dot_acc(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation.

    ``UPCAST`` converts both operands to fp32 first. It is set only under ``TRITON_INTERPRET=1``,
    whose bf16 ``tl.dot`` multiplies the raw bit patterns (errors of 1e10 on 16x16 inputs). bf16/fp16
    products are exact in fp32, so the upcast result equals the GPU's bf16 MMA with fp32 accumulation.
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def cast_to(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """``x.to(dtype)`` for fp32 ``x``, rounding to nearest even as the GPU's ``cvt.rn`` does.

    Under ``TRITON_INTERPRET=1`` (``UPCAST``) the interpreter's fp32 -> bf16 cast truncates (about half
    of random values come out one ulp low, a bias that doubled bf16 gradient errors), so the rounding is
    done here on the bits first; the final cast then only drops zero bits.
    """
    if UPCAST and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
