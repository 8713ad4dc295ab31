"""Curation: sources → validated samples → curated mixture (a manifest), as ``curate.py`` runs it.

    sources/       LLaVA JSON/JSONL, ShareGPT messages, WebDataset shards, the built-in world (clean or dirty)
    images.py      image files → ImageFacts (header-first pixel cap, decode, hashes, thumbnail)
    ingest.py      sources → validated Items + quarantined records
    stages/        validate, exact, near, semantic, quality, balance, mixture: pure functions → StageResult
    embed.py       image and text embeddings, cached by content hash (cache.py)
    pipeline.py    the run: stages in order, resume, accounting; manifest_writer.py, report.py, truth.py
"""
