"""scripts/ext_probe.py: each probe in a process of its own, and a crashing one reported as such."""

from __future__ import annotations

import pytest

from scripts import ext_probe
from vlm_core.kernels import ext


@pytest.fixture(scope="module")
def built():
    loaded, reason = ext.load_extension()
    if not loaded:
        pytest.skip(f"the extension is not built here ({reason}); make setup builds it")


@pytest.mark.usefixtures("built")
def test_every_probe_behaves_on_a_healthy_build(capsys):
    assert ext_probe.main() == 0
    out = capsys.readouterr().out
    assert out.count("ok   ") == len(ext_probe.PROBES) and "FAIL" not in out, out
    assert "libstdc++" in out  # the runtime the library links, for comparing toolchains


def test_a_probe_that_crashes_its_process_fails_with_the_signal(monkeypatch, capsys):
    monkeypatch.setattr(ext_probe, "PROBES", {
        "segfaults": ("import ctypes; ctypes.string_at(0)", "never"),
        "behaves": ("print('fine')", "fine"),
    })  # fmt: skip
    assert ext_probe.main() == 1
    out = capsys.readouterr().out
    assert "FAIL segfaults: exit -11 (signal 11)" in out and "ok   behaves" in out, out
