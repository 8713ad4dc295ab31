"""Read a benchmark's figures back off its plot, for a run whose table was lost but whose PNG survived.

Why this exists: on 2026-11-24 the only H100 session of issue 3 ran ``bench_packed_attention.py --head-dims
128`` to the end, then ``--head-dims 64`` with the same output name; that second run was cut by the stage's
time limit after writing its (empty) table, which replaced the head-dim-128 table. Its PNG, drawn by
``benchmarks/report.py`` when the first run finished, was left as it was. The device time was spent, so
this script reads the bars back instead (the benchmark now names its files by head dim, so it cannot
happen again).

How: :func:`report.plot` draws one panel per mode with a bar per provider and configuration, in the
tab10 colours in provider order, on a log axis where the values span more than 30x. For each panel
this finds the axes frame, fits row = a + b log10(value) to the y-axis tick marks (major and minor),
takes the bars' colours at the panel's foot and their tops, and assigns each bar to the nearest x tick.
A top is known to about half a pixel (the share of the antialiased pixel above it that the bar covers
counts as a fraction of a pixel), a value to about 10**(0.6 / pixels per decade): 1.2-1.4% on the
attention PNG (104-118 pixels per decade). Measured on
plots of known values drawn through report.plot (tests/benchmarks/test_recover_bar_plot.py, 3 seeds, 640
bars): errors within -0.65..+0.59 pixel, at most 1.5%; the test holds every value to 2%.

    python benchmarks/recover_bar_plot.py            # the H100 attention PNG -> its .md/.csv, judged
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_packed_attention import PROVIDERS
from benchmarks.report import END, write_tables

# The 2026-11-24 run's providers, in the order its plot coloured them: bench_packed_attention's list up to
# flash_attn4 (providers added since are appended after it, so they never shift these colours).
RUN_PROVIDERS = PROVIDERS[: PROVIDERS.index("flash_attn4") + 1]

# matplotlib's tab10, which report.plot cycles through in provider order
TAB10 = np.array([(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                  (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)], dtype=float)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Bar:
    colour: int  # index into TAB10: the provider's position in the plot's provider order (mod 10)
    config: int  # which x tick (configuration), left to right
    value: float


@dataclasses.dataclass(frozen=True)
class Panel:
    top: int  # rows of the axes frame
    bottom: int
    pixels_per_decade: float
    fit_residual_px: float  # worst distance of a tick mark from the fitted line
    bars: list[Bar]


def _colour(pixel: np.ndarray) -> int | None:
    distances = ((TAB10 - pixel) ** 2).sum(axis=1)
    best = int(distances.argmin())
    return best if distances[best] < 300 else None


def _bar_top(column: np.ndarray, colour: int) -> float:
    """Row of a bar's top edge (fractional) in a column of pixels (top to bottom) that ends inside the bar.

    Scans upwards from the foot. Where the legend covers the bar (white at alpha 0.8), the bar shows
    through as 0.8 white + 0.2 colour; gaps of up to 3 pixels (the legend's frame) are crossed when the
    bar, covered or not, goes on above them."""
    plain = TAB10[colour]
    covered = 0.8 * 255 + 0.2 * plain
    under_legend = [((p - covered) ** 2).sum() < 60 for p in column]
    for start in range(len(column)):  # a covered stretch is taller than a grid line, which can match grey
        if under_legend[start] and (start == 0 or not under_legend[start - 1]):
            stop = start
            while stop < len(column) and under_legend[stop]:
                stop += 1
            if stop - start < 3:
                under_legend[start:stop] = [False] * (stop - start)
    inside = [((p - plain) ** 2).sum() < 300 or covered_p for p, covered_p in zip(column, under_legend)]
    row = len(column) - 1
    while row > 0:
        if inside[row - 1]:
            row -= 1
        elif any(inside[max(0, row - 4) : row - 1]):
            row = next(r for r in range(row - 2, max(0, row - 4) - 1, -1) if inside[r])
        else:
            break
    # the antialiased pixel above (an edge not snapped to the pixel grid): the share of it that the bar covers
    white = np.full(3, 255.0)
    above = column[row - 1] if row > 0 else white
    return row - float(np.clip(np.dot(white - above, white - plain) / np.dot(white - plain, white - plain), 0, 1))


def read_panels(png: Path) -> list[Panel]:
    """Every log-scale panel of a report.plot PNG, top to bottom, with its bars' values."""
    from PIL import Image

    image = np.asarray(Image.open(png).convert("RGB"), dtype=float)
    height, width, _ = image.shape
    dark = image.sum(axis=2) < 300
    frame_rows = np.flatnonzero(dark.sum(axis=1) > 0.6 * width)
    frame_cols = np.flatnonzero(dark.sum(axis=0) > 0.3 * height)
    if len(frame_rows) < 2 or len(frame_rows) % 2 or len(frame_cols) < 2:
        raise ValueError(f"{png}: no axes frames found (is it a benchmarks/report.py plot?)")
    left, right = int(frame_cols[0]), int(frame_cols[-1])
    panels = []
    for top, bottom in zip(frame_rows[0::2].tolist(), frame_rows[1::2].tolist()):
        ticks = []  # (row, length) of the tick marks left of the y axis
        for row in range(top, bottom + 1):
            length = 0
            while left - 1 - length > 0 and dark[row, left - 1 - length]:
                length += 1
            if length >= 2:
                ticks.append((row, length))
        longest = max((n for _, n in ticks), default=0)
        majors = [r for r, n in ticks if n == longest]
        if len(majors) < 2 or len(ticks) <= len(majors):
            raise ValueError(f"{png}: the panel at rows {top}-{bottom} has no log axis (majors {majors})")
        step = (majors[-1] - majors[0]) / (len(majors) - 1)  # pixels per decade, roughly
        rows, logs = [], []
        for row, _ in ticks:  # decade of the lowest major taken as 0: only differences matter until the labels
            position = (majors[-1] - row) / step
            decade = math.floor(position + 1e-6)
            multiple = round(10 ** (position - decade))
            rows.append(row)
            logs.append(decade + math.log10(multiple))
        slope, intercept = np.polyfit(logs, rows, 1)
        residual = float(np.abs(intercept + slope * np.array(logs) - rows).max())
        # x ticks: short marks below the frame, at the configurations' centres
        x_ticks = [c for c in range(left + 1, right) if dark[bottom + 2, c] and not dark[bottom + 2, c - 1]]
        bars, column = [], left + 1
        while column < right:
            colour = _colour(image[bottom - 2, column])
            if colour is None:
                column += 1
                continue
            start = column
            while column < right and _colour(image[bottom - 2, column]) == colour:
                column += 1
            centre = (start + column) // 2
            row = _bar_top(image[top + 1 : bottom, centre], colour) + top + 1
            config = int(np.argmin([abs(t - centre) for t in x_ticks])) if x_ticks else 0
            bars.append(Bar(colour, config, (row - intercept) / slope))  # log10 value, decade offset not yet known
        panels.append(Panel(top, bottom, float(-slope), residual, bars))
    return panels


def calibrate(panel: Panel, lowest_major: float) -> Panel:
    """The panel with its bars in real units, given the value of its lowest labelled decade (10, 100, ...)."""
    offset = math.log10(lowest_major)
    bars = [dataclasses.replace(b, value=10 ** (b.value + offset)) for b in panel.bars]
    return dataclasses.replace(panel, bars=bars)


# ------------------------------------------------------------------------------------------ the lost table

PNG = ROOT / "benchmarks" / "results" / "packed_attention_nvidia-h100-80gb-hbm3.original.png"
STEM = "packed_attention_nvidia-h100-80gb-hbm3"
# bench_packed_attention.py's defaults on CUDA, in its loop order (workload, total, heads); Dh 128
CONFIGS = [(w, t, hkv) for w in ("llava", "causal") for t in (8192, 16384, 32768) for hkv in (8, 32)]
PANELS = (("forward", "TFLOP/s", 10.0), ("backward", "TFLOP/s", 10.0), ("full", "TFLOP/s", 10.0),
          ("full", "peak MiB", 1000.0))  # fmt: skip  (mode, metric, the value of the lowest labelled major tick)
HEADER = [
    "device: NVIDIA H100 80GB HBM3",
    "date: 2026-11-24 12:38 UTC",
    "commit: fe010780e837",
    "versions: torch 2.11.0+cu130, CUDA 13.0, triton 3.6.0, flash-attn not installed, flash-attn-4 4.0.0b36",
    "command: `python benchmarks/bench_packed_attention.py --head-dims 128`",
    "samples: image span 576 tokens, 1-3 images per sample; dtype bf16",
    "times: medians (do_bench); ms not recovered (the plot shows rates only)",
    "FLOPs: 4 * Hq * Dh * allowed pairs (forward), x2.5 backward, x3.5 full; x vs ours = TFLOP/s(ours) / TFLOP/s",
    "RECOVERED: every figure is read back off the run's plot (packed_attention_nvidia-h100-80gb-hbm3.original.png) "
    "by `python benchmarks/recover_bar_plot.py`, to about +-1.5% (half a pixel on a log axis); see that script",
]


def recovered_rows(png: Path = PNG) -> list[dict]:
    panels = read_panels(png)
    if len(panels) != len(PANELS):
        raise ValueError(f"{png}: {len(panels)} panels, expected {len(PANELS)} (forward, backward, full, peak MiB)")
    values: dict[tuple[int, str, str, int], float] = {}  # (config, mode, metric, provider) -> value
    for (mode, metric, lowest), panel in zip(PANELS, panels):
        for bar in calibrate(panel, lowest).bars:
            values[(bar.config, mode, metric, bar.colour)] = bar.value
    rows = []
    for c, (workload, total, hkv) in enumerate(CONFIGS):
        for mode in ("forward", "backward", "full"):
            ours = values.get((c, mode, "TFLOP/s", 0))
            for p, provider in enumerate(RUN_PROVIDERS):
                rate = values.get((c, mode, "TFLOP/s", p))
                row = {"workload": workload, "total": total, "Hq": 32, "Hkv": hkv, "Dh": 128, "dtype": "bf16",
                       "mode": mode, "provider": provider}  # fmt: skip
                if rate is None:
                    row["note"] = "no bar (skipped or failed in the run; its log says why)"
                else:
                    row["TFLOP/s"] = f"{rate:.3g}"
                    if ours is not None:
                        row["x vs ours"] = f"{ours / rate:.2f}"
                    peak = values.get((c, "full", "peak MiB", p)) if mode == "full" else None
                    row["peak MiB"] = "" if peak is None else f"{peak:.3g}"
                rows.append(row)
    return rows


def main() -> None:
    rows = recovered_rows()
    columns = ["workload", "total", "Hq", "Hkv", "Dh", "dtype", "mode", "provider", "TFLOP/s", "x vs ours",
               "peak MiB", "note"]  # fmt: skip
    title = "Packed attention benchmark, recovered from its plot"
    md_path = PNG.parent / f"{STEM}.md"
    # what was written by hand below the generated block stays: these figures do not change between runs
    notes = md_path.read_text().partition(END)[2] if md_path.is_file() else ""
    md, csv = write_tables(title, rows, HEADER, PNG.parent, STEM, columns)
    if notes.strip():
        md.write_text(md.read_text().rstrip("\n") + notes)
    print(f"wrote {md} and {csv}", file=sys.stderr)


if __name__ == "__main__":
    main()
