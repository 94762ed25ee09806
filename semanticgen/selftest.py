"""Acceptance run for a new machine: ``semanticgen selftest [--device cuda|cpu] [--quick] [--json FILE]``.

One command checks, on one device, everything a broken build or a wrong kernel would break, and prints
a verdict table. Sections (``--only`` picks some):

* ``attention``: every ``swin_attention`` backend the registry reports as usable on the device (except
  ``reference``, the oracle) against the fp64 dense reference: forward and ``dq, dk, dv``, both window
  parities, both token orders, bf16/fp16/fp32 on awkward layouts; on CUDA also fp32 with TF32 matmuls
  allowed (``torch.backends.cuda.matmul.allow_tf32``), judged against plain torch under the same setting.
* ``int64``: (CUDA) a forward whose q has more than ``2**31`` elements, checked on a few windows.
* ``flow``: the compiled rectified-flow ops of :mod:`semanticgen.ops.flow` against fp64 formulas, and the
  gradients of every differentiable one (``euler_step``, ``cfg_euler_step``, ``flow_noising``,
  ``flow_matching_loss``) with respect to every tensor input. A missing ``semanticgen._C`` is a failure.
* ``graph``: (CUDA) a guided sampling loop of fused ops runs without a host sync and replays from a
  CUDA graph with the eager result.
* ``timing``: every backend against full attention (SDPA) at three sizes, up to the 60 s 480p plan.

Verdict and exit status (``EXIT_CODES_HELP``; :func:`exit_code`):

* ``PASS`` (exit 0): every check that ran passed and none was cut.
* ``FAIL`` (exit 1): at least one check failed: an error above its bound, a wrong dtype or shape, or any
  exception raised by a backend or op after it accepted the inputs. A failure wins over a cut.
* exit 2: the command was misused (bad flag, the requested device is absent); no check ran.
* ``INCOMPLETE`` (exit 3): nothing failed, but a section ran out of its time budget and checks were cut
  (rows ``CUT``; the JSON lists them under ``"cut"``). Not a pass: the cut checks proved nothing.

A ``SKIP`` does not change the verdict, so only declarations may produce one: a backend the registry
reports unavailable on the device, an input the backend's declared capability refuses
(``Backend.rejects``: its dtypes and its ``accepts`` predicate, asked before the call), or a check
that needs CUDA on a CPU run. Nothing raised by a backend becomes a SKIP.

Timing rows never count as passed: each is ``INFO`` (informational) or, where the project states a
target (``semanticgen.benchmarks.swin_attention_gpu.TARGETS``: the speedup over full attention at the
60 s size, blocked order, on CUDA), ``MET`` or ``MISSED``. Targets are reported, not part of the
exit status. Each timed row records the median, min and max over its repeats and is flagged ``noisy``
when its slowest repeat took more than ``SPREAD_BOUND`` times its fastest.

Accuracy rule (the flash-attn test rule): the error of a result is its max-abs deviation from the fp64
result, normalised by the max-abs of the fp64 result::

    err(x) = max|x - ref64| / max|ref64|

and it must be finite and at most twice the error of the same computation done by plain torch at the
same dtype. For attention, plain torch's error is the larger of its two ways of computing it in that
dtype: the dense-mask reference (einsum, softmax, einsum) and ``scaled_dot_product_attention`` with the
window mask (its math kernel in the TF32 case). Both are needed: in fp32 the dense reference keeps every
intermediate in fp32 and can be up to 4x more accurate than a blocked online-softmax kernel (measured
against torch's own CPU flash kernel), while in bf16/fp16 it rounds scores and probabilities to the
input dtype and is the less accurate one. For the flow ops it is the eager expression in that dtype
(its autograd for the gradients). Where plain torch's error is exactly 0 the bound is a floor of 4 ulps
of the output's magnitude (``4 * eps(dtype)``). The flow-matching loss is an fp32 scalar whatever the
input dtype; its bound also never drops below 4 fp32 ulps (the op's documented accuracy). A gradient
with respect to a per-batch scalar (``dt``, ``t``, ``guidance``) is an fp32 sum over elements whose
rounding depends on summation order and scales with the sum of its terms' magnitudes, not with its value:
its bound never drops below 4 fp32 ulps of that sum. Every check draws fresh inputs from its own seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from semanticgen.environment import cpu_model, environment  # the record the benchmarks write too
from semanticgen.timing import SPREAD_BOUND

__all__ = [
    "SECTIONS",
    "Row",
    "run_selftest",
    "print_report",
    "report_json",
    "device_unavailable",
    "verdict_word",
    "exit_code",
    "EXIT_CODES_HELP",
]

# Run order. int64 goes last: a kernel that overflows 32-bit offsets may fault, and a CUDA fault poisons
# the context for every check after it.
SECTIONS = ("attention", "flow", "graph", "timing", "int64")
# Row statuses. Checks: PASS, FAIL, SKIP (declared: unavailable, refused by capability, CUDA only), CUT
# (not run: the section's time budget was spent). Timing rows: INFO, MET, MISSED (or FAIL/SKIP/CUT).
PASS, FAIL, SKIP, CUT = "PASS", "FAIL", "SKIP", "CUT"
INFO, MET, MISSED = "INFO", "MET", "MISSED"
TIMING_STATUSES = (INFO, MET, MISSED)
STATUSES = (PASS, FAIL, SKIP, CUT, *TIMING_STATUSES)
INCOMPLETE = "INCOMPLETE"
EXIT_PASS, EXIT_FAIL, EXIT_USAGE, EXIT_INCOMPLETE = 0, 1, 2, 3
EXIT_CODES_HELP = (
    "Exit status: 0 PASS (every check that ran passed, none was cut); 1 FAIL (a check failed, including any "
    "exception raised by a backend after it accepted the inputs; wins over a cut); 2 usage error (bad flag, "
    "requested device absent); 3 INCOMPLETE (no failure, but a section's time budget ran out and checks were "
    "cut, listed as CUT). Timing rows are informational or targets (met/missed) and never change the exit status."
)
FLOOR_ULPS = 4
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}

# Seconds each section may spend before it stops starting new checks (the rest become CUT rows and the
# verdict INCOMPLETE). CUDA: the whole run must fit 5 minutes on one H100/H200 with Triton compiles
# included (about 20 s per (dtype, head dim, TF32) set of the attention matrix), so the full budgets
# add up to 270 s, leaving the last check of each section room to finish and the process to start.
# CPU --quick: about 30 s on 2 quiet cores, 70 s at a load average of 4 (attention 50 s, timing 17 s); the
# budgets allow 3 minutes so that a machine shared with other work completes instead of cutting checks.
_BUDGET_S = {
    ("cuda", True): {"attention": 125, "int64": 30, "flow": 20, "graph": 15, "timing": 40},
    ("cuda", False): {"attention": 145, "int64": 35, "flow": 25, "graph": 15, "timing": 50},
    ("cpu", True): {"attention": 100, "int64": 5, "flow": 25, "graph": 5, "timing": 45},
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
        status: one of :data:`STATUSES`: ``"PASS"``, ``"FAIL"``, ``"SKIP"`` (declared: see the module
            docstring), ``"CUT"`` (not run: time budget spent); timing rows ``"INFO"``, ``"MET"``, ``"MISSED"``.
        detail: why it failed, was skipped or cut, or what the worst sub-check was.
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
        """A ``CUT`` row: the check was not run because this section's time budget is spent."""
        detail = f"not run: the {self.name} section's time budget ({self.budget_s:.0f} s) was spent"
        return Row(self.name, name, device, status=CUT, detail=detail, **kw)


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
    """One attention input configuration; it is run for both parities and both token orders.

    ``tf32``: run the backend and plain torch with ``torch.backends.cuda.matmul.allow_tf32 = True`` (fp32
    inputs, CUDA only); the fp64 oracle is unaffected.
    """

    layout_name: str
    batch: int
    heads: int
    head_dim: int
    dtype: torch.dtype
    tf32: bool = False

    @property
    def dims(self) -> tuple[int, int, int, int, int]:
        return LAYOUTS[self.layout_name]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, N, H, D)`` of q, k and v."""
        tv, sv, ts, ss, tw = self.dims
        return (self.batch, tv * sv + ts * ss, self.heads, self.head_dim)

    @property
    def layout_id(self) -> str:
        tv, sv, ts, ss, tw = self.dims
        tf32 = ", TF32 matmuls" if self.tf32 else ""
        return f"{self.layout_name} ({tv},{sv},{ts},{ss},{tw}) B{self.batch} H{self.heads} D{self.head_dim}{tf32}"


def attention_cases(device: str, quick: bool) -> list[AttnCase]:
    """The check matrix.

    Few distinct (dtype, head dim) pairs: each costs a set of Triton compiles (every autotune config of
    four kernels) on CUDA. Triton also specialises integer arguments on ``== 1`` and divisibility by 16,
    so every layout here has ``N % 16 != 0`` and no case has one head: one compile set per pair. The TF32
    case is one more set (fp32 dots in TF32 are another kernel); it follows the quick matrix, so a run
    that is cut loses the repeats of already-compiled pairs first.
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
        AttnCase("multi-tile", 2, 2, 64, fp32, tf32=True),
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


