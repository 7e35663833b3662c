"""Compression-quality evaluation suite (RULER tasks from a package, plus arithmetic)."""
