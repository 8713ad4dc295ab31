"""benchmarks/recover_bar_plot.py reads known values back off plots that benchmarks/report.py draws."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.recover_bar_plot import CONFIGS, RUN_PROVIDERS, read_panels
from benchmarks.report import write_tables


def known_table(seed: int) -> list[dict]:
    """The attention benchmark's layout (12 configurations, 8 providers, 3 modes, peak memory in full mode),
    with the gaps the H100 run had: reference only at the smallest total, flash_attn never, the causal-only
    providers only on the causal workload. Log-uniform values spanning the ranges that run saw."""
    rng = np.random.default_rng(seed)
    rows = []
    for workload, total, hkv in CONFIGS:
        for mode in ("forward", "backward", "full"):
            for provider in RUN_PROVIDERS:
                row = {"workload": workload, "total": total, "Hkv": hkv, "mode": mode, "provider": provider}
                skipped = (provider.startswith("reference") and total > 8192) or provider == "flash_attn" or (
                    provider in ("varlen", "flash_attn4") and workload == "llava")
                if not skipped:
                    row["TFLOP/s"] = f"{10 ** rng.uniform(0.5, 2.7):.4g}"
                    row["peak MiB"] = f"{10 ** rng.uniform(2.1, 4.3):.4g}"
                rows.append(row)
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_values_come_back_within_two_percent(tmp_path, seed):
    rows = known_table(seed)
    md, _ = write_tables("synthetic", rows, ["device: test"], tmp_path, "synthetic")
    panels = read_panels(md.with_suffix(".png"))
    assert len(panels) == 4  # forward, backward, full, peak MiB (full)
    for panel, (mode, metric) in zip(panels, [("forward", "TFLOP/s"), ("backward", "TFLOP/s"), ("full", "TFLOP/s"),
                                              ("full", "peak MiB")]):  # fmt: skip
        want = {(c, RUN_PROVIDERS.index(r["provider"])): math.log10(float(r[metric]))
                for c, config in enumerate(CONFIGS) for r in rows
                if (r["workload"], r["total"], r["Hkv"]) == config and r["mode"] == mode and metric in r}  # fmt: skip
        got = {(b.config, b.colour): b.value for b in panel.bars}  # log10, up to the axis' decade offset
        assert got.keys() == want.keys(), f"{mode} {metric}: bars {sorted(got)} vs rows {sorted(want)}"
        offsets = [want[k] - got[k] for k in want]
        decade = round(float(np.median(offsets)))
        assert abs(float(np.median(offsets)) - decade) < 0.01  # the tick fit puts majors on whole decades
        worst = max(abs(10 ** (got[k] + decade - want[k]) - 1) for k in want)
        assert worst < 0.02, f"{mode} {metric}: worst relative error {worst:.3%}"
        assert panel.fit_residual_px < 1.0


def test_a_png_without_axes_is_refused(tmp_path):
    from PIL import Image

    blank = tmp_path / "blank.png"
    Image.new("RGB", (200, 100), "white").save(blank)
    with pytest.raises(ValueError, match="no axes frames"):
        read_panels(blank)


def test_rerunning_the_recovery_keeps_the_notes_written_below_the_table(tmp_path, monkeypatch):
    import shutil

    from benchmarks import recover_bar_plot as recover

    png = tmp_path / recover.PNG.name
    shutil.copy(recover.PNG, png)
    monkeypatch.setattr(recover, "PNG", png)
    md = tmp_path / f"{recover.STEM}.md"
    recover.main()
    md.write_text(md.read_text() + "\n## Written by hand\n\nkept\n")
    recover.main()
    text = md.read_text()
    assert text.endswith("<!-- benchmarks/report.py: end -->\n\n## Written by hand\n\nkept\n")
    assert text.count("## Written by hand") == 1 and "| llava | 16384 | 32 | 8 | 128 | bf16 | full | ours |" in text