def _backend(name: str):
    """The registered :class:`~semanticgen.ops.swin_attention.Backend` called ``name`` (``None`` if none)."""
    from semanticgen.ops.swin_attention import registered_backends

    return registered_backends().get(name)


def _backend_dtypes(name: str) -> tuple[torch.dtype, ...] | None:
    """Dtypes a registered backend declares (``None`` if it is not registered)."""
    backend = _backend(name)
    return None if backend is None else tuple(backend.dtypes)


def _backend_rejects(name: str, q: torch.Tensor) -> str | None:
    """Why the registry's declared capability of backend ``name`` refuses ``q`` (dtype, head dim, ...), or ``None``.

    The only way a backend may decline a check: asked before the call (``Backend.rejects``: its dtypes, then
    its ``accepts`` predicate). Whatever the backend raises once it has accepted the inputs is a failure.
    """
    backend = _backend(name)
    if backend is None:
        return "not registered"
    return backend.rejects(q)


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


def _probe(shape: Sequence[int], dtype: torch.dtype, device: str) -> torch.Tensor:
    """A q of ``shape``, ``dtype`` and ``device`` to ask a capability about, without allocating it.

    One element expanded (stride 0): a capability reads shape, dtype and device, never values, and the
    int64 check's q would be 4 GB. (Not a meta tensor: a capability may ask the device's compute capability.)
    """
    return torch.empty((1,) * len(shape), dtype=dtype, device=device).expand(*shape)


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    """``torch.backends.cuda.matmul.allow_tf32 = enabled`` inside, the caller's value restored after.

    Pinned both ways, so an fp32 check is fp32-accurate even if something enabled TF32 earlier. The legacy
    flag, because it is what the Triton backend reads (``triton_backend._precision``); setting torch's newer
    ``fp32_precision`` as well would mix the two APIs, which torch then refuses to read back.
    """
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    matmul.allow_tf32 = bool(enabled)
    try:
        yield
    finally:
        matmul.allow_tf32 = before


