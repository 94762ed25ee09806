"""Acceptance run for a new machine: ``semanticgen selftest [--device cuda|cpu] [--quick] [--json FILE]``.

One command checks, on one device, everything a broken build or a wrong kernel would break, and prints
a verdict table. Sections (``--only`` picks some):

* ``attention``: every ``swin_attention`` backend the registry reports as usable on the device (except
  ``reference``, the oracle) against the fp64 dense reference: forward and ``dq, dk, dv``, both window
  parities, both token orders, bf16/fp16/fp32 where the backend supports them, on awkward layouts.
* ``int64``: (CUDA) a forward whose q has more than ``2**31`` elements, checked on a few windows.
* ``flow``: the compiled rectified-flow ops of :mod:`semanticgen.ops.flow` against fp64 formulas,
  including the flow-matching loss gradient. A missing ``semanticgen._C`` is a failure.
* ``graph``: (CUDA) a guided sampling loop of fused ops runs without a host sync and replays from a
  CUDA graph with the eager result.
* ``timing``: every backend against full attention (SDPA) at three sizes, up to the 60 s 480p plan.

Accuracy rule (the flash-attn test rule): the error of a result is its max-abs deviation from the fp64
result, normalised by the max-abs of the fp64 result::

    err(x) = max|x - ref64| / max|ref64|

and it must be finite and at most twice the error of the same computation done by plain torch at the
same dtype. For attention, plain torch's error is the larger of its two ways of computing it in that
dtype: the dense-mask reference (einsum, softmax, einsum) and ``scaled_dot_product_attention`` with the
window mask. Both are needed: in fp32 the dense reference keeps every intermediate in fp32 and can be
up to 4x more accurate than a blocked online-softmax kernel (measured against torch's own CPU flash
kernel), while in bf16/fp16 it rounds scores and probabilities to the input dtype and is the less
accurate one. For
the flow ops it is the eager expression in that dtype. Where plain torch's error is exactly 0 the
bound is a floor of 4 ulps of the output's magnitude (``4 * eps(dtype)``). The
flow-matching loss is an fp32 scalar whatever the input dtype; its bound also never drops below
4 fp32 ulps (the op's documented accuracy). Every check draws fresh inputs from its own seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

__all__ = ["SECTIONS", "Row", "run_selftest", "print_report", "report_json", "device_unavailable"]

# Run order. int64 goes last: a kernel that overflows 32-bit offsets may fault, and a CUDA fault poisons
# the context for every check after it.
SECTIONS = ("attention", "flow", "graph", "timing", "int64")
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
FLOOR_ULPS = 4
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}

# Seconds each section may spend before it stops starting new checks (the rest become SKIP rows).
# CUDA: the whole run must fit 5 minutes on one H100/H200, Triton compiles included (about 20 s per
# (dtype, head dim) pair of the attention matrix). CPU --quick: 2 minutes on 2 shared cores.
_BUDGET_S = {
    ("cuda", True): {"attention": 150, "int64": 40, "flow": 20, "graph": 20, "timing": 45},
    ("cuda", False): {"attention": 170, "int64": 40, "flow": 25, "graph": 20, "timing": 60},
    ("cpu", True): {"attention": 70, "int64": 5, "flow": 15, "graph": 5, "timing": 30},
    ("cpu", False): {"attention": 300, "int64": 5, "flow": 60, "graph": 5, "timing": 300},
}


@dataclasses.dataclass
class Row:
    """One line of the verdict table (and of the JSON file).

    Attributes:
        section: one of :data:`SECTIONS`.
        name: what was checked (backend or op, and pass).
        device: ``"cpu"`` or ``"cuda"``.
        dtype: input dtype (``"bf16"``...) or ``"-"``.
        layout: layout / shape id, or ``"-"``.
        error: measured normalised error (``None`` when not applicable).
        bound: the error's allowed maximum (``None`` when not applicable).
        status: ``"PASS"``, ``"FAIL"`` or ``"SKIP"``.
        detail: why it failed or was skipped, or what the worst sub-check was.
        data: extra numbers (per-quantity errors, timings) for the JSON file.
    """

    section: str
    name: str
    device: str
    dtype: str = "-"
    layout: str = "-"
    error: float | None = None
    bound: float | None = None
    status: str = PASS
    detail: str = ""
    data: dict[str, Any] = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------------------- helpers
def _dname(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _seed(*parts: object) -> int:
    """A stable per-check seed (Python's ``hash`` of a str changes between processes)."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def _randn(shape: Sequence[int], gen: torch.Generator, dtype: torch.dtype, device: str, scale: float = 1.0):
    """Normal samples drawn in fp64 on the CPU (the same values on every device), then cast."""
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|x - ref| / max|ref|`` in fp64 (``inf`` when ``x`` has a NaN or inf; plain max-abs if ``ref`` is 0)."""
    x = x.detach().double()
    if not bool(torch.isfinite(x).all()):
        return math.inf
    scale = ref.detach().abs().max().item() if ref.numel() else 0.0
    err = (x - ref.detach()).abs().max().item() if ref.numel() else 0.0
    return err / scale if scale > 0 else err


def bound_from_plain(plain_err: float, dtype: torch.dtype) -> float:
    """Twice plain torch's error; ``FLOOR_ULPS`` ulps of the output's magnitude where that error is 0."""
    if plain_err > 0:
        return 2.0 * plain_err
    return FLOOR_ULPS * torch.finfo(dtype).eps


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Section:
    """Time keeping of one section: rows stop being started once its budget is spent."""

    def __init__(self, name: str, budget_s: float):
        self.name, self.budget_s, self.start = name, budget_s, time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_budget(self) -> bool:
        return self.elapsed > self.budget_s

    def budget_row(self, name: str, device: str, **kw) -> Row:
        return Row(
            self.name, name, device, status=SKIP, detail=f"section time budget ({self.budget_s:.0f} s) spent", **kw
        )


# ------------------------------------------------------------------------------ attention checks
# name -> (Tv, Sv, Ts, Ss, Tw): the layouts whose window edges trip index arithmetic.
LAYOUTS = {
    "Ts=0": (6, 5, 0, 0, 2),
    "Ts-not-dividing-Tv": (8, 3, 3, 2, 4),
    "odd-Tw": (7, 4, 3, 2, 3),
    "Tw=1": (5, 3, 5, 2, 1),
    "Tv<Tw": (3, 4, 2, 3, 8),
    # Windows of 160-210 tokens: several row tiles and key blocks per window, ragged last tiles.
    "multi-tile": (9, 41, 3, 24, 4),
}


@dataclasses.dataclass(frozen=True)
class AttnCase:
    """One attention input configuration; it is run for both parities and both token orders."""

    layout_name: str
    batch: int
    heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def dims(self) -> tuple[int, int, int, int, int]:
        return LAYOUTS[self.layout_name]

    @property
    def layout_id(self) -> str:
        tv, sv, ts, ss, tw = self.dims
        return f"{self.layout_name} ({tv},{sv},{ts},{ss},{tw}) B{self.batch} H{self.heads} D{self.head_dim}"


def attention_cases(device: str, quick: bool) -> list[AttnCase]:
    """The check matrix.

    Few distinct (dtype, head dim) pairs: each costs a set of Triton compiles (every autotune config of
    four kernels) on CUDA. Triton also specialises integer arguments on ``== 1`` and divisibility by 16,
    so every layout here has ``N % 16 != 0`` and no case has one head: one compile set per pair.
    """
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    cases = [
        AttnCase("multi-tile", 1, 2, 128, bf16),
        AttnCase("Ts=0", 2, 2, 64, bf16),
        AttnCase("Ts-not-dividing-Tv", 1, 3, 128, bf16),
        AttnCase("odd-Tw", 2, 2, 80, bf16),
        AttnCase("Tw=1", 1, 2, 64, bf16),
        AttnCase("Tv<Tw", 2, 2, 128, bf16),
        AttnCase("multi-tile", 2, 2, 128, fp16),
        AttnCase("odd-Tw", 1, 2, 128, fp16),
        AttnCase("multi-tile", 1, 2, 64, fp32),
        AttnCase("Ts-not-dividing-Tv", 2, 2, 64, fp32),
    ]
    if not quick:
        cases += [
            AttnCase("multi-tile", 2, 2, 80, bf16),
            AttnCase("Tw=1", 2, 2, 128, fp16),
            AttnCase("Tv<Tw", 1, 2, 64, fp32),
            AttnCase("Ts=0", 1, 2, 128, fp16),
        ]
    if device == "cpu":
        # No compiles on CPU and a check takes milliseconds: every layout in every dtype, even when quick.
        cases += [
            AttnCase(name, 2, 2, d, dt)
            for name in LAYOUTS
            for dt, d in ((fp16, 80), (fp32, 128))
            if AttnCase(name, 2, 2, d, dt) not in cases
        ]
    return cases


def _backend_dtypes(name: str) -> tuple[torch.dtype, ...] | None:
    """Dtypes a registered backend declares (``None`` if the registry does not say)."""
    from semanticgen.ops.swin_attention import interface

    backend = interface._BACKENDS.get(name)
    return None if backend is None else tuple(backend.dtypes)


def _backend_rejects(name: str, q: torch.Tensor) -> str | None:
    """Why the registry says backend ``name`` cannot run ``q`` (dtype, head dim, ...), or ``None``."""
    from semanticgen.ops.swin_attention import interface

    backend = interface._BACKENDS.get(name)
    if backend is None:
        return None
    if hasattr(backend, "rejects"):
        return backend.rejects(q)
    return None if q.dtype in backend.dtypes else f"supports {', '.join(_dname(d) for d in backend.dtypes)}"


def _attention_backends(device: str) -> tuple[list[str], list[tuple[str, str]]]:
    """``(usable backend names, [(name, why not)])`` on ``device``; ``reference`` is the oracle, not a subject."""
    from semanticgen.ops import available_backends

    usable, unusable = [], []
    for name, reason in available_backends(device).items():
        if name == "reference":
            continue
        if reason is None:
            usable.append(name)
        else:
            unusable.append((name, reason))
    return usable, unusable


class Unsupported(Exception):
    """The backend declined the input (a ValueError/TypeError naming a limit): a SKIP, not a FAIL."""


def _attention_errors(backend: str, case: AttnCase, shifted: bool, order: str, device: str) -> dict[str, tuple]:
    """``{quantity: (error, bound)}`` for out, dq, dk, dv of one backend run against fp64."""
    from semanticgen.ops import WindowLayout, swin_attention, swin_attention_reference

    tv, sv, ts, ss, tw = case.dims
    layout = WindowLayout(tv, sv, ts, ss, tw, order=order)
    gen = torch.Generator().manual_seed(_seed("attention", backend, case, shifted, order))
    shape = (case.batch, layout.num_tokens, case.heads, case.head_dim)
    q, k, v, grad = (_randn(shape, gen, case.dtype, device) for _ in range(4))
    reason = _backend_rejects(backend, q)
    if reason is not None:
        raise Unsupported(reason)

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        return [out, *torch.autograd.grad(out, leaves, grad.to(dtype))]

    try:
        ours = run(lambda a, b, c: swin_attention(a, b, c, layout, shifted=shifted, backend=backend), case.dtype)
    except (ValueError, TypeError) as exc:
        raise Unsupported(_short(exc)) from exc
    # The oracle sees the same (dtype-rounded) inputs, upcast, so only the computation's error counts.
    exact = run(lambda a, b, c: swin_attention_reference(a, b, c, layout, shifted=shifted), torch.float64)
    plains = [run(lambda a, b, c: swin_attention_reference(a, b, c, layout, shifted=shifted), case.dtype)]
    mask = _window_mask(layout, shifted, device)
    fused = _quietly(lambda: run(lambda a, b, c: _sdpa(a, b, c, mask), case.dtype))
    if fused is not None:
        plains.append(fused)
    result = {}
    for i, (name, a, e) in enumerate(zip(("out", "dq", "dk", "dv"), ours, exact)):
        if a.shape != e.shape or a.dtype != case.dtype:
            raise AssertionError(f"{name}: got {tuple(a.shape)} {a.dtype}, expected {tuple(e.shape)} {case.dtype}")
        plain_err = max(rel_error(p[i], e) for p in plains)
        result[name] = (rel_error(a, e), bound_from_plain(plain_err, case.dtype))
    return result


def _quietly(fn: Callable[[], Any]) -> Any:
    """``fn()`` with warnings silenced, or ``None`` if it raises.

    For the second plain-torch baseline only (SDPA with a mask): an SDPA kernel that cannot take the
    inputs must not turn a backend's check into a failure; the dense baseline is always there.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return fn()
        except Exception:
            return None


def _window_mask(layout, shifted: bool, device: str) -> torch.Tensor:
    """``bool[N, N]``: query row may attend to key column (same window)."""
    ids = layout.window_ids(shifted).to(device)
    return ids[:, None] == ids[None, :]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """torch's fused attention on ``[B, N, H, D]`` (transposed views), with an optional boolean mask."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)


def _attention_row(backend: str, case: AttnCase, device: str) -> Row:
    """Both parities and both orders of one case; the row shows the sub-check nearest its bound."""
    sub: dict[str, dict] = {}
    failures, declined, worst, worst_ratio = [], [], None, -1.0
    for shifted in (False, True):
        for order in ("streams", "blocked"):
            tag = f"{'shifted' if shifted else 'unshifted'}/{order}"
            try:
                errs = _attention_errors(backend, case, shifted, order, device)
            except Unsupported as exc:
                # e.g. a varlen backend that takes only the blocked order: the other sub-checks still count.
                declined.append((tag, str(exc)))
                continue
            for qty, (err, bound) in errs.items():
                sub[f"{tag}/{qty}"] = {"error": err, "bound": bound}
                ratio = err / bound if bound > 0 else math.inf
                if not err <= bound:  # NaN and inf fail here too
                    failures.append(f"{qty} {tag}: {err:.3g} > {bound:.3g}")
                if ratio > worst_ratio or worst is None:
                    worst_ratio, worst = ratio, (qty, tag, err, bound)
    if worst is None:
        return Row(
            "attention", f"{backend} fwd+bwd", device, _dname(case.dtype), case.layout_id, status=SKIP,
            detail=f"backend declined: {declined[0][1]}",
        )  # fmt: skip
    qty, tag, err, bound = worst
    detail = "; ".join(failures[:3]) + (f" (+{len(failures) - 3} more)" if len(failures) > 3 else "")
    if not detail:
        detail = f"worst: {qty} {tag} ({len(sub)} sub-checks)"
    if declined:
        detail += f"; declined {', '.join(t for t, _ in declined)}: {declined[0][1]}"
    return Row(
        "attention",
        f"{backend} fwd+bwd",
        device,
        _dname(case.dtype),
        case.layout_id,
        error=err,
        bound=bound,
        status=FAIL if failures else PASS,
        detail=detail,
        data={"sub_checks": sub},
    )


def attention_section(device: str, quick: bool, section: _Section) -> list[Row]:
    usable, unusable = _attention_backends(device)
    rows = [Row("attention", f"{name}", device, status=SKIP, detail=reason) for name, reason in unusable]
    per_backend: dict[str, list[Row]] = {b: [] for b in usable}
    # Cases outside, backends inside: when the time budget runs out (Triton compiles are the slow part),
    # every backend loses the same tail of the matrix instead of the last backend losing everything.
    for case in attention_cases(device, quick):
        for backend in usable:
            if device == "cpu" and backend == "triton" and case not in attention_cases(device, True)[:4]:
                # Registered for CPU tensors only under TRITON_INTERPRET=1, which the user asked for; the
                # interpreter takes seconds per window, so it gets the first cases only.
                continue
            per_backend[backend].append(_attention_case_row(backend, case, device, section))
    for backend, backend_rows in per_backend.items():
        ran = [r for r in backend_rows if r.status in (PASS, FAIL)]
        budget_skips = [r for r in backend_rows if r.detail.startswith("section time budget")]
        if backend_rows and not ran and len(budget_skips) < len(backend_rows):
            # A backend that says it runs here but declines every input is broken (or the matrix is).
            backend_rows.append(
                Row("attention", f"{backend} coverage", device, status=FAIL,
                    detail="available on this device, but it declined every check")
            )  # fmt: skip
        rows += backend_rows
    return rows


def _attention_case_row(backend: str, case: AttnCase, device: str, section: _Section) -> Row:
    dtypes = _backend_dtypes(backend)
    name = f"{backend} fwd+bwd"
    if dtypes is not None and case.dtype not in dtypes:
        return Row("attention", name, device, _dname(case.dtype), case.layout_id, status=SKIP,
                   detail=f"backend supports {', '.join(_dname(d) for d in dtypes)}")  # fmt: skip
    if section.over_budget():
        return section.budget_row(name, device, dtype=_dname(case.dtype), layout=case.layout_id)
    try:
        return _attention_row(backend, case, device)
    except Exception as exc:  # a crash in a backend is a failed check, and the run goes on
        return Row("attention", name, device, _dname(case.dtype), case.layout_id, status=FAIL, detail=_short(exc))


# ----------------------------------------------------------------------------------- int64 offsets
# q of [1, N, 16, 128] with N = 16,400 * 64 + 4,100 tokens: 2.158e9 elements > 2**31 (4.3 GB in bf16).
# Small windows (4 frames of 64 tokens) keep the forward to milliseconds; what matters is the offsets.
INT64_LAYOUT = (16_400, 64, 4_100, 1, 4)
INT64_HEADS, INT64_HEAD_DIM = 16, 128


def _window_tokens(layout, shifted: bool, w: int, device: str) -> torch.Tensor:
    seg = layout.segments(shifted)[w]
    return torch.cat([torch.arange(seg.start0, seg.end0), torch.arange(seg.start1, seg.end1)]).to(device)


def _dense_window(q, k, v, scale: float) -> torch.Tensor:
    """Full attention over one window's tokens, ``[B, L, H, D]`` in and out, in the inputs' dtype."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v)


def int64_section(device: str, quick: bool, section: _Section) -> list[Row]:
    if device != "cuda":
        return [Row("int64", "int64 offsets", device, status=SKIP, detail="CUDA only")]
    from semanticgen.ops import WindowLayout

    usable, _ = _attention_backends(device)
    if not usable:
        return [Row("int64", "int64 offsets", device, status=SKIP, detail="no CUDA backend is available")]
    tv, sv, ts, ss, tw = INT64_LAYOUT
    streams = WindowLayout(tv, sv, ts, ss, tw)
    n, h, d = streams.num_tokens, INT64_HEADS, INT64_HEAD_DIM
    layout_id = f"({tv},{sv},{ts},{ss},{tw}) B1 H{h} D{d}, {n * h * d:,} elements"
    rows = []
    for backend in usable:
        dtypes = _backend_dtypes(backend) or (torch.bfloat16,)
        dtype = next((dt for dt in (torch.bfloat16, torch.float16, torch.float32) if dt in dtypes), None)
        name = f"{backend} fwd, q > 2^31 elements"
        if dtype is None:
            rows.append(Row("int64", name, device, layout=layout_id, status=SKIP, detail="no bf16/fp16/fp32"))
            continue
        if section.over_budget():
            rows.append(section.budget_row(name, device, dtype=_dname(dtype), layout=layout_id))
            continue
        # q, k, v and out, plus a gathered copy of each for backends that reorder streams-order inputs.
        need = 8 * n * h * d * torch.finfo(dtype).bits // 8
        free = torch.cuda.mem_get_info()[0]
        if free < need * 1.1:
            rows.append(Row("int64", name, device, _dname(dtype), layout_id, status=SKIP,
                            detail=f"needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"))  # fmt: skip
            continue
        try:
            rows.append(_int64_row(backend, streams, dtype, name, layout_id, "cuda", h, d))
        except Exception as exc:
            rows.append(Row("int64", name, device, _dname(dtype), layout_id, status=FAIL, detail=_short(exc)))
        finally:
            with contextlib.suppress(RuntimeError):  # after a device fault even this raises; the row says why
                torch.cuda.empty_cache()
    return rows


def _int64_row(backend, streams, dtype, name, layout_id, device, heads, head_dim) -> Row:
    """Forward of one backend on a big layout, both parities and token orders, a few windows checked.

    ``q, k, v`` are ``[1, N, heads, head_dim]`` with ``N = streams.num_tokens``, drawn on ``device``.
    """
    from semanticgen.ops import swin_attention

    n, h, d = streams.num_tokens, heads, head_dim
    gen = torch.Generator(device=device).manual_seed(_seed("int64", backend))
    # Random tokens are as random in blocked order as in streams order: one set of inputs serves both.
    q, k, v = (torch.randn(1, n, h, d, device=device, dtype=dtype, generator=gen) for _ in range(3))
    scale = 1.0 / math.sqrt(d)
    sub, failures, declined, worst = {}, [], [], None
    try:
        reason = _backend_rejects(backend, q)
        if reason is not None:
            return Row("int64", name, device, _dname(dtype), layout_id, status=SKIP, detail=reason)
        for order in ("streams", "blocked"):
            layout = streams.with_order(order)
            for shifted in (False, True):
                parity = "shifted" if shifted else "unshifted"
                try:
                    out = swin_attention(q, k, v, layout, shifted=shifted, backend=backend)
                except (ValueError, TypeError) as exc:  # the backend declines this order / parity
                    declined.append((f"{parity}/{order}", _short(exc)))
                    continue
                num_windows = layout.num_windows(shifted)
                last_token_window = int(layout.window_ids(shifted)[-1])  # holds the tensor's last rows
                for w in sorted({0, num_windows // 2, num_windows - 1, last_token_window}):
                    idx = _window_tokens(layout, shifted, w, device)
                    qw, kw, vw = (t.index_select(1, idx) for t in (q, k, v))
                    exact = _dense_window(qw.double(), kw.double(), vw.double(), scale)
                    plain = rel_error(_dense_window(qw, kw, vw, scale), exact)
                    fused = _quietly(lambda qw=qw, kw=kw, vw=vw, exact=exact: rel_error(_sdpa(qw, kw, vw), exact))
                    err = rel_error(out.index_select(1, idx), exact)
                    bound = bound_from_plain(max(plain, fused or 0.0), dtype)
                    tag = f"{parity}/{order}/window {w} of {num_windows} (rows {int(idx.min()):,}..{int(idx.max()):,})"
                    sub[tag] = {"error": err, "bound": bound}
                    if not err <= bound:
                        failures.append(f"{tag}: {err:.3g} > {bound:.3g}")
                    if worst is None or err / bound > worst[0] / worst[1]:
                        worst = (err, bound, tag)
                del out
    finally:
        del q, k, v
    if worst is None:
        return Row("int64", name, device, _dname(dtype), layout_id, status=SKIP,
                   detail=f"backend declined: {declined[0][1]}" if declined else "nothing ran")  # fmt: skip
    detail = "; ".join(failures[:2]) or f"worst: {worst[2]} ({len(sub)} windows checked)"
    if declined:
        detail += f"; declined {', '.join(t for t, _ in declined)}"
    return Row(
        "int64", name, device, _dname(dtype), layout_id, error=worst[0], bound=worst[1],
        status=FAIL if failures else PASS, detail=detail, data={"sub_checks": sub},
    )  # fmt: skip


# ----------------------------------------------------------------------------------------- flow ops
FLOW_SHAPES = ((3, 37), (2, 5, 7, 1001))
LOSS_SHAPES = ((3, 37), (2, 3, 32771))


def _flow_cases(device: str, dtype: torch.dtype) -> Iterator[tuple[str, str, Callable[[], list[tuple]]]]:
    """``(op name, shape id, fn)``; ``fn() -> [(ours, plain, exact, out_dtype)]`` for the op's outputs."""
    from semanticgen.ops import flow

    def rnd(gen, shape, scale=1.0):
        return _randn(shape, gen, dtype, device, scale)

    def per_batch(gen, shape, lo, hi):
        """One fp32 value per batch element on the device, and its fp64 / eager broadcast forms."""
        t = (lo + (hi - lo) * torch.rand(shape[0], generator=gen, dtype=torch.float64)).float().to(device)
        view = (-1, *([1] * (len(shape) - 1)))
        return t, t.double().view(view), t.to(dtype).view(view)

    for shape in FLOW_SHAPES:
        sid = "x".join(map(str, shape))

        def euler(shape=shape):
            gen = torch.Generator().manual_seed(_seed("euler_step", dtype, shape))
            z, v = rnd(gen, shape), rnd(gen, shape, 3.0)
            dt, dt64, dt_lo = per_batch(gen, shape, -0.3, -0.01)
            return [(flow.euler_step(z, v, dt), z + dt_lo * v, z.double() + dt64 * v.double(), dtype)]

        def euler_inplace(shape=shape):
            gen = torch.Generator().manual_seed(_seed("euler_step_", dtype, shape))
            z, v = rnd(gen, shape), rnd(gen, shape, 3.0)
            dt = -0.0625  # a float dt: passed by value, exactly representable in every dtype
            exact, plain = z.double() + dt * v.double(), z + dt * v
            ours = z.clone()
            returned = flow.euler_step_(ours, v, dt)
            if returned.data_ptr() != ours.data_ptr():
                raise AssertionError("euler_step_ did not return its (updated) input")
            return [(ours, plain, exact, dtype)]

        def cfg(shape=shape):
            gen = torch.Generator().manual_seed(_seed("cfg_euler_step", dtype, shape))
            z, vc, vu = rnd(gen, shape), rnd(gen, shape, 2.0), rnd(gen, shape, 2.0)
            dt, dt64, dt_lo = per_batch(gen, shape, -0.3, -0.01)
            g = 4.5  # exactly representable: the same guidance in every computation
            exact = z.double() + dt64 * (vu.double() + g * (vc.double() - vu.double()))
            return [(flow.cfg_euler_step(z, vc, vu, g, dt), z + dt_lo * (vu + g * (vc - vu)), exact, dtype)]

        def noising(shape=shape):
            gen = torch.Generator().manual_seed(_seed("flow_noising", dtype, shape))
            z0, eps = rnd(gen, shape, 0.5), rnd(gen, shape)
            t, t64, t_lo = per_batch(gen, shape, 0.0, 1.0)
            z_t, u = flow.flow_noising(z0, eps, t)
            return [
                (z_t, (1 - t_lo) * z0 + t_lo * eps, (1 - t64) * z0.double() + t64 * eps.double(), dtype),
                (u, eps - z0, eps.double() - z0.double(), dtype),
            ]

        yield "euler_step", sid, euler
        yield "euler_step_", sid, euler_inplace
        yield "cfg_euler_step", sid, cfg
        yield "flow_noising", sid, noising

    for shape in LOSS_SHAPES:
        sid = "x".join(map(str, shape))

        def loss(shape=shape, grad=False):
            gen = torch.Generator().manual_seed(_seed("flow_matching_loss", dtype, shape))
            v, z0, eps = rnd(gen, shape), rnd(gen, shape), rnd(gen, shape)
            v64 = v.double().requires_grad_()
            exact = ((v64 - (eps.double() - z0.double())) ** 2).mean()
            v_ours, v_plain = v.clone().requires_grad_(), v.clone().requires_grad_()
            ours = flow.flow_matching_loss(v_ours, z0, eps)
            plain = torch.nn.functional.mse_loss(v_plain, eps - z0)
            if ours.dtype != torch.float32 or ours.shape != ():
                raise AssertionError(f"loss is {ours.dtype} {tuple(ours.shape)}, expected a 0-d float32")
            if not grad:
                return [(ours, plain, exact, torch.float32)]
            (g_exact,) = torch.autograd.grad(exact, v64)
            (g_ours,) = torch.autograd.grad(ours, v_ours)
            (g_plain,) = torch.autograd.grad(plain, v_plain)
            return [(g_ours, g_plain, g_exact, dtype)]

        yield "flow_matching_loss", sid, loss
        yield "flow_matching_loss grad", sid, lambda loss=loss: loss(grad=True)


def flow_section(device: str, quick: bool, section: _Section) -> list[Row]:
    from semanticgen._extension import REBUILD_HINT, extension_error

    if extension_error() is not None:
        return [
            Row("flow", "semanticgen._C", device, status=FAIL,
                detail=f"compiled extension failed to import ({extension_error()}). {REBUILD_HINT}".replace("\n", " "))
        ]  # fmt: skip
    rows = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        by_op: dict[str, list] = {}
        for op, sid, fn in _flow_cases(device, dtype):
            by_op.setdefault(op, []).append((sid, fn))
        for op, runs in by_op.items():
            if section.over_budget():
                rows.append(section.budget_row(op, device, dtype=_dname(dtype)))
                continue
            rows.append(_flow_row(op, runs, dtype, device))
    return rows


def _flow_row(op: str, runs, dtype: torch.dtype, device: str) -> Row:
    shapes = ", ".join(sid for sid, _ in runs)
    sub, failures, worst = {}, [], None
    try:
        for sid, fn in runs:
            for i, (ours, plain, exact, out_dtype) in enumerate(fn()):
                if ours.dtype != out_dtype or ours.shape != exact.shape:
                    raise AssertionError(f"{sid}: result {ours.dtype} {tuple(ours.shape)}, expected {out_dtype}")
                err = rel_error(ours, exact)
                bound = bound_from_plain(rel_error(plain, exact), out_dtype)
                if op == "flow_matching_loss":
                    bound = max(bound, FLOOR_ULPS * torch.finfo(torch.float32).eps)
                tag = f"{sid}" + (f" output {i}" if i else "")
                sub[tag] = {"error": err, "bound": bound}
                if not err <= bound:
                    failures.append(f"{tag}: {err:.3g} > {bound:.3g}")
                if worst is None or err / bound > worst[0] / worst[1]:
                    worst = (err, bound, tag)
    except Exception as exc:
        return Row("flow", op, device, _dname(dtype), shapes, status=FAIL, detail=_short(exc))
    return Row(
        "flow", op, device, _dname(dtype), shapes, error=worst[0], bound=worst[1],
        status=FAIL if failures else PASS, detail="; ".join(failures[:2]) or f"worst: {worst[2]}",
        data={"sub_checks": sub},
    )  # fmt: skip


# ------------------------------------------------------------------------------- no sync, CUDA graph
GRAPH_SHAPE = (2, 4, 3, 17, 29)  # [B, C, T, H, W], odd sizes
GRAPH_STEPS = 6


def sampling_loop(device: str, dtype: torch.dtype) -> tuple[torch.Tensor, Callable, Callable]:
    """``(z_init [GRAPH_SHAPE], sample, sample_plain)`` of a guided Euler sampling loop.

    ``sample(z)`` runs the loop with the fused ops, in place on ``z``; ``sample_plain(z)`` runs the same
    maths in plain torch at ``z``'s dtype (pass a float64 ``z`` for the reference). Timesteps, step sizes
    and guidance are device tensors and the stand-in velocity is elementwise, so the fused loop has no
    reason to synchronise with the host and replays bitwise from a CUDA graph.
    """
    from semanticgen.ops import flow

    gen = torch.Generator().manual_seed(_seed("graph"))
    batch, channels = GRAPH_SHAPE[0], GRAPH_SHAPE[1]
    z_init = _randn(GRAPH_SHAPE, gen, dtype, device)
    w = _randn((1, channels, 1, 1, 1), gen, dtype, device, 0.5)
    bias_c, bias_u = (_randn((1, channels, 1, 1, 1), gen, dtype, device) for _ in range(2))
    ts = torch.linspace(1.0, 0.0, GRAPH_STEPS + 1, device=device)
    dts = ts[1:] - ts[:-1]  # negative, on the device: steps read them there
    guidance = torch.full((batch,), 4.5, device=device)

    def velocity(z, t, bias):
        # A stand-in for the model: elementwise only, so eager and replay run bitwise-identical kernels.
        return torch.tanh(z * w.to(z.dtype) + t.to(z.dtype) * bias.to(z.dtype))

    def sample(z):
        for i in range(GRAPH_STEPS - 1):
            flow.cfg_euler_step(z, velocity(z, ts[i], bias_c), velocity(z, ts[i], bias_u), guidance, dts[i], out=z)
        flow.euler_step_(z, velocity(z, ts[-2], bias_c), dts[-1])  # the last step unguided
        return z

    def sample_plain(z):
        dt_z, g_z = dts.to(z.dtype), guidance.to(z.dtype).view(-1, 1, 1, 1, 1)
        for i in range(GRAPH_STEPS - 1):
            v_c, v_u = velocity(z, ts[i], bias_c), velocity(z, ts[i], bias_u)
            z = z + dt_z[i] * (v_u + g_z * (v_c - v_u))
        return z + dt_z[-1] * velocity(z, ts[-2], bias_c)

    return z_init, sample, sample_plain


def graph_section(device: str, quick: bool, section: _Section) -> list[Row]:
    names = ("sampling loop without host sync", "sampling loop vs fp64", "CUDA graph capture", "graph replay == eager")
    if device != "cuda":
        return [Row("graph", n, device, status=SKIP, detail="CUDA only") for n in names]
    from semanticgen._extension import extension_error

    if extension_error() is not None:
        return [Row("graph", n, device, status=SKIP, detail="needs semanticgen._C (see the flow FAIL)") for n in names]
    dtype, layout_id = torch.bfloat16, "x".join(map(str, GRAPH_SHAPE)) + f", {GRAPH_STEPS} steps"
    z_init, sample, sample_plain = sampling_loop(device, dtype)
    rows = []
    z_eager = z_init.clone()
    try:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            sample(z_eager)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        rows.append(Row("graph", names[0], device, _dname(dtype), layout_id, status=PASS,
                        detail="set_sync_debug_mode('error') raised nothing"))  # fmt: skip
    except Exception as exc:
        rows.append(Row("graph", names[0], device, _dname(dtype), layout_id, status=FAIL, detail=_short(exc)))
    try:
        # The loop must do the right work, or a bitwise-equal replay would prove nothing.
        exact = sample_plain(z_init.double())
        err, plain = rel_error(z_eager, exact), rel_error(sample_plain(z_init.clone()), exact)
        bound = bound_from_plain(plain, dtype)
        rows.append(Row("graph", names[1], device, _dname(dtype), layout_id, error=err, bound=bound,
                        status=PASS if err <= bound else FAIL))  # fmt: skip
    except Exception as exc:
        rows.append(Row("graph", names[1], device, _dname(dtype), layout_id, status=FAIL, detail=_short(exc)))
    try:
        z_static = z_init.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs recommends
            sample(z_init.clone())
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            sample(z_static)
        rows.append(Row("graph", names[2], device, _dname(dtype), layout_id, status=PASS))
    except Exception as exc:
        rows.append(Row("graph", names[2], device, _dname(dtype), layout_id, status=FAIL, detail=_short(exc)))
        rows.append(Row("graph", names[3], device, _dname(dtype), layout_id, status=SKIP, detail="capture failed"))
        return rows
    try:
        diffs = []
        for _ in range(2):  # twice: a replay must not depend on state the previous one left
            z_static.copy_(z_init)
            graph.replay()
            torch.cuda.synchronize()
            diffs.append((z_static.double() - z_eager.double()).abs().max().item())
        err = max(diffs)
        status, detail = (PASS, "bitwise equal, 2 replays") if err == 0 else (FAIL, "replay differs from eager")
        rows.append(Row("graph", names[3], device, _dname(dtype), layout_id, error=err, bound=0.0, status=status,
                        detail=detail))  # fmt: skip
    except Exception as exc:
        rows.append(Row("graph", names[3], device, _dname(dtype), layout_id, status=FAIL, detail=_short(exc)))
    return rows


# ------------------------------------------------------------------------------------------- timing
def timing_sizes(device: str, quick: bool) -> tuple[tuple[int, int], tuple[float, ...], int, int, torch.dtype, int]:
    """``((height, width), seconds, heads, head_dim, dtype, largest N to time full attention at)``.

    CUDA: the plan's 480x832 geometry (1,560 VAE tokens per latent frame, Tw=20) up to 60 s (~586K
    tokens), 4 heads so full attention at 293K tokens stays under a second per call. CPU: the same
    time axis at a small resolution.
    """
    if device == "cuda":
        return (480, 832), (10.0, 30.0, 60.0), 4, 128, torch.bfloat16, 300_000
    if quick:
        return (64, 112), (10.0, 30.0, 60.0), 2, 64, torch.float32, 6_000
    return (128, 224), (10.0, 30.0, 60.0), 2, 64, torch.float32, 8_000


def _plan_layout(seconds: float, height: int, width: int):
    from semanticgen import planning
    from semanticgen.ops import WindowLayout

    p = planning.plan(seconds, height, width)
    return WindowLayout(
        p.latent_frames, p.vae_tokens_per_frame, p.sem_frames, p.sem_tokens_per_frame if p.sem_frames else 1, p.window
    )


def _time_ms(fn: Callable[[], object], device: str, quick: bool) -> float:
    """Median milliseconds per call: ``triton.testing.do_bench`` on CUDA, a few timed calls on CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # warm-up: first-call allocations and lazy initialisation
    times = []
    for _ in range(3 if quick else 5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@contextlib.contextmanager
def _full_attention_kernel(device: str):
    """Force SDPA's flash kernel on CUDA (the strongest dense baseline torch has); default on CPU."""
    if device != "cuda":
        yield "sdpa"
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        yield "sdpa-flash"


def timing_section(device: str, quick: bool, section: _Section) -> list[Row]:
    (height, width), seconds_list, heads, head_dim, dtype, full_max_n = timing_sizes(device, quick)
    usable, unusable = _attention_backends(device)
    rows = [Row("timing", name, device, status=SKIP, detail=reason) for name, reason in unusable]
    if device == "cpu" and "triton" in usable:
        usable.remove("triton")
        rows.append(Row("timing", "triton", device, status=SKIP, detail="Triton interpreter: not a performance path"))
    measured_full: list[tuple[int, float]] = []  # (N, ms) of every full-attention measurement
    for seconds in seconds_list:
        layout = _plan_layout(seconds, height, width)
        layout_id = f"{seconds:g} s {height}x{width}: N={layout.num_tokens:,}, Tw={layout.window}, H{heads} D{head_dim}"
        if section.over_budget():
            rows.append(section.budget_row("timing", device, dtype=_dname(dtype), layout=layout_id))
            continue
        rows += _time_size(layout, layout_id, usable, heads, head_dim, dtype, full_max_n, measured_full, device, quick)
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _time_size(layout, layout_id, backends, heads, head_dim, dtype, full_max_n, measured_full, device, quick):
    """Rows for full attention and every backend (both token orders) at one size.

    Appends ``(N, ms)`` to ``measured_full`` when it times full attention, for later extrapolation.
    """
    n = layout.num_tokens
    # Drawn on the device: at 586K tokens a CPU draw would take seconds per tensor, and values do not matter.
    gen = torch.Generator(device=device).manual_seed(_seed("timing", n))
    q, k, v = (torch.randn(1, n, heads, head_dim, generator=gen, dtype=dtype, device=device) for _ in range(3))
    rows = []
    full_ms, extrapolated, full_name = None, False, "full attention"
    try:
        with _full_attention_kernel(device) as kernel:
            full_name = f"full attention ({kernel})"
            if n <= full_max_n:
                qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, N, D] views

                def full():
                    with torch.no_grad():
                        torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)

                full_ms = _time_ms(full, device, quick)
                measured_full.append((n, full_ms))
            elif measured_full:
                # Dense attention is O(N^2): extrapolate from the largest size it was timed at.
                n0, ms0 = measured_full[-1]
                full_ms, extrapolated = ms0 * (n / n0) ** 2, True
        note = f"extrapolated by N^2 from N={measured_full[-1][0]:,}" if extrapolated else ""
        rows.append(Row("timing", full_name, device, _dname(dtype), layout_id, detail=note,
                        data={"ms": full_ms, "tokens": n, "extrapolated": extrapolated}))  # fmt: skip
    except Exception as exc:
        rows.append(Row("timing", full_name, device, _dname(dtype), layout_id, status=FAIL, detail=_short(exc)))
    for backend in backends:
        for order in ("streams", "blocked"):
            rows.append(_time_backend(backend, layout.with_order(order), q, k, v, layout_id, full_ms, extrapolated,
                                      device, quick))  # fmt: skip
    return rows


def _time_backend(backend, layout, q, k, v, layout_id, full_ms, extrapolated, device, quick) -> Row:
    """One backend's forward in ``layout.order`` (both parities per call, reported per call)."""
    from semanticgen.ops import swin_attention

    name, dtype = f"{backend} fwd, {layout.order} order", q.dtype
    reason = _backend_rejects(backend, q)
    if reason is not None:
        return Row("timing", name, device, _dname(dtype), layout_id, status=SKIP, detail=reason)

    def windowed():
        # Both parities per call, as a model alternates them.
        with torch.no_grad():
            swin_attention(q, k, v, layout, shifted=False, backend=backend)
            swin_attention(q, k, v, layout, shifted=True, backend=backend)

    try:
        windowed()  # outside the timing: builds the layout's index tables, compiles, autotunes
        ms = _time_ms(windowed, device, quick) / 2
    except (ValueError, TypeError) as exc:
        return Row("timing", name, device, _dname(dtype), layout_id, status=SKIP, detail=_short(exc))
    except Exception as exc:
        return Row("timing", name, device, _dname(dtype), layout_id, status=FAIL, detail=_short(exc))
    speedup = full_ms / ms if full_ms is not None else None
    detail = (f"{speedup:.1f}x full attention" if speedup else "") + (" (extrapolated)" if extrapolated else "")
    return Row("timing", name, device, _dname(dtype), layout_id, detail=detail,
               data={"ms": ms, "full_ms": full_ms, "speedup": speedup, "tokens": layout.num_tokens,
                     "order": layout.order, "extrapolated": extrapolated})  # fmt: skip


# ------------------------------------------------------------------------------------------- driver
_SECTION_FNS = {
    "attention": attention_section,
    "int64": int64_section,
    "flow": flow_section,
    "graph": graph_section,
    "timing": timing_section,
}


def device_unavailable(device: str) -> str | None:
    """Why ``device`` cannot run the selftest here (``None`` when it can)."""
    if device == "cuda" and not torch.cuda.is_available():
        return "--device cuda: no CUDA device is available on this machine"
    if device not in ("cpu", "cuda"):
        return f"--device must be 'cpu' or 'cuda', got {device!r}"
    return None


def run_selftest(
    device: str, *, quick: bool = False, sections: Sequence[str] = SECTIONS, log: Callable[[str], None] = print
) -> tuple[list[Row], dict[str, float]]:
    """Run the sections in order; returns every row and the seconds each section took.

    Args:
        device: ``"cpu"`` or ``"cuda"`` (checked by :func:`device_unavailable` first).
        quick: the lighter matrix (CPU: small timing sizes).
        sections: subset of :data:`SECTIONS`.
        log: called with one progress line per section.
    """
    reason = device_unavailable(device)
    if reason is not None:
        raise ValueError(reason)
    unknown = [s for s in sections if s not in _SECTION_FNS]
    if unknown:
        raise ValueError(f"unknown selftest section(s) {unknown}; expected some of {list(SECTIONS)}")
    budgets = _BUDGET_S[(device, bool(quick))]
    rows: list[Row] = []
    elapsed: dict[str, float] = {}
    for name in SECTIONS:
        if name not in sections:
            continue
        log(f"selftest {name}: running (budget {budgets[name]} s)")
        section = _Section(name, budgets[name])
        try:
            section_rows = _SECTION_FNS[name](device, quick, section)
            _sync(device)  # an asynchronous device fault surfaces here, charged to the section that caused it
        except Exception as exc:  # a section that crashes outside its own checks still yields a verdict
            section_rows = [Row(name, f"{name} section", device, status=FAIL, detail=_short(exc))]
        elapsed[name] = section.elapsed
        counts = {s: sum(r.status == s for r in section_rows) for s in (PASS, FAIL, SKIP)}
        log(f"selftest {name}: {counts[PASS]} pass, {counts[FAIL]} fail, {counts[SKIP]} skip in {elapsed[name]:.1f} s")
        rows += section_rows
    return rows, elapsed


# ------------------------------------------------------------------------------------------- output
def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isnan(x) or math.isinf(x):
        return str(x)
    return f"{x:.3g}"


def _fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x:,.2f}" if x < 100 else f"{x:,.0f}"


