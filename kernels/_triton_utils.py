"""Shared pieces of the Triton kernels: launch configurations, per-architecture config tables, helpers.

A kernel's launch parameters are split in two:

* the *tile* (rows of one program along the window-major sequence): it decides the tile table that
  maps programs to ``(window, first row)``, so the launcher fixes it before the launch;
* everything else (inner block, ``num_warps``, ``num_stages``): autotuned per architecture.

Config tables are keyed by architecture class (``"sm80"``: A100-class, ``"sm90"``: H100-class,
``"interpreter"``: ``TRITON_INTERPRET=1`` on CPU tensors) and by padded head dimension. The first
config of each list is the *default*: the only one used when autotuning is off, and the one whose
registers and spills ``semanticgen kernels`` checks for zero spills.
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
]

LOG2E = 1.4426950408889634


def interpreter_enabled() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def autotune_enabled() -> bool:
    """``SEMANTICGEN_TRITON_AUTOTUNE=0`` turns autotuning off: every launch then uses the default config."""
    return os.environ.get("SEMANTICGEN_TRITON_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


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

    ``entries[(arch, head_dim_pad)] = (tile, [default, alternatives...])``. Head dims not listed use
    the next larger listed one (so 32 uses the 64 entry). ``fp32_entries[head_dim_pad]`` replaces
    them for fp32 inputs on any GPU: full-precision fp32 dots run on FMA units with far larger
    register tiles than bf16 MMAs (the bf16 tiles spilled kilobytes), so they need their own small tiles.
    """

    kernel: str
    tile_name: str
    entries: dict[tuple[str, int], tuple[int, tuple[KernelConfig, ...]]]
    fp32_entries: dict[int, tuple[int, tuple[KernelConfig, ...]]] = dataclasses.field(default_factory=dict)

    def lookup(self, arch: str, head_dim_pad: int, *, fp32: bool = False) -> tuple[int, tuple[KernelConfig, ...]]:
        """``(tile, configs)`` for an architecture class, padded head dim and input precision."""
        if fp32 and arch != "interpreter" and self.fp32_entries:
            dims = sorted(self.fp32_entries)
            return self.fp32_entries[next((d for d in dims if d >= head_dim_pad), dims[-1])]
        dims = sorted(d for a, d in self.entries if a == arch)
        if not dims:
            raise ValueError(f"{self.kernel}: no configs for architecture class {arch!r}")
        return self.entries[(arch, next((d for d in dims if d >= head_dim_pad), dims[-1]))]

    def all_triton_configs(self) -> list[triton.Config]:
        """Every config of every arch (fp32 variants included), deduplicated: the autotuner's list.

        The autotuner prunes it per launch to the list of the tensors' architecture (see :meth:`pruner`).
        """
        seen: dict[tuple, KernelConfig] = {}
        for arch, dim in self.entries:
            for fp32 in (False, True):
                for cfg in self.lookup(arch, dim, fp32=fp32)[1]:
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
def tile_rows(TILES, CU_SEQLENS, PERM, tile, BLOCK: tl.constexpr):
    """Rows of one tile: ``(win_start, win_end, offs, ok, tok)``.

    ``TILES[tile] = (window, first window-major row)``; ``offs`` are the tile's ``BLOCK`` window-major
    rows, ``ok`` masks those past the window's end, ``tok`` (int64) their caller-order tokens.
    """
    window = tl.load(TILES + 2 * tile)
    start = tl.load(TILES + 2 * tile + 1)
    win_start = tl.load(CU_SEQLENS + window)
    win_end = tl.load(CU_SEQLENS + window + 1)
    offs = start + tl.arange(0, BLOCK)
    ok = offs < win_end
    tok = tl.load(PERM + offs, mask=ok, other=0).to(tl.int64)
    return win_start, win_end, offs, ok, tok


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
