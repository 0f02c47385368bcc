"""Example models for attnrewrite (importable so `examples.char_gpt:factory` works from the repo root)."""