def verdict(rows: Sequence[Row], elapsed: dict[str, float], device_name: str) -> str:
    counts = {s: sum(r.status == s for r in rows) for s in (PASS, FAIL, SKIP)}
    word = "FAIL" if counts[FAIL] else "PASS"
    return (
        f"selftest {word}: {counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped "
        f"in {sum(elapsed.values()):.1f} s on {device_name}"
    )


def print_report(rows: Sequence[Row], elapsed: dict[str, float], device_name: str, console) -> None:
    """The check table, the timing table and the verdict line, on a rich console."""
    from rich.markup import escape
    from rich.table import Table

    style = {PASS: "green", FAIL: "bold red", SKIP: "yellow"}
    checks = Table(
        title="semanticgen selftest: checks",
        caption="error = max|x - ref64| / max|ref64|; bound = 2x the error of plain torch at the same dtype",
    )
    for col, justify in (("section", "left"), ("check", "left"), ("device", "left"), ("dtype", "left"),
                         ("layout", "left"), ("error", "right"), ("bound", "right"), ("status", "left"),
                         ("detail", "left")):  # fmt: skip
        checks.add_column(col, justify=justify, overflow="fold")
    for r in rows:
        if r.section == "timing" and r.status == PASS:
            continue
        checks.add_row(
            r.section, escape(r.name), r.device, r.dtype, escape(r.layout), _fmt(r.error), _fmt(r.bound),
            f"[{style[r.status]}]{r.status}[/]", escape(r.detail),
        )  # fmt: skip
    console.print(checks)
    timed = [r for r in rows if r.section == "timing" and r.status == PASS]
    if timed:
        table = Table(title="semanticgen selftest: timing (forward, ms per call, mean of both parities)")
        for col in ("implementation", "size", "dtype", "ms", "full attention ms", "speedup", "note"):
            table.add_column(col, justify="right" if col in ("ms", "full attention ms", "speedup") else "left")
        for r in timed:
            full = r.data.get("full_ms")
            is_full = r.name.startswith("full attention")
            star = "*" if r.data.get("extrapolated") else ""
            table.add_row(
                escape(r.name), escape(r.layout), r.dtype, _fmt_ms(r.data.get("ms")) + (star if is_full else ""),
                "-" if is_full or full is None else _fmt_ms(full) + star,
                "-" if is_full or not r.data.get("speedup") else f"{r.data['speedup']:.1f}x",
                escape(r.detail),
            )  # fmt: skip
        console.print(table)
        if any(r.data.get("extrapolated") for r in timed):
            console.print("* full attention extrapolated by N^2 from the largest size it was timed at")
    times = ", ".join(f"{k} {v:.1f} s" for k, v in elapsed.items())
    console.print(f"section times: {times}")
    failed = [r for r in rows if r.status == FAIL]
    if failed:
        # After a device fault every later check fails with the same error: the first failure is the cause.
        first = failed[0]
        console.print(f"first failure: {first.section} / {escape(first.name)} / {escape(first.layout)}: "
                      f"{escape(first.detail)}")  # fmt: skip
    word_style = "bold red" if failed else "bold green"
    console.print(f"[{word_style}]{escape(verdict(rows, elapsed, device_name))}[/]")


