"""``/proc/self/status`` read in one place: the umask for new files' mode, a rank's own peak memory."""

from __future__ import annotations

import os

import pytest

from semanticgen._procstatus import PROC_STATUS, proc_status_field

LINUX = os.path.exists(PROC_STATUS)


def test_fields_are_read_as_written(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nUmask:\t0027\nVmPeak:\t  999 kB\nVmHWM:\t   1234 kB\n")
    assert proc_status_field("Umask", str(status)) == "0027"
    assert proc_status_field("VmHWM", str(status)) == "1234 kB"
    assert proc_status_field("VmHW", str(status)) is None  # a prefix of a field's name is not that field
    assert proc_status_field("Threads", str(status)) is None


def test_no_file_is_none(tmp_path):
    """Not Linux: callers fall back to the portable call."""
    assert proc_status_field("Umask", str(tmp_path / "absent")) is None


@pytest.mark.skipif(not LINUX, reason="/proc/self/status is Linux's")
def test_umask_is_this_process_s():
    old = os.umask(0o027)
    try:
        assert proc_status_field("Umask") == "0027"
    finally:
        os.umask(old)


@pytest.mark.skipif(not LINUX, reason="/proc/self/status is Linux's")
def test_peak_memory_is_at_least_what_the_process_holds_now():
    peak, now = proc_status_field("VmHWM"), proc_status_field("VmRSS")
    assert peak.endswith(" kB") and now.endswith(" kB")
    assert int(peak.split()[0]) >= int(now.split()[0]) > 0


def test_both_readers_use_the_helper(monkeypatch):
    """The umask of new files and the benchmark's peak memory come from the one parser (there were two)."""
    from semanticgen.benchmarks import context_parallel

    from semanticgen import _files as files

    fields = {"Umask": "0077", "VmHWM": "2048 kB"}
    monkeypatch.setattr(files, "proc_status_field", fields.get)
    monkeypatch.setattr(context_parallel, "proc_status_field", fields.get)
    assert files.default_file_mode() == 0o600
    assert context_parallel._max_rss_mb() == 2.0
    monkeypatch.setattr(files, "proc_status_field", lambda name: None)  # not Linux: the portable way
    old = os.umask(0o022)
    try:
        assert files.default_file_mode() == 0o644
    finally:
        os.umask(old)
    monkeypatch.setattr(context_parallel, "proc_status_field", lambda name: None)
    assert context_parallel._max_rss_mb() > 0  # ru_maxrss
