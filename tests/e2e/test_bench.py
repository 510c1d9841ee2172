"""bench/overhead.py, shortened: it runs llmtrain and the bare loop on the same batches and ends with its ratio."""

from __future__ import annotations

import re
import runpy
import sys

import pytest
from helpers import REPO


def test_overhead_benchmark_prints_its_ratio(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
                                             one_thread: None) -> None:
    monkeypatch.setattr(sys, "argv", ["overhead.py", "--steps", "14", "--repeat", "1", "--threads", "1"])
    runpy.run_path(str(REPO / "bench" / "overhead.py"), run_name="__main__")
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"overhead_ratio=\d+\.\d{3}", lines[-1]), lines[-3:]
    assert any(ln.startswith("raw loop ") for ln in lines) and any(ln.startswith("llmtrain ") for ln in lines)
    assert 0.2 < float(lines[-1].split("=")[1]) < 5  # a timing, not a fixed number (noisy here: not asserted)