def _attention_errors(backend: str, case: AttnCase, shifted: bool, order: str, device: str) -> dict[str, tuple]:
    """``{quantity: (error, bound)}`` for out, dq, dk, dv of one backend run against fp64.

    The caller has asked the backend's declared capability first: anything raised here is a failure.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from semanticgen.ops import WindowLayout, swin_attention, swin_attention_reference

    tv, sv, ts, ss, tw = case.dims
    layout = WindowLayout(tv, sv, ts, ss, tw, order=order)
    gen = torch.Generator().manual_seed(_seed("attention", backend, case, shifted, order))
    q, k, v, grad = (_randn(case.shape, gen, case.dtype, device) for _ in range(4))

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        return [out, *torch.autograd.grad(out, leaves, grad.to(dtype))]

    def reference(a, b, c):
        return swin_attention_reference(a, b, c, layout, shifted=shifted)

    mask = _window_mask(layout, shifted, device)
    with _tf32(case.tf32):
        ours = run(lambda a, b, c: swin_attention(a, b, c, layout, shifted=shifted, backend=backend), case.dtype)
        plains = [run(reference, case.dtype)]
        if case.tf32:
            # Plain torch under the same TF32 setting: SDPA's math kernel (cuBLAS matmuls, which TF32 affects).
            with sdpa_kernel([SDPBackend.MATH]):
                plains.append(run(lambda a, b, c: _sdpa(a, b, c, mask), case.dtype))
        else:
            fused = _quietly(lambda: run(lambda a, b, c: _sdpa(a, b, c, mask), case.dtype))
            if fused is not None:
                plains.append(fused)
    # The oracle sees the same (dtype-rounded) inputs, upcast, so only the computation's error counts.
    exact = run(reference, torch.float64)
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


def _attention_name(backend: str, case: AttnCase) -> str:
    return f"{backend} fwd+bwd" + (", TF32" if case.tf32 else "")


def _attention_row(backend: str, case: AttnCase, device: str) -> Row:
    """Both parities and both orders of one case; the row shows the sub-check nearest its bound.

    Every sub-check runs: an exception in one (after the backend accepted the inputs) is recorded as a
    failure of that sub-check, with its type and message, and the others still count.
    """
    sub: dict[str, dict] = {}
    failures, worst, worst_ratio = [], None, -1.0
    for shifted in (False, True):
        for order in ("streams", "blocked"):
            tag = f"{'shifted' if shifted else 'unshifted'}/{order}"
            try:
                errs = _attention_errors(backend, case, shifted, order, device)
            except Exception as exc:
                sub[tag] = {"error": None, "bound": None, "exception": _short(exc)}
                failures.append(f"{tag} raised {_short(exc)}")
                continue
            for qty, (err, bound) in errs.items():
                sub[f"{tag}/{qty}"] = {"error": err, "bound": bound}
                ratio = err / bound if bound > 0 else math.inf
                if not err <= bound:  # NaN and inf fail here too
                    failures.append(f"{qty} {tag}: {err:.3g} > {bound:.3g}")
                if ratio > worst_ratio or worst is None:
                    worst_ratio, worst = ratio, (qty, tag, err, bound)
    err, bound = (worst[2], worst[3]) if worst is not None else (None, None)
    detail = "; ".join(failures[:3]) + (f" (+{len(failures) - 3} more)" if len(failures) > 3 else "")
    if not detail:
        detail = f"worst: {worst[0]} {worst[1]} ({len(sub)} sub-checks)"
    return Row(
        "attention",
        _attention_name(backend, case),
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
        cut = [r for r in backend_rows if r.status == CUT]
        declined = [r for r in backend_rows if r.status == SKIP and r.detail.startswith("declined")]
        if declined and not ran and not cut:
            # A backend that says it runs here but declines every input is broken (or the matrix is).
            backend_rows.append(
                Row("attention", f"{backend} coverage", device, status=FAIL,
                    detail="available on this device, but its declared capability refused every check")
            )  # fmt: skip
        rows += backend_rows
    return rows


def _attention_case_row(backend: str, case: AttnCase, device: str, section: _Section) -> Row:
    """One case's row: SKIP where declared (CUDA-only TF32 on CPU, the backend's capability), CUT past the
    budget, else the check (any exception a FAIL with its type and message)."""
    name, dtype = _attention_name(backend, case), _dname(case.dtype)
    if case.tf32 and device != "cuda":
        return Row("attention", name, device, dtype, case.layout_id, status=SKIP,
                   detail="CUDA only: TF32 is a CUDA matmul mode (torch.backends.cuda.matmul.allow_tf32)")  # fmt: skip
    try:
        reason = _backend_rejects(backend, _probe(case.shape, case.dtype, device))
    except Exception as exc:  # a capability predicate that crashes is a bug too
        return Row("attention", name, device, dtype, case.layout_id, status=FAIL,
                   detail=f"capability query raised {_short(exc)}")  # fmt: skip
    if reason is not None:
        return Row("attention", name, device, dtype, case.layout_id, status=SKIP, detail=f"declined: {reason}")
    if section.over_budget():
        return section.budget_row(name, device, dtype=dtype, layout=case.layout_id)
    try:
        return _attention_row(backend, case, device)
    except Exception as exc:  # a crash outside the sub-checks is a failed check too, and the run goes on
        return Row("attention", name, device, dtype, case.layout_id, status=FAIL, detail=_short(exc))


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
        dtypes = _backend_dtypes(backend) or ()
        dtype = next((dt for dt in (torch.bfloat16, torch.float16, torch.float32) if dt in dtypes), None)
        name = f"{backend} fwd, q > 2^31 elements"
        if dtype is None:
            rows.append(Row("int64", name, device, layout=layout_id, status=SKIP, detail="declares no bf16/fp16/fp32"))
            continue
        reason = _backend_rejects(backend, _probe((1, n, h, d), dtype, device))
        if reason is not None:
            rows.append(Row("int64", name, device, _dname(dtype), layout_id, status=SKIP, detail=f"declined: {reason}"))
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
    sub, failures, worst = {}, [], None
    try:
        reason = _backend_rejects(backend, q)
        if reason is not None:
            return Row("int64", name, device, _dname(dtype), layout_id, status=SKIP, detail=f"declined: {reason}")
        for order in ("streams", "blocked"):
            layout = streams.with_order(order)
            for shifted in (False, True):
                parity = "shifted" if shifted else "unshifted"
                try:
                    out = swin_attention(q, k, v, layout, shifted=shifted, backend=backend)
                except Exception as exc:  # the backend accepted q: whatever it raises is a failure
                    sub[f"{parity}/{order}"] = {"error": None, "bound": None, "exception": _short(exc)}
                    failures.append(f"{parity}/{order} raised {_short(exc)}")
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
    detail = "; ".join(failures[:2]) or f"worst: {worst[2]} ({len(sub)} windows checked)"
    err, bound = (worst[0], worst[1]) if worst is not None else (None, None)
    return Row(
        "int64", name, device, _dname(dtype), layout_id, error=err, bound=bound,
        status=FAIL if failures else PASS, detail=detail, data={"sub_checks": sub},
    )  # fmt: skip


# ----------------------------------------------------------------------------------------- flow ops
FLOW_SHAPES = ((3, 37), (2, 5, 7, 1001))
LOSS_SHAPES = ((3, 37), (2, 3, 32771))

# (label, ours, plain, exact, expected dtype of ours, terms): one output or gradient of one flow check.
# ``terms`` is None, or for a gradient that is a sum over elements (the per-batch dt, t, guidance) the
# largest per-batch sum of its terms' magnitudes in fp64: that sum's rounding error scales with it.
FlowResult = tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype, float | None]


def _grads(out, leaves, upstream) -> list[torch.Tensor]:
    """``d(sum(out_i * upstream_i)) / d leaf`` for every leaf (``out`` and ``upstream`` may be tuples)."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    ups = upstream if isinstance(upstream, (tuple, list)) else (upstream,)
    return list(torch.autograd.grad(outs, leaves, [u.to(o.dtype) for o, u in zip(outs, ups)]))


