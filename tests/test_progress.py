"""The report protocol and the caller's recorder: stage records, plain lines
when the stream is not a terminal, totals learnt late, zero-width terminals."""

from __future__ import annotations

import io

import mlx.core as mx

from mlx_omnimatte import progress as P


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_stage_helper_reports_start_ticks_and_end():
    seen = []
    with P.stage(lambda *a: seen.append(a), "work", 3) as tick:
        tick("a")
        tick("b", n=2)
    assert seen == [("work", 0, 3, ""), ("work", 1, 3, "a"), ("work", 3, 3, "b")]
    seen.clear()
    with P.stage(lambda *a: seen.append(a), "open-ended") as tick:
        tick()
    assert seen[-1] == ("open-ended", 1, 1, "")  # closed with what was done
    with P.stage(None, "silent", 2) as tick:  # no callback: nothing to do, nothing fails
        tick()


def test_plain_lines_when_not_a_terminal(monkeypatch):
    stream = io.StringIO()
    rec = P.Progress(stream=stream)
    monkeypatch.setattr(P, "PLAIN_INTERVAL", 0.0)
    for i in range(4):
        rec("denoise 00", i, 3, f"loss {i}")
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.strip().splitlines()
    assert lines[0].startswith("denoise 00: 0/3 step") and lines[-1].startswith("denoise 00: 3/3 step")
    assert any("ETA" in line for line in lines) and "loss 3" in lines[-1]
    assert [r.name for r in rec.records] == ["denoise 00"]


def test_eta_is_timed_after_the_first_unit(monkeypatch):
    """The first step pays for compilation: it does not set the rate."""
    clock = iter([0.0, 0.0, 100.0, 100.0, 101.0, 101.0])
    monkeypatch.setattr(P.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(P, "PLAIN_INTERVAL", 0.0)
    bar = P._PlainBar("denoise", 10, io.StringIO(), "step")
    bar.update_to(1, "")
    assert "ETA" not in bar.stream.getvalue()
    bar.update_to(2, "")
    assert bar.stream.getvalue().strip().splitlines()[-1] == "denoise: 2/10 step, 101 s, ETA 8 s"


def test_plain_lines_are_rate_limited(monkeypatch):
    stream = io.StringIO()
    rec = P.Progress(stream=stream)
    monkeypatch.setattr(P, "PLAIN_INTERVAL", 3600.0)
    for i in range(1001):
        rec("train", i, 1000, "")
    assert len(stream.getvalue().strip().splitlines()) == 2  # the start and the end


def test_terminal_bar_learns_total_and_survives_zero_width():
    stream = Tty()
    rec = P.Progress(stream=stream)
    rec("vae encode", 0, None)
    rec("vae encode", 1, 6)  # the chunk count arrives with the first chunk
    bar = rec._open[1].bar
    assert bar.total == 6 and bar.ncols and bar.ncols > 0
    rec("vae encode", 6, 6)
    assert rec._open is None and rec.records[0].name == "vae encode"


def test_records_peak_and_rss_per_stage():
    rec = P.quiet()
    rec("alloc", 0, 1)
    a = mx.zeros((512, 1024))  # 2 MiB
    mx.eval(a)
    rec("alloc", 1, 1)
    rec("next", 0, None)  # a new stage closes nothing here; summary closes it
    text = rec.summary()
    assert [r.name for r in rec.records] == ["alloc", "next"]
    assert rec.records[0].peak_bytes >= 2 << 20 and rec.records[0].rss_bytes > 10 << 20
    assert "MLX peak GB" in text and "max RSS GB" in text
