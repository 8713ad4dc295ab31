"""Curation: sources → validated samples → curated mixtures (later issues add dedup, balance, metabolism)."""
