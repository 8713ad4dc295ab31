"""Curation stages, in order: validate → exact → near → semantic → quality → balance → mixture.

Each stage is a pure function of arrays built from the items (hashes, embeddings, tags), its config and,
where it draws, a seed. It returns a :class:`curation.records.StageResult`: which inputs it removes, with
a reason each, and per-input columns for the manifest. Files, caches and resume live in
:mod:`curation.pipeline`.
"""
