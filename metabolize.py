"""Run the closed data-metabolism loop: evaluate → bad cases → adaptive sampling → generate → curate → retrain.

    python metabolize.py                                     # 3 rounds after round 0, adaptive, on the world
    python metabolize.py strategy=uniform seed=1
    python metabolize.py generators=[teacher,http] http.url=http://127.0.0.1:8000/v1/chat/completions
    python metabolize.py hydra.run.dir=runs/m0               # rerun the same command to resume a killed loop
    python metabolize.py -m strategy=adaptive,uniform,none seed=0,1,2   # sweep → sweep_summary.md/.csv
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from vlm_core.cli import register_metabolize_configs, to_metabolize_config

register_metabolize_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="metabolize")
def main(cfg: DictConfig) -> float | None:
    from vlm_core.loop.rounds import (
        run_loop,  # after Hydra has set up logging and the run directory
    )

    history = run_loop(to_metabolize_config(cfg))
    last = history[-1]
    print(f"{len(history)} rounds → {last['run_dir']}; final mean accuracy {last['overall']:.3f}: "
          + ", ".join(f"{skill} {acc:.3f}" for skill, acc in last["skills"].items()))
    return last["overall"]


if __name__ == "__main__":
    main()