def _grad_check(names, tensors, scalars, ours_fn, formula, upstream) -> list[FlowResult]:
    """Gradients of one op with respect to ``tensors`` (``[B, ...]``) and ``scalars`` (``[B]`` fp32, may be none).

    ``ours_fn(*tensors, *scalars)`` calls the compiled op; ``formula(tensors, scalars)`` is the same maths in
    plain torch, with ``scalars`` already shaped to broadcast. It runs twice: in the inputs' dtype (plain
    torch's autograd, the baseline) and in fp64 with every scalar expanded to one leaf per element, so that
    the exact gradient of a scalar is the per-batch sum of those leaves' gradients (its terms).
    """
    shape = tensors[0].shape
    view = (-1, *([1] * (len(shape) - 1)))
    n = len(tensors)
    ours = [t.detach().clone().requires_grad_() for t in (*tensors, *scalars)]
    plain = [t.detach().clone().requires_grad_() for t in (*tensors, *scalars)]
    exact = [t.detach().double().requires_grad_() for t in tensors]
    exact += [s.detach().double().view(view).expand(shape).clone().requires_grad_() for s in scalars]
    dtype = tensors[0].dtype
    g_ours = _grads(ours_fn(*ours), ours, upstream)
    g_plain = _grads(formula(plain[:n], [s.to(dtype).view(view) for s in plain[n:]]), plain, upstream)
    g_exact = _grads(formula(exact[:n], exact[n:]), exact, upstream)
    results = []
    for i, name in enumerate(names):
        if i < n:
            results.append((f"d {name}", g_ours[i], g_plain[i], g_exact[i], dtype, None))
        else:
            terms = g_exact[i].reshape(shape[0], -1)
            magnitude = terms.abs().sum(dim=1).max().item()
            results.append((f"d {name}", g_ours[i], g_plain[i], terms.sum(dim=1), torch.float32, magnitude))
    return results


