"""Graph passes: detection and rewriting, one plain function per step."""
