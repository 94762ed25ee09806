"""Run ``ptxas -v`` and parse its resource report (registers, spills, shared memory per kernel).

Works on the output of ``ptxas -v`` and of ``nvcc -Xptxas -v``, e.g.::

    ptxas info    : Compiling entry function 'swin_attn_fwd_kernel' for 'sm_90a'
    ptxas info    : Function properties for swin_attn_fwd_kernel
        0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ptxas info    : Used 198 registers, used 1 barriers, 384 bytes smem, 400 bytes cmem[0]
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["parse_ptxas_verbose", "find_ptxas", "run_ptxas", "PtxasError"]

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_BARRIERS = re.compile(r"used (\d+) barriers")
_SMEM = re.compile(r"(\d+) bytes smem")
_CMEM0 = re.compile(r"(\d+) bytes cmem\[0\]")


class PtxasError(RuntimeError):
    """``ptxas`` is missing or rejected its input."""


def _empty_record(arch: str | None) -> dict:
    return {
        "arch": arch,
        "registers": None,
        "spill_store_bytes": 0,
        "spill_load_bytes": 0,
        "stack_frame_bytes": 0,
        "shared_bytes": 0,
        "constant_bytes": 0,
        "barriers": 0,
    }


def parse_ptxas_verbose(text: str, arch: str | None = None) -> dict[str, dict]:
    """Per-kernel resources from ``ptxas -v`` output.

    Args:
        text: the combined stdout/stderr of ``ptxas -v`` or ``nvcc -Xptxas -v``.
        arch: keep only entries compiled for this target (``"sm_90a"``); needed when ``text`` holds
            the same kernel for several targets (an ``nvcc`` multi-arch build).

    Returns:
        ``{kernel_name: {"arch", "registers", "spill_store_bytes", "spill_load_bytes",
        "stack_frame_bytes", "shared_bytes", "constant_bytes", "barriers"}}`` for every entry
        function. ``shared_bytes`` is *static* shared memory only (dynamic shared memory is chosen at
        launch and invisible to ptxas).

    Raises:
        ValueError: a kernel appears for several targets and ``arch`` was not given.
    """
    records: dict[tuple[str, str], dict] = {}
    current: tuple[str, str] | None = None  # entry whose "Used ..." line comes next
    properties_of: str | None = None  # function whose stack/spill line comes next
    spills: dict[str, tuple[int, int, int]] = {}
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = (m.group(1), m.group(2))
            records.setdefault(current, _empty_record(m.group(2)))
            continue
        if m := _PROPERTIES.search(line):
            properties_of = m.group(1)
            continue
        if (m := _FRAME.search(line)) and properties_of is not None:
            spills[properties_of] = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
            if current is not None and current[0] == properties_of:
                rec = records[current]
                rec["stack_frame_bytes"], rec["spill_store_bytes"], rec["spill_load_bytes"] = spills[properties_of]
            properties_of = None
            continue
        if (m := _USED.search(line)) and current is not None:
            rec = records[current]
            rec["registers"] = int(m.group(1))
            if b := _BARRIERS.search(line):
                rec["barriers"] = int(b.group(1))
            if s := _SMEM.search(line):
                rec["shared_bytes"] = int(s.group(1))
            if c := _CMEM0.search(line):
                rec["constant_bytes"] = int(c.group(1))
            current = None
    result: dict[str, dict] = {}
    for (name, target), rec in records.items():
        if arch is not None and target != arch:
            continue
        if name in result:
            raise ValueError(
                f"parse_ptxas_verbose: kernel {name!r} appears for targets {result[name]['arch']!r} and "
                f"{target!r}; pass arch= to pick one"
            )
        result[name] = rec
    return result


def find_ptxas() -> str:
    """Path of a ``ptxas``: ``$CUDA_HOME/bin``, then ``/usr/local/cuda/bin``, then ``PATH``, then Triton's copy.

    Raises:
        PtxasError: none found.
    """
    candidates = []
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            candidates.append(Path(os.environ[env]) / "bin" / "ptxas")
    candidates.append(Path("/usr/local/cuda/bin/ptxas"))
    on_path = shutil.which("ptxas")
    if on_path:
        candidates.append(Path(on_path))
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")
    except ImportError:
        pass
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise PtxasError("ptxas not found: install the CUDA toolkit (set CUDA_HOME) or triton, which bundles ptxas")


def run_ptxas(ptx: str, arch: str, ptxas: str | None = None) -> str:
    """Assemble PTX text for ``arch`` (``"sm_90a"``, ``"sm_80"``) with ``ptxas -v``; returns its report text."""
    ptxas = ptxas or find_ptxas()
    with tempfile.TemporaryDirectory(prefix="semanticgen-ptxas-") as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        proc = subprocess.run(
            [ptxas, "-v", f"-arch={arch}", str(src), "-o", str(Path(tmp) / "kernel.cubin")],
            capture_output=True,
            text=True,
            check=False,
        )
    if proc.returncode != 0:
        raise PtxasError(f"{ptxas} -arch={arch} failed (exit {proc.returncode}):\n{proc.stderr.strip()}")
    return proc.stdout + proc.stderr
