"""The variants: one file each, one `base.Variant` object each (`<file>.VARIANT`).

`resolve(name)` turns what a user wrote ("conv-basis", "conv_basis", or a Variant) into the
object; the CLI, the Python API and the compile backend call it once and hand the object
down. `registry()` holds the four built in here and every variant another package
registers under the entry-point group `attnrewrite.variants`::

    # pyproject.toml of a package that adds a variant
    [project.entry-points."attnrewrite.variants"]
    temperature = "my_package.temperature:VARIANT"

The object an entry point names is a `base.Variant` (its op made with
`base.define_attention_op`, so it exports, compiles and trains like the built-in ones).
What a variant file defines, and what each callable receives, is documented on `Variant`.

`reference` draws nothing random but its dropout mask, from the global RNG in a fixed order,
so that run under base.seeded_rng(dropout_seed) the mask is a pure function of the seed and
the backward op replays it.
"""
from __future__ import annotations

from importlib.metadata import entry_points

from . import conv_basis, exact, preconditioned, sparse
from .base import Variant

ENTRY_POINTS = "attnrewrite.variants"
BUILT_IN = (exact.VARIANT, preconditioned.VARIANT, conv_basis.VARIANT, sparse.VARIANT)
BASELINE = exact.VARIANT     # what a site costs before any rewrite: the attention the graph computes
_registry: dict[str, Variant] | None = None


def registry(reload: bool = False) -> dict[str, Variant]:
    """{name as users write it: Variant}: the built-in ones, then the entry points' (loaded once)."""
    global _registry
    if _registry is None or reload:
        found = {v.name: v for v in BUILT_IN}
        for ep in entry_points(group=ENTRY_POINTS):
            v = ep.load()
            if not isinstance(v, Variant):
                raise TypeError(f"entry point {ep.name} = {ep.value} in {ENTRY_POINTS} is not an "
                                "attnrewrite.variants.base.Variant")
            if v.name in found and found[v.name] is not v:
                raise ValueError(f"two variants are named {v.name!r} (entry point {ep.value})")
            found[v.name] = v
        _registry = found
    return _registry


def resolve(variant) -> Variant:
    """The Variant `variant` names ("conv-basis" or "conv_basis"); ValueError listing the known ones."""
    if isinstance(variant, Variant):
        return variant
    known = registry()
    name = str(variant).replace("_", "-")
    for v in known.values():
        if v.name.replace("_", "-") == name:
            return v
    raise ValueError(f"unknown variant '{variant}' (choose from {', '.join(sorted(known))})")


def names() -> list[str]:
    return sorted(registry())


VARIANTS = {v.key: v for v in BUILT_IN}      # the built-in ones by key ("conv_basis"); all: registry()
