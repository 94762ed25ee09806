"""The benchmark suite behind ``semanticgen bench``.

Each suite is a module in ``semanticgen.benchmarks`` (the repository's ``benchmarks/`` folder) with

* ``run(quick: bool, device: str, progress) -> list[dict]``: one row per measurement;
* optionally ``steps(quick) -> int`` (progress steps it will report through ``progress.advance``)
  and ``skip_reason(device) -> str | None`` (why it cannot run here).

The runner shows progress, prints a table, and writes ``results.json``, ``results.csv`` and
``attention_scaling.png`` (time vs tokens) with the machine, versions, git commit and timestamp, into a
new directory ``bench-results/<UTC timestamp>-<device>[-quick]/`` unless it is given one, so no run
overwrites another's results.

Rows that carry a ``noise`` field (set by the suites: a spread across repeats above
``semanticgen.timing.SPREAD_BOUND``, or an impossible growth with N) are flagged in the tables and the JSON, and
:func:`run` ends with a warning to rerun on a quiet machine. Rows with a ``slow_layout`` field (the flow
suite's shape sweep: a layout slower than ``semanticgen.timing.LAYOUT_BOUND`` times the best layout of the same op,
beyond both rows' spread) are flagged the same way, and the closing warnings name that shape cliff too.
"""

from __future__ import annotations

import csv
import datetime as _dt
import importlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from semanticgen.environment import environment  # one record for every result file: bench's and selftest's

# Parent of the per-run result directories when no output directory is given.
DEFAULT_ROOT = "bench-results"

# name -> module under semanticgen.benchmarks, in the order they run.
SUITES: dict[str, str] = {
    "attention": "swin_attention_cpu",
    "attention-gpu": "swin_attention_gpu",
    "flow": "flow_ops",
    "block": "dit_block",
    "cp": "context_parallel",  # CPU/gloo, 2 processes: context parallelism CP 1 vs CP 2
    "convergence": "convergence",  # CPU/gloo: 10 tiny training runs, about 30 min; only when asked for by name
}

# Suites run only when named (``--suite``): longer than the default suite is meant to take (10 minutes).
OPT_IN: frozenset[str] = frozenset({"convergence"})
# What ``semanticgen bench`` runs with no ``--suite``.
DEFAULT_SUITES: tuple[str, ...] = tuple(name for name in SUITES if name not in OPT_IN)


@dataclass
class SuiteResult:
    name: str
    rows: list[dict] = field(default_factory=list)
    skipped: str | None = None
    seconds: float | None = None  # wall time of the suite's run(), so the README's run time can be checked


def best_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_suite(module_name: str):
    return importlib.import_module(f"semanticgen.benchmarks.{module_name}")


class _RichProgress:
    """Adapter giving benchmark modules ``advance(label)`` on a rich progress bar."""

    def __init__(self, progress, task):
        self._progress, self._task = progress, task

    def advance(self, label: str = "") -> None:
        self._progress.update(self._task, advance=1, description=label or "benchmark")


