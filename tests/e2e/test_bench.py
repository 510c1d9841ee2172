"""bench/overhead.py, shortened: it runs llmtrain and the bare loop on the same batches and ends with its ratio;
bench/profile_cpu.py, shortened: a profile table per model."""

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


def test_cpu_profile_names_the_operators_of_each_model(capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    monkeypatch.setattr(sys, "argv", ["profile_cpu.py", "--steps", "2", "--warmup", "1", "--threads", "1",
                                      "--top", "5"])
    runpy.run_path(str(REPO / "bench" / "profile_cpu.py"), run_name="__main__")
    out = capsys.readouterr().out
    rows = re.findall(r"^## (.+): median (\d+\.\d) ms/step$", out, flags=re.M)
    assert [name for name, _ in rows] == ["llmtrain (vocab 257 -> 320)", "llmtrain (vocab 65 -> 128)"], out
    assert out.count("Self CPU time total") == 2 and "aten::" in out
