"""Turn raw sources into a curated mixture: manifest.parquet, quarantine.jsonl, removed.jsonl, report.json/.md.

    python curate.py                                        # the dirty built-in world, every stage
    python curate.py curate/source=world                    # the clean built-in world
    python curate.py curate/source=llava sources.mine.path=/d/train.json sources.mine.image_root=/d/images
    python curate.py curate/stages=validate_only            # validation only (the "raw" mixture)
    python curate.py semantic.epsilon=0.05 output_dir=curated/eps05
    python train.py data=manifest data.path=curated/manifest.parquet

Semantic dedup across jobs (one per shard of clusters; README "Semantic dedup across jobs"):
    python curate.py -m semantic.shards=4 semantic.shard=0,1,2,3 output_dir=curated/big [hydra/launcher=...]
    python curate.py semantic.shards=4 output_dir=curated/big      # merges the 4 shards, then the later stages
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from vlm_core.cli import register_curate_configs, to_curate_config

register_curate_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="curate")
def main(cfg: DictConfig) -> None:
    from curation.pipeline import ShardResult, run_curation  # after Hydra has set up logging

    result = run_curation(to_curate_config(cfg))
    if isinstance(result, ShardResult):
        print(f"semantic shard {result.shard} of {result.shards}: {result.pairs} pairs → {result.path}; "
              f"run again without semantic.shard to merge the shards and finish the mixture")
        return
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