def environment(device: str) -> dict[str, Any]:
    """Machine and versions for the JSON file."""
    from semanticgen import bench
    from semanticgen._extension import built_cuda_archs, extension_error

    env = bench.environment(device)
    env["torch_cuda"] = torch.version.cuda
    env["extension"] = "loaded" if extension_error() is None else f"MISSING: {extension_error()}"
    env["extension_cuda_archs"] = built_cuda_archs()
    if device == "cuda":
        env["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return env


def _json_number(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)  # "inf" / "nan": strict JSON has no such numbers
    if isinstance(x, dict):
        return {k: _json_number(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_number(v) for v in x]
    return x


def report_json(
    rows: Sequence[Row], elapsed: dict[str, float], device: str, quick: bool, device_name: str
) -> dict[str, Any]:
    """Everything the run measured, JSON-ready."""
    return _json_number(
        {
            "verdict": "FAIL" if any(r.status == FAIL for r in rows) else "PASS",
            "summary": verdict(rows, elapsed, device_name),
            "device": device,
            "quick": quick,
            "section_seconds": elapsed,
            "environment": environment(device),
            "rows": [dataclasses.asdict(r) for r in rows],
        }
    )


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    from semanticgen import bench

    return f"CPU ({bench._cpu_model()}, {torch.get_num_threads()} threads)"