def _flow_cases(device: str, dtype: torch.dtype) -> Iterator[tuple[str, str, Callable[[], list[FlowResult]]]]:
    """``(op name, shape id, fn)``; ``fn()`` returns one :data:`FlowResult` per output (or gradient) of the op.

    ``<op> grad`` checks differentiate the op with respect to every tensor input (the per-batch ``dt``,
    ``t`` and ``guidance`` included) against fp64 autograd of the formula and eager autograd in ``dtype``:
    on the first shape the scalars are Python floats (the backward's by-value path), on the second ``[B]``
    fp32 tensors that require grad.
    """
    from semanticgen.ops import flow

    def rnd(gen, shape, scale=1.0):
        return _randn(shape, gen, dtype, device, scale)

    def per_batch(gen, shape, lo, hi):
        """One fp32 value per batch element on the device, and its fp64 / eager broadcast forms."""
        t = (lo + (hi - lo) * torch.rand(shape[0], generator=gen, dtype=torch.float64)).float().to(device)
        view = (-1, *([1] * (len(shape) - 1)))
        return t, t.double().view(view), t.to(dtype).view(view)

    for index, shape in enumerate(FLOW_SHAPES):
        sid = "x".join(map(str, shape))
        batched = index > 0

        def euler(shape=shape):
            gen = torch.Generator().manual_seed(_seed("euler_step", dtype, shape))
            z, v = rnd(gen, shape), rnd(gen, shape, 3.0)
            dt, dt64, dt_lo = per_batch(gen, shape, -0.3, -0.01)
            return [("", flow.euler_step(z, v, dt), z + dt_lo * v, z.double() + dt64 * v.double(), dtype, None)]

        def euler_inplace(shape=shape):
            gen = torch.Generator().manual_seed(_seed("euler_step_", dtype, shape))
            z, v = rnd(gen, shape), rnd(gen, shape, 3.0)
            dt = -0.0625  # a float dt: passed by value, exactly representable in every dtype
            exact, plain = z.double() + dt * v.double(), z + dt * v
            ours = z.clone()
            returned = flow.euler_step_(ours, v, dt)
            if returned.data_ptr() != ours.data_ptr():
                raise AssertionError("euler_step_ did not return its (updated) input")
            return [("", ours, plain, exact, dtype, None)]

        def cfg(shape=shape):
            gen = torch.Generator().manual_seed(_seed("cfg_euler_step", dtype, shape))
            z, vc, vu = rnd(gen, shape), rnd(gen, shape, 2.0), rnd(gen, shape, 2.0)
            dt, dt64, dt_lo = per_batch(gen, shape, -0.3, -0.01)
            g = 4.5  # exactly representable: the same guidance in every computation
            exact = z.double() + dt64 * (vu.double() + g * (vc.double() - vu.double()))
            plain = z + dt_lo * (vu + g * (vc - vu))
            return [("", flow.cfg_euler_step(z, vc, vu, g, dt), plain, exact, dtype, None)]

        def noising(shape=shape):
            gen = torch.Generator().manual_seed(_seed("flow_noising", dtype, shape))
            z0, eps = rnd(gen, shape, 0.5), rnd(gen, shape)
            t, t64, t_lo = per_batch(gen, shape, 0.0, 1.0)
            z_t, u = flow.flow_noising(z0, eps, t)
            return [
                ("z_t", z_t, (1 - t_lo) * z0 + t_lo * eps, (1 - t64) * z0.double() + t64 * eps.double(), dtype, None),
                ("u", u, eps - z0, eps.double() - z0.double(), dtype, None),
            ]

        def euler_grad(shape=shape, batched=batched):
            gen = torch.Generator().manual_seed(_seed("euler_step grad", dtype, shape))
            z, v, up = rnd(gen, shape), rnd(gen, shape, 3.0), rnd(gen, shape)
            dt = -0.0625  # a float on the first shape: exactly representable in every dtype
            scalars = [per_batch(gen, shape, -0.3, -0.01)[0]] if batched else []

            def formula(ts, ss):
                return ts[0] + (ss[0] if ss else dt) * ts[1]

            ours = lambda *ls: flow.euler_step(ls[0], ls[1], ls[2] if batched else dt)
            names = ["z", "v"] + (["dt"] if batched else [])
            return _grad_check(names, [z, v], scalars, ours, formula, up)

        def cfg_grad(shape=shape, batched=batched):
            gen = torch.Generator().manual_seed(_seed("cfg_euler_step grad", dtype, shape))
            z, vc, vu, up = rnd(gen, shape), rnd(gen, shape, 2.0), rnd(gen, shape, 2.0), rnd(gen, shape)
            g, dt = 4.5, -0.0625
            scalars = [per_batch(gen, shape, 1.0, 7.5)[0], per_batch(gen, shape, -0.3, -0.01)[0]] if batched else []

            def formula(ts, ss):
                gs, dts = ss if ss else (g, dt)
                return ts[0] + dts * (ts[2] + gs * (ts[1] - ts[2]))

            ours = lambda *ls: flow.cfg_euler_step(*ls[:3], *(ls[3:] if batched else (g, dt)))
            names = ["z", "v_cond", "v_uncond"] + (["guidance", "dt"] if batched else [])
            return _grad_check(names, [z, vc, vu], scalars, ours, formula, up)

        def noising_grad(shape=shape, batched=batched):
            gen = torch.Generator().manual_seed(_seed("flow_noising grad", dtype, shape))
            z0, eps, up_zt, up_u = rnd(gen, shape, 0.5), rnd(gen, shape), rnd(gen, shape), rnd(gen, shape)
            t = 0.375
            scalars = [per_batch(gen, shape, 0.0, 1.0)[0]] if batched else []

            def formula(ts, ss):
                tt = ss[0] if ss else t
                return (1 - tt) * ts[0] + tt * ts[1], ts[1] - ts[0]

            ours = lambda *ls: flow.flow_noising(ls[0], ls[1], ls[2] if batched else t)
            names = ["z0", "eps"] + (["t"] if batched else [])
            return _grad_check(names, [z0, eps], scalars, ours, formula, (up_zt, up_u))

        yield "euler_step", sid, euler
        yield "euler_step_", sid, euler_inplace
        yield "cfg_euler_step", sid, cfg
        yield "flow_noising", sid, noising
        yield "euler_step grad", sid, euler_grad
        yield "cfg_euler_step grad", sid, cfg_grad
        yield "flow_noising grad", sid, noising_grad

    for shape in LOSS_SHAPES:
        sid = "x".join(map(str, shape))

        def loss(shape=shape):
            gen = torch.Generator().manual_seed(_seed("flow_matching_loss", dtype, shape))
            v, z0, eps = rnd(gen, shape), rnd(gen, shape), rnd(gen, shape)
            exact = ((v.double() - (eps.double() - z0.double())) ** 2).mean()
            ours = flow.flow_matching_loss(v, z0, eps)
            plain = torch.nn.functional.mse_loss(v, eps - z0)
            if ours.dtype != torch.float32 or ours.shape != ():
                raise AssertionError(f"loss is {ours.dtype} {tuple(ours.shape)}, expected a 0-d float32")
            return [("", ours, plain, exact, torch.float32, None)]

        def loss_grad(shape=shape):
            gen = torch.Generator().manual_seed(_seed("flow_matching_loss grad", dtype, shape))
            v, z0, eps = rnd(gen, shape), rnd(gen, shape), rnd(gen, shape)
            up = torch.tensor(0.75, dtype=torch.float64)  # not 1: the backward must scale by its incoming grad

            def formula(ts, ss):
                if ts[0].dtype == torch.float64:
                    return ((ts[0] - (ts[2] - ts[1])) ** 2).mean()
                return torch.nn.functional.mse_loss(ts[0], ts[2] - ts[1])  # plain torch's own loss

            return _grad_check(["v_pred", "z0", "eps"], [v, z0, eps], [], flow.flow_matching_loss, formula, up)

        yield "flow_matching_loss", sid, loss
        yield "flow_matching_loss grad", sid, loss_grad


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
            for label, ours, plain, exact, out_dtype, terms in fn():
                tag = f"{sid} {label}".strip()
                if ours.dtype != out_dtype or ours.shape != exact.shape:
                    raise AssertionError(
                        f"{tag}: result {ours.dtype} {tuple(ours.shape)}, expected {out_dtype} {tuple(exact.shape)}"
                    )
                err = rel_error(ours, exact)
                bound = bound_from_plain(rel_error(plain, exact), out_dtype)
                eps32 = torch.finfo(torch.float32).eps
                if op == "flow_matching_loss":
                    bound = max(bound, FLOOR_ULPS * eps32)
                if terms is not None:
                    # An fp32 sum's rounding error scales with the sum of its terms' magnitudes, not with its
                    # value (random signs cancel): the floor is FLOOR_ULPS fp32 ulps of that, relative to
                    # max|exact| as the error is. Measured on CPU over 20 seeds: d t of flow_noising reached
                    # 5.7e-7 (1.2x the plain 4-ulp floor, 35x plain torch's error on a lucky seed).
                    scale = exact.abs().max().item()
                    bound = max(bound, FLOOR_ULPS * eps32 * terms / (scale if scale > 0 else 1.0))
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