def run_suites(names: Sequence[str], *, quick: bool, device: str, show_progress: bool = True) -> list[SuiteResult]:
    """Run the named suites on ``device``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise ValueError(f"unknown benchmark suite(s) {unknown}; expected some of {list(SUITES)}")
    modules = {}
    results = []
    for name in names:
        try:
            module = _load_suite(SUITES[name])
        except ImportError as exc:
            results.append(SuiteResult(name, skipped=f"not available in this install ({exc})"))
            continue
        reason = module.skip_reason(device) if hasattr(module, "skip_reason") else None
        if reason:
            results.append(SuiteResult(name, skipped=reason))
        else:
            modules[name] = module
    total = sum(m.steps(quick) if hasattr(m, "steps") else 1 for m in modules.values())
    columns = (TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not show_progress, transient=False) as progress:
        task = progress.add_task("benchmark", total=total)
        sink = _RichProgress(progress, task)
        for name, module in modules.items():
            start = time.perf_counter()
            rows = module.run(quick=quick, device=device, progress=sink)
            seconds = time.perf_counter() - start
            _flag_spread(rows)
            if not hasattr(module, "steps"):
                sink.advance(name)
            skipped = None if rows else "no rows for this device"
            results.append(SuiteResult(name, rows=rows, skipped=skipped, seconds=seconds))
    order = {n: i for i, n in enumerate(names)}
    return sorted(results, key=lambda r: order[r.name])


def _flag_spread(rows: list[dict]) -> None:
    """Give rows that carry ``ms_min``/``ms_max`` but no ``noise`` field (suites that record the spread without
    judging it, e.g. the GPU attention suite) the same spread flag as the others."""
    from semanticgen.timing import noise_flag

    for row in rows:
        if "noise" not in row and isinstance(row.get("ms_min"), float) and isinstance(row.get("ms_max"), float):
            row["noise"] = noise_flag(row)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def print_tables(results: Sequence[SuiteResult], console=None) -> None:
    """One rich table per suite, columns taken from its rows."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    # Per-row constants of a run (in the JSON/CSV) and the spread's raw parts: ms_min/ms_max stay, with noise.
    skip_cols = {"suite", "device", "repeats", "spread", "threads", "cpu_capability"}
    for result in results:
        if result.skipped:
            console.print(f"[yellow]{result.name}: skipped: {result.skipped}[/yellow]")
            continue
        columns: list[str] = []
        for row in result.rows:
            columns += [k for k in row if k not in columns and k not in skip_cols]
        table = Table(title=result.name)
        for col in columns:
            left = col in ("impl", "op", "pass", "dtype", "case", "shape", "noise", "slow_layout")
            table.add_column(col, justify="left" if left else "right")
        for row in result.rows:
            flagged = row.get("noise") or row.get("slow_layout")
            table.add_row(*(_fmt(row.get(c)) for c in columns), style="red" if flagged else None)
        console.print(table)


def flagged_rows(results: Sequence[SuiteResult], flag: str) -> list[dict]:
    """Rows whose ``flag`` field is set: ``"noise"`` (a suite found the spread too wide or the growth impossible)
    or ``"slow_layout"`` (a layout sweep found a shape cliff, see ``semanticgen.timing.flag_slow_layouts``)."""
    return [row for r in results for row in r.rows if row.get(flag)]


def noise_warning(results: Sequence[SuiteResult]) -> str | None:
    """One line saying how many figures are unreliable and what to do, or None when none is flagged."""
    flagged = flagged_rows(results, "noise")
    if not flagged:
        return None
    suites = sorted({row.get("suite", "?") for row in flagged})
    return (
        f"{len(flagged)} of {sum(len(r.rows) for r in results)} rows flagged as noisy ({', '.join(suites)}; "
        "see the 'noise' column): rerun on a quiet machine before quoting them"
    )


def slow_layout_warning(results: Sequence[SuiteResult]) -> str | None:
    """One line naming the ops whose speed depends on the layout of the same data, or None when none does."""
    from semanticgen.timing import LAYOUT_BOUND

    flagged = flagged_rows(results, "slow_layout")
    if not flagged:
        return None
    names = sorted({f"{row.get('op', '?')} {row.get('impl', '')} {row.get('shape', '')}".strip() for row in flagged})
    return (
        f"{len(flagged)} layout(s) slower than {LAYOUT_BOUND:g}x the best layout of the same op and data, beyond "
        f"the spread of both ({'; '.join(names)}; see the 'slow_layout' column): a shape cliff, not noise"
    )


def closing_warnings(results: Sequence[SuiteResult]) -> list[str]:
    """The run's closing warnings: noisy figures (:func:`noise_warning`), then shape cliffs
    (:func:`slow_layout_warning`)."""
    return [w for w in (noise_warning(results), slow_layout_warning(results)) if w]


