"""A real single-node Slurm cluster on loopback for the tests in this folder (scripts/slurm_local.sh).

The session fixture installs Slurm with apt-get if it is missing (root, Debian/Ubuntu), starts the daemons
(munged, a private MariaDB, slurmdbd, slurmctld, slurmd) and stops them after the session, unless the
cluster was already running before (then it is left as it was). Tests skip, saying why, only when Slurm is
absent and cannot be installed (no apt-get, or not root).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "slurm_local.sh"


def _cluster_running() -> bool:
    status = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True, check=False)
    return "slurmctld running" in status.stdout and "slurmd running" in status.stdout


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[str]:
    """Bring the loopback cluster up (unless it runs already); yield its partition name."""
    installed = all(shutil.which(tool) for tool in ("sbatch", "slurmctld", "slurmd", "munged"))
    if not installed and shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and apt-get is not available to install it (scripts/slurm_local.sh up)")
    was_running = installed and _cluster_running()
    if not was_running:
        if os.geteuid() != 0:
            pytest.skip("starting the loopback Slurm cluster needs root; run `sudo scripts/slurm_local.sh up` first")
        result = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, check=False, timeout=900)
        if result.returncode != 0:
            pytest.fail(f"scripts/slurm_local.sh up failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    yield "debug"
    if not was_running:
        subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True, text=True, check=False, timeout=120)