def _time_ms(fn: Callable[[], object], device: str, quick: bool) -> dict[str, float]:
    """Per-call milliseconds of ``fn()``: ``{"ms": median, "ms_min", "ms_max", "repeats"}``.

    CUDA: CUDA events with L2 flushed before every call (``semanticgen.timing.cuda_event_times``), at least
    5 calls and up to 30 while under 0.3 s, after one warm-up. CPU: one warm-up, then 3 (quick) or 5 timed
    calls: enough for a spread, not for a benchmark.
    """
    from semanticgen.timing import cuda_event_times, summarize

    if device == "cuda":
        return summarize(cuda_event_times(fn, device="cuda", warmup=1, min_repeats=5, max_repeats=30, min_seconds=0.3))
    fn()  # warm-up: first-call allocations and lazy initialisation
    times = []
    for _ in range(3 if quick else 5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return summarize(times)


def _spread_fields(timing: dict[str, float], scale: float = 1.0) -> dict[str, Any]:
    """``ms`` (median), ``ms_min``, ``ms_max`` (times ``scale``), ``repeats``, ``spread`` (max / min) and
    ``noisy`` (spread above :data:`SPREAD_BOUND`)."""
    spread = timing["ms_max"] / timing["ms_min"] if timing["ms_min"] > 0 else math.inf
    return {
        "ms": timing["ms"] * scale,
        "ms_min": timing["ms_min"] * scale,
        "ms_max": timing["ms_max"] * scale,
        "repeats": timing["repeats"],
        "spread": spread,
        "noisy": not spread <= SPREAD_BOUND,
    }


def _speedup_target(backend: str, layout, device: str) -> tuple[float, str] | None:
    """``(minimum speedup over full attention, label)`` where the project states one for this row, else ``None``.

    From ``semanticgen.benchmarks.swin_attention_gpu.TARGETS`` (the README's targets): forward speedup at
    the 60 s 480p size, blocked order, on CUDA. Everything else is informational.
    """
    if device != "cuda" or layout.order != "blocked":
        return None
    try:
        from semanticgen.benchmarks.swin_attention_gpu import TARGETS
    except ImportError:  # a source checkout that was never installed: the rows stay informational
        return None
    for target in TARGETS:
        if (
            target.metric == "speedup_vs_full"
            and target.impl == backend
            and "fwd" in target.passes
            and target.tokens == layout.num_tokens
        ):
            return target.minimum, f"speedup >= {target.minimum:g}x"
    return None


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
    measured_full: list[tuple[int, dict]] = []  # (N, spread fields) of every full-attention measurement
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


def _noise_note(fields: dict[str, Any], what: str = "") -> str:
    if not fields.get("noisy"):
        return ""
    return f"noisy{what}: spread {fields['spread']:.2f}x > {SPREAD_BOUND:g}x"


def _time_size(layout, layout_id, backends, heads, head_dim, dtype, full_max_n, measured_full, device, quick):
    """Rows for full attention and every backend (both token orders) at one size.

    Appends ``(N, spread fields)`` to ``measured_full`` when it times full attention, for extrapolation.
    """
    n = layout.num_tokens
    # Drawn on the device: at 586K tokens a CPU draw would take seconds per tensor, and values do not matter.
    gen = torch.Generator(device=device).manual_seed(_seed("timing", n))
    q, k, v = (torch.randn(1, n, heads, head_dim, generator=gen, dtype=dtype, device=device) for _ in range(3))
    rows = []
    full, extrapolated, full_name = None, False, "full attention"
    try:
        with _full_attention_kernel(device) as kernel:
            full_name = f"full attention ({kernel})"
            if n <= full_max_n:
                qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, N, D] views

                def full_fn():
                    with torch.no_grad():
                        torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)

                full = _spread_fields(_time_ms(full_fn, device, quick))
                measured_full.append((n, full))
            elif measured_full:
                # Dense attention is O(N^2): extrapolate from the largest size it was timed at.
                n0, full0 = measured_full[-1]
                full = {**full0, **_spread_fields(full0, (n / n0) ** 2)}
                extrapolated = True
        notes = [f"extrapolated by N^2 from N={measured_full[-1][0]:,}" if extrapolated else ""]
        notes.append(_noise_note(full or {}))
        data = {**(full or {"ms": None}), "tokens": n, "extrapolated": extrapolated, "kind": "info"}
        rows.append(Row("timing", full_name, device, _dname(dtype), layout_id, status=INFO,
                        detail="; ".join(filter(None, notes)), data=data))  # fmt: skip
    except Exception as exc:
        rows.append(Row("timing", full_name, device, _dname(dtype), layout_id, status=FAIL, detail=_short(exc)))
    for backend in backends:
        for order in ("streams", "blocked"):
            rows.append(_time_backend(backend, layout.with_order(order), q, k, v, layout_id, full, extrapolated,
                                      device, quick))  # fmt: skip
    return rows


