"""The benchmark suite behind ``semanticgen bench``.

Each suite is a module in ``semanticgen.benchmarks`` (the repository's ``benchmarks/`` folder) with

* ``run(quick: bool, device: str, progress) -> list[dict]``: one row per measurement;
* optionally ``steps(quick) -> int`` (progress steps it will report through ``progress.advance``)
  and ``skip_reason(device) -> str | None`` (why it cannot run here).

The runner shows progress, prints a table, and writes ``results.json``, ``results.csv`` and
``attention_scaling.png`` (time vs tokens) with the machine, versions, git commit and timestamp.
"""

from __future__ import annotations

import csv
import datetime as _dt
import importlib
import json
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

# name -> module under semanticgen.benchmarks, in the order they run.
SUITES: dict[str, str] = {
    "attention": "swin_attention_cpu",
    "attention-gpu": "swin_attention_gpu",
    "flow": "flow_ops",
    "block": "dit_block",
    "cp": "context_parallel",  # CPU/gloo, 2 processes: context parallelism CP 1 vs CP 2
}


@dataclass
class SuiteResult:
    name: str
    rows: list[dict] = field(default_factory=list)
    skipped: str | None = None


def best_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    """Commit of the source tree the package runs from, when it is a git checkout."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str) -> dict:
    """Machine, versions, commit and time stamped on every result file."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import semanticgen

    env = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "semanticgen": semanticgen.__version__,
        "git_commit": _git_commit(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


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
            rows = module.run(quick=quick, device=device, progress=sink)
            if not hasattr(module, "steps"):
                sink.advance(name)
            results.append(SuiteResult(name, rows=rows, skipped=None if rows else "no rows for this device"))
    order = {n: i for i, n in enumerate(names)}
    return sorted(results, key=lambda r: order[r.name])


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
    skip_cols = {"suite", "device"}
    for result in results:
        if result.skipped:
            console.print(f"[yellow]{result.name}: skipped: {result.skipped}[/yellow]")
            continue
        columns: list[str] = []
        for row in result.rows:
            columns += [k for k in row if k not in columns and k not in skip_cols]
        table = Table(title=result.name)
        for col in columns:
            table.add_column(col, justify="left" if col in ("impl", "op", "pass", "dtype", "case") else "right")
        for row in result.rows:
            table.add_row(*(_fmt(row.get(c)) for c in columns))
        console.print(table)


def write_results(results: Sequence[SuiteResult], env: dict, out_dir: Path) -> dict[str, Path]:
    """Write JSON, CSV and the scaling plot; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [row for r in results for row in r.rows]
    paths = {"json": out_dir / "results.json", "csv": out_dir / "results.csv"}
    payload = {
        "environment": env,
        "skipped": {r.name: r.skipped for r in results if r.skipped},
        "rows": rows,
    }
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, paths["json"])
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["timestamp", "git_commit", *columns])
        writer.writeheader()
        for row in rows:
            writer.writerow({"timestamp": env["timestamp"], "git_commit": env["git_commit"], **row})
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
