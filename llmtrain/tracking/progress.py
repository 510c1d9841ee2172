"""Training progress: a tqdm bar on a terminal; elsewhere (CI, nohup, SLURM logs) one plain line per log step.

The bar and the plain lines go to the progress stream (stderr unless one is given). A redirected tqdm bar
writes a carriage-return update per step into the file (one line of hundreds of KB); plain lines read well
in a log and carry the same figures: step, loss, lr, tokens/s, ETA. A status (a phase that may take a while)
is the bar's label on a terminal, else a line on stdout; `write` lines go to stdout (above the bar on a
terminal).
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def _eta(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _rate(x: float) -> str:
    return f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


class Progress:
    """The bar (or the plain lines) on `stream`, stderr by default; `status` lines and `write` on stdout."""

    def __init__(self, total: int, start: int, enabled: bool, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.total, self.start, self.step = total, start, start
        self.enabled = enabled
        self.tty = enabled and getattr(self.stream, "isatty", lambda: False)()
        self._t0 = time.perf_counter()
        self._bar: Any = None
        if self.tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=start, desc="train", unit="step", file=self.stream,
                             dynamic_ncols=True)

    def advance(self, n: int = 1) -> None:
        self.step += n
        if self._bar is not None:
            if self._bar.desc != "train":
                self._bar.set_description_str("train", refresh=False)
            self._bar.update(n)

    def metrics(self, rec: dict[str, Any]) -> None:
        """The figures of a train record: the bar's postfix, or one plain line on the progress stream."""
        if "loss" not in rec or not self.enabled:
            return
        rate = rec.get("tokens_per_s", rec.get("samples_per_s"))
        unit = "tok/s" if "tokens_per_s" in rec else "samples/s"
        if self._bar is not None:
            post = {"loss": f"{rec['loss']:.4f}", "lr": f"{rec['lr']:.2e}"}
            if rate is not None:
                post[unit] = _rate(rate)
            self._bar.set_postfix(post, refresh=False)
            return
        done = self.step - self.start
        left = (time.perf_counter() - self._t0) / done * (self.total - self.step) if done > 0 else 0.0
        parts = [f"step {self.step}/{self.total}", f"loss {rec['loss']:.4f}", f"lr {rec['lr']:.2e}"]
        if rate is not None:
            parts.append(f"{_rate(rate)} {unit}")
        if "mfu" in rec:
            parts.append(f"mfu {rec['mfu']:.1%}")
        parts.append(f"eta {_eta(left)}")
        print(" · ".join(parts), file=self.stream, flush=True)

    def status(self, msg: str) -> None:
        """A phase that may take a while: the bar's label on a terminal, else a line on stdout (also when the
        progress display is off)."""
        if self._bar is not None:
            self._bar.set_description_str(msg, refresh=True)
        else:
            print(msg, flush=True)

    def write(self, msg: str) -> None:
        """A line on stdout that does not break the bar (printed above it on a terminal)."""
        if self._bar is not None:
            self._bar.write(msg, file=sys.stdout)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.set_description_str("train", refresh=False)
            self._bar.close()
            self._bar = None