def _time_backend(backend, layout, q, k, v, layout_id, full, extrapolated, device, quick) -> Row:
    """One backend's forward in ``layout.order`` (both parities per call, reported per call).

    ``full``: the full-attention spread fields at this size (``None`` when it could not be timed). Status
    ``INFO``, or ``MET`` / ``MISSED`` where a target applies; ``SKIP`` only where the backend's declared
    capability refuses ``q``; ``FAIL`` when it raises.
    """
    from semanticgen.ops import swin_attention

    name, dtype = f"{backend} fwd, {layout.order} order", q.dtype
    reason = _backend_rejects(backend, q)
    if reason is not None:
        return Row("timing", name, device, _dname(dtype), layout_id, status=SKIP, detail=f"declined: {reason}")

    def windowed():
        # Both parities per call, as a model alternates them.
        with torch.no_grad():
            swin_attention(q, k, v, layout, shifted=False, backend=backend)
            swin_attention(q, k, v, layout, shifted=True, backend=backend)

    try:
        windowed()  # outside the timing: builds the layout's index tables, compiles, autotunes
        ours = _spread_fields(_time_ms(windowed, device, quick), 0.5)
    except Exception as exc:  # the backend accepted q: whatever it raises is a failure
        return Row("timing", name, device, _dname(dtype), layout_id, status=FAIL, detail=_short(exc))
    full_ms = None if full is None else full["ms"]
    speedup = full_ms / ours["ms"] if full_ms is not None and ours["ms"] > 0 else None
    speedup_range = None
    if speedup is not None and ours["ms_min"] > 0:
        speedup_range = (full["ms_min"] / ours["ms_max"], full["ms_max"] / ours["ms_min"])
    target = _speedup_target(backend, layout, device)
    notes = [f"{speedup:.1f}x full attention" + (" (extrapolated)" if extrapolated else "") if speedup else ""]
    status, met = INFO, None
    if target is not None:
        minimum, label = target
        met = speedup is not None and speedup >= minimum
        status = MET if met else MISSED
        notes.append(f"target {label}: {'met' if met else 'missed'}" + ("" if speedup else " (not measured)"))
    notes += [_noise_note(ours), _noise_note(full or {}, " baseline")]
    return Row("timing", name, device, _dname(dtype), layout_id, status=status, detail="; ".join(filter(None, notes)),
               data={**ours, "full_ms": full_ms, "speedup": speedup, "speedup_range": speedup_range,
                     "tokens": layout.num_tokens, "order": layout.order, "extrapolated": extrapolated,
                     "baseline_noisy": bool(full and full["noisy"]),
                     "kind": "info" if target is None else "target",
                     "target": None if target is None else target[1], "target_met": met})  # fmt: skip


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
        counts = {s: sum(r.status == s for r in section_rows) for s in STATUSES}
        timed = sum(counts[s] for s in TIMING_STATUSES)
        log(
            f"selftest {name}: {counts[PASS]} pass, {counts[FAIL]} fail, {counts[SKIP]} skip, {counts[CUT]} cut"
            + (f", {timed} timed" if timed else "")
            + f" in {elapsed[name]:.1f} s"
        )
        rows += section_rows
    return rows, elapsed


def verdict_word(rows: Sequence[Row]) -> str:
    """``"FAIL"`` if any row failed, else ``"INCOMPLETE"`` if any check was cut by a time budget, else ``"PASS"``.

    Timing rows (``INFO``/``MET``/``MISSED``) count for neither side: they cannot make a run pass.
    """
    if any(r.status == FAIL for r in rows):
        return FAIL
    if any(r.status == CUT for r in rows):
        return INCOMPLETE
    return PASS


def exit_code(rows: Sequence[Row]) -> int:
    """The process exit status for ``rows``: 0 PASS, 1 FAIL, 3 INCOMPLETE (see :data:`EXIT_CODES_HELP`)."""
    return {PASS: EXIT_PASS, FAIL: EXIT_FAIL, INCOMPLETE: EXIT_INCOMPLETE}[verdict_word(rows)]


# ------------------------------------------------------------------------------------------- output
def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isnan(x) or math.isinf(x):
        return str(x)
    return f"{x:.3g}"


def _fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x:,.2f}" if x < 100 else f"{x:,.0f}"


def _noisy(r: Row) -> bool:
    """A timing row whose figure rests on a noisy measurement (its own, or the baseline its speedup uses)."""
    return bool(r.data.get("noisy") or r.data.get("baseline_noisy"))


def _timing_summary(rows: Sequence[Row]) -> str:
    timed = [r for r in rows if r.status in TIMING_STATUSES]
    if not timed:
        return ""
    counts = {s: sum(r.status == s for r in timed) for s in TIMING_STATUSES}
    noisy = sum(_noisy(r) for r in timed)
    targets = counts[MET] + counts[MISSED]
    parts = [f"{counts[INFO]} informational"]
    if targets:
        parts.append(f"targets {counts[MET]} met, {counts[MISSED]} missed")
    parts.append(f"{noisy} noisy")
    return f"; timing (not part of the verdict): {', '.join(parts)}"


