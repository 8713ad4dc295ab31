"""scripts/fa4_wheels.sh: the wheels packed in two parts, carried by two calls, joined, checked and installed.

A stand-in wheel plays flash-attn 4 and the CUTLASS DSL: its ``flash_attn.cute`` imports a package that only a
.pth file puts on sys.path, as nvidia-cutlass-dsl's ``cutlass`` is, and it carries 300 kB of random bytes;
a wheel named ``pytest`` plays a distribution the machine already has. Small parts play the 57 MB ones;
"call 1" and "call 2" are two repository folders that each hold one part.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PART_BYTES = 200_000


def wheel(folder: Path, name: str, files: dict[str, str | bytes]) -> Path:
    """A minimal pure-Python wheel of ``files``."""
    info = f"{name}-0.1.dist-info"
    files = {**files, f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    path = folder / f"{name}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for member, content in files.items():
            archive.writestr(member, content)
        archive.writestr(f"{info}/RECORD", "".join(f"{member},,\n" for member in [*files, f"{info}/RECORD"]))
    return path


def fake_wheels(folder: Path) -> None:
    folder.mkdir(parents=True)
    wheel(folder, "flash_attn_standin", {
        "flash_attn/__init__.py": "",
        "flash_attn/cute/__init__.py": "import standin_cutlass\nflash_attn_varlen_func = standin_cutlass.run\n",
        "flash_attn/cute/blob.bin": os.urandom(300_000),  # incompressible: the tar spans both parts
        "standin_dsl/__init__.py": "",
        "standin_dsl/dsl_packages/standin_cutlass/__init__.py": "def run():\n    pass\n",
        "standin_dsl.pth": "import sys, os, standin_dsl; "
                           "sys.path.insert(0, os.path.join(standin_dsl.__path__[0], 'dsl_packages'))\n",
    })  # fmt: skip
    wheel(folder, "pytest", {"pytest_standin_marker.py": ""})


def script(verb: str, fa4_dir: Path, tmp: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, FA4_DIR=str(fa4_dir), FA4_STASH=str(tmp / "stash"), FA4_SITE=str(tmp / "site"),
               FA4_PART_BYTES=str(PART_BYTES), PYTHON=sys.executable)  # fmt: skip
    return subprocess.run(["bash", "scripts/fa4_wheels.sh", verb], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


@pytest.fixture
def packed(tmp_path):
    here = tmp_path / "here"
    fake_wheels(here / "wheels")
    proc = script("pack", here, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return here


def one_call(tmp_path: Path, packed: Path, part: str) -> Path:
    """The repository folder of a device call that carried one part."""
    call = tmp_path / f"call-{part}"
    shutil.copytree(packed / part, call / part)
    return call


def test_two_calls_join_check_and_install(tmp_path, packed):
    sizes = [(packed / p / f"fa4.tar.{n}").stat().st_size for n, p in ((1, "part1"), (2, "part2"))]
    assert sizes[0] == PART_BYTES and 0 < sizes[1] <= PART_BYTES, sizes
    assert (packed / "part1" / "MANIFEST").read_text() == (packed / "part2" / "MANIFEST").read_text()
    first = script("stash", one_call(tmp_path, packed, "part1"), tmp_path)
    assert first.returncode == 0 and "stashed" in first.stdout, first.stderr
    second = script("install", one_call(tmp_path, packed, "part2"), tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "keeping the machine's own pytest" in second.stdout and "installed 1 wheels" in second.stdout
    assert "flash_attn.cute imports" in second.stdout  # through the path only the .pth file adds
    site = tmp_path / "site"
    assert (site / "flash_attn" / "cute" / "blob.bin").stat().st_size == 300_000
    assert not (site / "pytest_standin_marker.py").exists()
    assert (site / ".pythonpath").read_text().split(":")[0] == str(site / "standin_dsl" / "dsl_packages")


def test_a_corrupt_part_is_refused(tmp_path, packed):
    script("stash", one_call(tmp_path, packed, "part1"), tmp_path)
    call = one_call(tmp_path, packed, "part2")
    chunk = call / "part2" / "fa4.tar.2"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0xFF
    chunk.write_bytes(bytes(data))
    proc = script("install", call, tmp_path)
    assert proc.returncode == 1 and "SHA-256" in proc.stderr and not (tmp_path / "site").exists()


def test_install_on_a_fresh_machine_names_the_missing_part(tmp_path, packed):
    proc = script("install", one_call(tmp_path, packed, "part2"), tmp_path)
    assert proc.returncode == 1 and "part 1 is missing" in proc.stderr and "given back" in proc.stderr


def test_pack_without_wheels_and_an_unknown_verb(tmp_path):
    proc = script("pack", tmp_path / "empty", tmp_path)
    assert proc.returncode == 1 and "run 'bash scripts/fa4_wheels.sh download' first" in proc.stderr
    assert script("everything", tmp_path, tmp_path).returncode == 2
