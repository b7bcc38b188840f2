"""Progress a user can watch: one bar per stage (rate and ETA from tqdm), and
each stage's wall time and peak memory, reported at the end."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import mlx.core as mx
from tqdm import tqdm

from .memory import format_bytes

GB = 1 << 30


@dataclass
class StageRecord:
    name: str
    seconds: float
    peak_bytes: int


@dataclass
class Progress:
    enabled: bool = True
    stream: object = sys.stderr
    records: list[StageRecord] = field(default_factory=list)

    @contextmanager
    def stage(self, name: str, total: int | None = None, unit: str = "it"):
        """Yields a bar; call `bar.update()` per unit of work and
        `bar.set_postfix_str()` for detail (e.g. the expert of a step)."""
        mx.synchronize()
        mx.reset_peak_memory()
        start = time.perf_counter()
        bar = tqdm(total=total, desc=name, unit=unit, file=self.stream, disable=not self.enabled,
                   dynamic_ncols=True, leave=True)
        try:
            yield bar
        finally:
            bar.close()
            mx.synchronize()
            self.records.append(StageRecord(name, time.perf_counter() - start, mx.get_peak_memory()))

    @property
    def peak(self) -> int:
        return max((r.peak_bytes for r in self.records), default=0)

    def lines(self) -> list[str]:
        return [f"{r.name}: peak {format_bytes(r.peak_bytes)}, {r.seconds:.1f} s" for r in self.records]

    def summary(self) -> str:
        lines = [f"{'stage':<28} {'seconds':>9} {'peak GB':>8}"]
        for r in self.records:
            lines.append(f"{r.name:<28} {r.seconds:>9.1f} {r.peak_bytes / GB:>8.2f}")
        return "\n".join(lines)


def quiet() -> Progress:
    return Progress(enabled=False)