def verdict(rows: Sequence[Row], elapsed: dict[str, float], device_name: str) -> str:
    """The summary line: verdict word, check counts, time, device, and the timing rows' tally."""
    counts = {s: sum(r.status == s for r in rows) for s in STATUSES}
    return (
        f"selftest {verdict_word(rows)}: {counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped, "
        f"{counts[CUT]} cut in {sum(elapsed.values()):.1f} s on {device_name} (exit {exit_code(rows)})"
        + _timing_summary(rows)
    )


_STYLE = {PASS: "green", FAIL: "bold red", SKIP: "yellow", CUT: "bold magenta", INFO: "dim", MET: "green",
          MISSED: "bold yellow"}  # fmt: skip


def print_report(rows: Sequence[Row], elapsed: dict[str, float], device_name: str, console) -> None:
    """The check table, the timing table and the verdict line, on a rich console."""
    from rich.markup import escape
    from rich.table import Table

    checks = Table(
        title="semanticgen selftest: checks",
        caption="error = max|x - ref64| / max|ref64|; bound = 2x the error of plain torch at the same dtype; "
        "SKIP = declared (unavailable, refused by the backend's capability, CUDA only); "
        "CUT = not run, time budget spent (verdict INCOMPLETE)",
    )
    for col, justify in (("section", "left"), ("check", "left"), ("device", "left"), ("dtype", "left"),
                         ("layout", "left"), ("error", "right"), ("bound", "right"), ("status", "left"),
                         ("detail", "left")):  # fmt: skip
        checks.add_column(col, justify=justify, overflow="fold")
    for r in rows:
        if r.status in TIMING_STATUSES:
            continue
        checks.add_row(
            r.section, escape(r.name), r.device, r.dtype, escape(r.layout), _fmt(r.error), _fmt(r.bound),
            f"[{_STYLE[r.status]}]{r.status}[/]", escape(r.detail),
        )  # fmt: skip
    console.print(checks)
    timed = [r for r in rows if r.status in TIMING_STATUSES]
    if timed:
        table = Table(
            title="semanticgen selftest: timing (forward, ms per call, mean of both parities)",
            caption=f"not part of the verdict: 'info' rows are informational; 'target' rows say met or missed. "
            f"ms = median over the repeats (n); noisy = slowest repeat > {SPREAD_BOUND:g}x the fastest",
        )
        for col in ("implementation", "size", "dtype", "ms", "min-max (n)", "spread", "full attention ms", "speedup",
                    "kind", "result", "note"):  # fmt: skip
            table.add_column(
                col, justify="right" if col in ("ms", "full attention ms", "speedup", "spread") else "left"
            )
        for r in timed:
            d = r.data
            full = d.get("full_ms")
            is_full = r.name.startswith("full attention")
            star = "*" if d.get("extrapolated") else ""
            spread = d.get("spread")
            table.add_row(
                escape(r.name), escape(r.layout), r.dtype, _fmt_ms(d.get("ms")) + (star if is_full else ""),
                "-" if d.get("ms_min") is None else f"{_fmt_ms(d['ms_min'])}-{_fmt_ms(d['ms_max'])} ({d['repeats']})",
                "-" if spread is None else f"{spread:.2f}x" + (" noisy" if d.get("noisy") else ""),
                "-" if is_full or full is None else _fmt_ms(full) + star,
                "-" if is_full or not d.get("speedup") else f"{d['speedup']:.1f}x",
                "info" if d.get("kind") != "target" else f"target: {d.get('target')}",
                {INFO: "-", MET: "[green]met[/]", MISSED: "[bold yellow]missed[/]"}[r.status],
                escape(r.detail),
            )  # fmt: skip
        console.print(table)
        if any(r.data.get("extrapolated") for r in timed):
            console.print("* full attention extrapolated by N^2 from the largest size it was timed at")
    times = ", ".join(f"{k} {v:.1f} s" for k, v in elapsed.items())
    console.print(f"section times: {times}")
    cut = [r for r in rows if r.status == CUT]
    if cut:
        per_section = ", ".join(
            f"{s} {sum(r.section == s for r in cut)}" for s in SECTIONS if any(r.section == s for r in cut)
        )
        console.print(f"cut by a section time budget (not run, so not passed): {per_section}")
    failed = [r for r in rows if r.status == FAIL]
    if failed:
        # After a device fault every later check fails with the same error: the first failure is the cause.
        first = failed[0]
        console.print(f"first failure: {first.section} / {escape(first.name)} / {escape(first.layout)}: "
                      f"{escape(first.detail)}")  # fmt: skip
    word_style = {PASS: "bold green", FAIL: "bold red", INCOMPLETE: "bold magenta"}[verdict_word(rows)]
    console.print(f"[{word_style}]{escape(verdict(rows, elapsed, device_name))}[/]")


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
    timed = [r for r in rows if r.status in TIMING_STATUSES]

    def ident(r: Row) -> dict[str, str]:
        return {"section": r.section, "name": r.name, "dtype": r.dtype, "layout": r.layout}

    return _json_number(
        {
            "verdict": verdict_word(rows),
            "exit_code": exit_code(rows),
            "summary": verdict(rows, elapsed, device_name),
            "cut": [ident(r) for r in rows if r.status == CUT],
            "timing": {
                "spread_bound": SPREAD_BOUND,
                "noisy": [ident(r) for r in timed if _noisy(r)],
                "targets_met": [ident(r) for r in timed if r.status == MET],
                "targets_missed": [ident(r) for r in timed if r.status == MISSED],
            },
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
    return f"CPU ({cpu_model()}, {torch.get_num_threads()} threads)"