def new_out_dir(env: dict, quick: bool, root: str | Path = DEFAULT_ROOT) -> Path:
    """A directory under ``root`` that does not exist yet, named from the run's UTC timestamp and device."""
    stamp = _dt.datetime.fromisoformat(env["timestamp"]).strftime("%Y%m%dT%H%M%SZ")
    base = Path(root) / f"{stamp}-{env['device'].replace(':', '')}{'-quick' if quick else ''}"
    path, n = base, 1
    while path.exists():  # two runs within one second
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def run(
    names: Sequence[str],
    *,
    quick: bool,
    device: str,
    out_dir: str | Path | None = None,
    show_progress: bool = True,
    console=None,
) -> dict[str, Path]:
    """Run the suites, print their tables and the noise warning, write the result files.

    ``out_dir``: where to write; None (the default) makes a new ``bench-results/<timestamp>-<device>`` so
    that one run never overwrites another. Returns the paths written (``json``, ``csv``, maybe ``plot``).
    """
    from rich.console import Console
    from rich.markup import escape

    console = console or Console()
    results = run_suites(names, quick=quick, device=device, show_progress=show_progress)
    print_tables(results, console)
    paths = write_results(results, environment(device), out_dir, quick=quick)
    for kind, path in paths.items():
        console.print(f"wrote {kind}: {path}")
    timed = [r for r in results if r.seconds is not None]
    console.print(
        f"suites took {sum(r.seconds for r in timed):.0f} s: " + ", ".join(f"{r.name} {r.seconds:.0f} s" for r in timed)
    )
    for warning in closing_warnings(results):
        console.print(f"[bold red]warning:[/bold red] {escape(warning)}")
    return paths


def write_results(
    results: Sequence[SuiteResult], env: dict, out_dir: str | Path | None = None, *, quick: bool = False
) -> dict[str, Path]:
    """Write JSON, CSV and the scaling plot into ``out_dir`` (None: :func:`new_out_dir`); returns the paths.

    Every CSV row carries the environment's columns (machine, CPU, versions, commit, timestamp) before the
    row's own; where a row has a column of the same name (``device``), the row's value is written.
    """
    out_dir = new_out_dir(env, quick) if out_dir is None else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [row for r in results for row in r.rows]
    paths = {"json": out_dir / "results.json", "csv": out_dir / "results.csv"}
    from semanticgen.timing import LAYOUT_BOUND, SPREAD_BOUND

    payload = {
        "environment": env,
        "skipped": {r.name: r.skipped for r in results if r.skipped},
        "suite_seconds": {r.name: r.seconds for r in results if r.seconds is not None},
        "noise": {
            "spread_bound": SPREAD_BOUND,
            "flagged_rows": len(flagged_rows(results, "noise")),
            "warning": noise_warning(results),
        },
        "layout": {
            "bound": LAYOUT_BOUND,
            "flagged_rows": len(flagged_rows(results, "slow_layout")),
            "warning": slow_layout_warning(results),
        },
        "rows": rows,
    }
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, paths["json"])
    columns: list[str] = list(env)
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({**env, **row})
    plot = plot_attention_scaling(rows, env, out_dir / "attention_scaling.png")
    if plot is not None:
        paths["plot"] = plot
    return paths


def plot_attention_scaling(rows: Sequence[dict], env: dict, path: Path) -> Path | None:
    """Log-log time vs tokens for windowed and full attention (forward and forward+backward)."""
    attn = [r for r in rows if r.get("suite") == "attention"]
    if not attn:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"swin_attention": "-o", "swin_attention_blocked": "-^", "sdpa_full": "--s"}
    for impl in sorted({r["impl"] for r in attn}):
        for pass_name in ("fwd", "fwd+bwd"):
            pts = sorted((r["tokens"], r["ms"]) for r in attn if r["impl"] == impl and r["pass"] == pass_name)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(
                    xs,
                    ys,
                    styles.get(impl, "-x"),
                    label=f"{impl} {pass_name}",
                    alpha=0.9 if pass_name == "fwd" else 0.6,
                )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens (N)")
    ax.set_ylabel("time per call (ms)")
    ax.set_title(f"Windowed vs full attention, {env['device']} ({env['cpu']})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
