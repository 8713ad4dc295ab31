"""Turn raw sources into a curated mixture: manifest.parquet, quarantine.jsonl, removed.jsonl, report.json/.md.

    python curate.py                                        # the dirty built-in world, every stage
    python curate.py curate/source=world                    # the clean built-in world
    python curate.py curate/source=llava sources.mine.path=/d/train.json sources.mine.image_root=/d/images
    python curate.py curate/stages=validate_only            # validation only (the "raw" mixture)
    python curate.py semantic.epsilon=0.05 output_dir=curated/eps05
    python train.py data=manifest data.path=curated/manifest.parquet
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from vlm_core.cli import register_curate_configs, to_curate_config

register_curate_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="curate")
def main(cfg: DictConfig) -> None:
    from curation.pipeline import run_curation  # after Hydra has set up logging

    result = run_curation(to_curate_config(cfg))
    counts = result.report["counts"]
    print(
        f"curated {counts['ingested']} records: {counts['kept']} kept, {counts['quarantined']} quarantined, "
        f"{counts['removed']} removed {counts['removed_by_stage']} → {result.output_dir}/manifest.parquet"
    )
    for name, truth in result.report["truth"].items():
        recall = ", ".join(f"{k} {v:.1%}" for k, v in truth["recall"].items())
        print(f"{name}: recall per planted class: {recall}; clean removed {truth['clean_removed_rate']:.2%}")


if __name__ == "__main__":
    main()
