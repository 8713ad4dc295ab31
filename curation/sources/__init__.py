"""Data sources. Each turns something on disk (or the procedural world) into LLaVA-format records."""
