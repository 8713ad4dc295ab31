"""Train one VLM on one data mixture, then evaluate it on the held-out split.

    python train.py                                   # the built-in world, tiny model, CPU-sized
    python train.py model=tiny train.max_steps=300 data.world.skills=[color,count]
    python train.py train.resume=true                 # continue the newest run from its checkpoint
    python train.py -m train.lr=1e-3,2e-3             # a sweep (one run directory per job)
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from vlm_core.cli import register_configs, to_job_config

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from vlm_core.train.job import run_job  # after Hydra has set up logging and the run directory

    report = run_job(to_job_config(cfg))
    return None if report is None else report.overall  # the value a sweep optimiser would read


if __name__ == "__main__":
    main()
