"""Progress a user can watch, owned by the caller.

Library stages report through a callback they are given,

    report(stage: str, done: int, total: int | None, detail: str = "")

with ``done = 0`` when a stage starts, after each unit of work, and
``done == total`` when it ends (``report=None``: silent). `stage()` is the
library side's helper for that protocol. `Progress` is the caller's side
(the CLI and the Python API): one bar per stage with rate and ETA on a
terminal, plain lines at a modest rate otherwise (log files get no
carriage-return spam), and per stage its wall time, peak MLX memory, the
process's max RSS and its last detail (e.g. a step cache's computed
forwards), printed at the end.
"""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional

import mlx.core as mx
from tqdm import tqdm

from .memory import GB, format_bytes

Report = Optional[Callable[..., None]]

# units shown on the bars, by a stage name's first word
UNITS = {"denoise": "step", "vae": "frame", "load": "model", "write": "frame", "read": "frame",
         "optimize": "it", "solve": "frame", "segment": "frame", "train": "step", "prepare": "clip", "analyze": "clip"}
PLAIN_INTERVAL = 10.0  # seconds between plain progress lines


@contextmanager
def stage(report: Report, name: str, total: int | None = None):
    """Library side: announces `name`, yields ``tick(detail="", n=1)`` to call
    per unit of work, and reports the end when the block completes."""
    done = 0

    def tick(detail: str = "", n: int = 1) -> None:
        nonlocal done
        done += n
        if report is not None:
            report(name, done, total, detail)

    if report is not None:
        report(name, 0, total, "")
    yield tick
    if report is not None and (total is None or done < total):
        report(name, total if total is not None else done, total if total is not None else done, "")


def max_rss() -> int:
    """Peak resident memory of this process so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass
class StageRecord:
    name: str
    seconds: float
    peak_bytes: int  # MLX peak during the stage
    rss_bytes: int = 0  # the process's max RSS at the stage's end
    detail: str = ""  # the last detail the stage reported


class _PlainBar:
    """Progress as plain lines, at most one every PLAIN_INTERVAL seconds."""

    def __init__(self, name: str, total: int | None, stream, unit: str):
        self.name, self.total, self.stream, self.unit = name, total, stream, unit
        self.start = self.last = time.perf_counter()
        self.n, self.detail = 0, ""
        self.first: tuple[int, float] | None = None  # (units, time) when the first unit was done
        self._line()

    def _line(self) -> None:
        now = time.perf_counter()
        elapsed = now - self.start
        of = f"/{self.total}" if self.total else ""
        eta = ""
        # the first unit pays for compilation and warm-up: the rate is timed after it
        if self.total and self.first and self.n > self.first[0] and self.n < self.total:
            rate = (now - self.first[1]) / (self.n - self.first[0])
            eta = f", ETA {rate * (self.total - self.n):.0f} s"
        detail = f", {self.detail}" if self.detail else ""
        print(f"{self.name}: {self.n}{of} {self.unit}, {elapsed:.0f} s{eta}{detail}", file=self.stream, flush=True)

    def update_to(self, n: int, detail: str, total: int | None = None) -> None:
        self.n, self.detail, self.total = n, detail or self.detail, total or self.total
        now = time.perf_counter()
        if self.first is None and n > 0:
            self.first = (n, now)
        if now - self.last >= PLAIN_INTERVAL:
            self.last = now
            self._line()

    def close(self) -> None:
        self._line()


class _TqdmBar:
    def __init__(self, name: str, total: int | None, stream, unit: str):
        # ncols: a zero-width terminal still gets a bar
        self.bar = tqdm(total=total, desc=name, unit=unit, file=stream, dynamic_ncols=True, leave=True,
                        mininterval=0.5)
        if not self.bar.ncols:
            self.bar.ncols = 80

    def update_to(self, n: int, detail: str, total: int | None = None) -> None:
        if total and self.bar.total != total:
            self.bar.total = total  # learnt after the stage started (e.g. the VAE's chunk count)
        if detail:
            self.bar.set_postfix_str(detail, refresh=False)
        self.bar.update(n - self.bar.n)

    def close(self) -> None:
        self.bar.close()


@dataclass
class Progress:
    """The caller's recorder: pass it (it is callable) as a pipeline's `report`."""

    enabled: bool = True
    stream: object = field(default_factory=lambda: sys.stderr)
    records: list[StageRecord] = field(default_factory=list)
    _open: object = None  # (name, bar, start time)
    _detail: str = ""  # the open stage's last detail

    def report(self, name: str, done: int, total: int | None = None, detail: str = "") -> None:
        if self._open is None or self._open[0] != name:
            self._close()
            self._start(name, total)
        _, bar, _ = self._open
        self._detail = detail or self._detail
        if bar is not None:
            bar.update_to(done, detail, total)
        if total is not None and done >= total:
            self._close()

    __call__ = report  # a Progress is itself the callback

    def _start(self, name: str, total: int | None) -> None:
        mx.synchronize()
        mx.reset_peak_memory()
        bar = None
        if self.enabled:
            unit = UNITS.get(name.split()[0], "it")
            tty = getattr(self.stream, "isatty", lambda: False)()
            bar = (_TqdmBar if tty else _PlainBar)(name, total, self.stream, unit)
        self._open = (name, bar, time.perf_counter())

    def _close(self) -> None:
        if self._open is None:
            return
        name, bar, start = self._open
        self._open = None
        if bar is not None:
            bar.close()
        mx.synchronize()
        self.records.append(StageRecord(name, time.perf_counter() - start, mx.get_peak_memory(), max_rss(),
                                        self._detail))
        self._detail = ""

    @property
    def peak(self) -> int:
        return max((r.peak_bytes for r in self.records), default=0)

    def lines(self) -> list[str]:
        return [f"{r.name}: peak {format_bytes(r.peak_bytes)}, {r.seconds:.1f} s" for r in self.records]

    def summary(self) -> str:
        self._close()
        lines = [f"{'stage':<28} {'seconds':>9} {'MLX peak GB':>11} {'max RSS GB':>10}"]
        for r in self.records:
            lines.append(f"{r.name:<28} {r.seconds:>9.1f} {r.peak_bytes / GB:>11.2f} {r.rss_bytes / GB:>10.2f}"
                         + (f"  {r.detail}" if r.detail else ""))
        return "\n".join(lines)


def quiet() -> Progress:
    """A recorder without bars (stage times and peaks only)."""
    return Progress(enabled=False)
