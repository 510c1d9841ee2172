"""trainer.precision=auto on a CPU: bf16 for training where the CPU computes bf16 natively (AVX512-BF16, AMX),
fp32 where it would be emulated or cannot be told, fp32 for inference; the run says at start what auto picked
and why."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch
from helpers import TINY_LM, compose, losses

from llmtrain import precision as prec
from llmtrain.precision import Precision, auto_reason, cpu_bf16_flags, resolve

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


@pytest.mark.parametrize("line,flags", [
    ("flags\t\t: fpu sse avx2 avx512f", set()),
    ("flags\t\t: fpu avx512f avx512_bf16 avx512_vnni", {"avx512_bf16"}),
    ("flags\t\t: fpu amx_bf16 amx_tile amx_int8", {"amx_bf16"}),
    ("Features\t: fp asimd sve bf16 i8mm", {"bf16"}),  # aarch64
])
def test_native_bf16_flags_from_cpuinfo(tmp_path: Path, line: str, flags: set[str]) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\n{line}\n\nprocessor\t: 1\n{line}\n")
    assert cpu_bf16_flags(str(cpuinfo)) == flags
    prec.cpu_has_native_bf16.cache_clear()
    try:
        assert prec.cpu_has_native_bf16(str(cpuinfo)) is bool(flags)
    finally:
        prec.cpu_has_native_bf16.cache_clear()


def test_this_cpu_agrees_with_torch() -> None:
    """/proc/cpuinfo's avx512_bf16 and PyTorch's own CPUID probe say the same on x86."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if probe is None or platform.machine().lower() not in ("x86_64", "amd64") or not Path("/proc/cpuinfo").is_file():
        pytest.skip("needs an x86 Linux CPU and torch.cpu._is_avx512_bf16_supported")
    assert ("avx512_bf16" in (cpu_bf16_flags() or ())) == probe()


@pytest.mark.parametrize("native,training,want", [
    (True, True, Precision.bf16), (False, True, Precision.fp32), (None, True, Precision.fp32),
    (True, False, Precision.fp32),  # inference casts the weights themselves: fp32 on CPUs
])
def test_auto_on_cpu(monkeypatch: pytest.MonkeyPatch, native: bool | None, training: bool, want: Precision) -> None:
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda cpuinfo="/proc/cpuinfo": native)
    assert resolve("auto", CPU, training=training) == want
    assert resolve("fp32", CPU, training=training) == Precision.fp32 and resolve("bf16", CPU) == Precision.bf16
    line = auto_reason(CPU)
    assert line.startswith(f"trainer.precision=auto: {resolve('auto', CPU, training=True).value} (") and "\n" not in line
    assert ("natively" in line) == bool(native)


def test_a_run_says_what_auto_picked_and_trains_in_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    """auto on a native-bf16 CPU: one start line naming bf16 and why, and the steps run under bf16 autocast (losses
    differ from fp32's); on a CPU without it: fp32, the same losses as trainer.precision=fp32 bit for bit."""
    from llmtrain.train import run

    args = [*TINY_LM, "trainer.max_steps=3", "trainer.eval_every=0", "trainer.ckpt_every=0"]
    run(compose([*args, "trainer.precision=fp32"]), tmp_path / "fp32")
    assert "trainer.precision=auto" not in capsys.readouterr().out
    for native, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda cpuinfo="/proc/cpuinfo", native=native: native)
        run(compose([*args, "trainer.precision=auto"]), tmp_path / f"auto_{want}")
        out = capsys.readouterr().out
        said = [ln for ln in out.splitlines() if "trainer.precision=auto" in ln]
        assert len(said) == 1 and said[0].startswith(f"llmtrain: trainer.precision=auto: {want} ("), out
        assert f" · {want} · " in out
    assert losses(tmp_path / "auto_fp32") == losses(tmp_path / "fp32")
    bf16 = losses(tmp_path / "auto_bf16")
    assert sorted(bf16) == [1, 2, 3] and bf16 != losses(tmp_path / "fp32")
