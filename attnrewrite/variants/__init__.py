"""One file per variant; VARIANTS maps the variant's name (conv_basis ↔ --variant conv-basis) to its module.

A variant module defines:
  NAME, OP_NAME    its name and its permanent op name (attnrewrite::<OP_NAME>)
  PARAMS           {key: base.Param}: the `--set KEY=VALUE` options, defaults and validation
  reference(q, k, v, mask, scale, softcap, causal, dropout_p, *params) -> Tensor
                   the PyTorch reference (what the op runs on CPU; kernels are tested against it)
  op               define_attention_op(OP_NAME, reference, extra_schema): attnrewrite::<OP_NAME>,
                   (normal form, variant params, Tensor? dropout_seed=None) -> out
  backward_op      base.BACKWARD_OPS[OP_NAME]: attnrewrite::<OP_NAME>_backward,
                   (grad, the forward's arguments) -> (dq, dk, dv); the forward's autograd
                   formula calls it, so a kernel can back the backward alone
  op_args(site, options) -> tuple     the variant parameters appended after the normal form
  diagnostics(q, k, v, mask, scale, softcap, causal, options) -> dict   JSON-able, per site
and optionally:
  prepare(site, samples, options) -> dict | str
                   per-site options with rewrite-time state filled in (e.g. a calibrated gain),
                   or a string: why this site stays exact (status "kept"). `samples` holds, per
                   input set, the site's captured normal form {q, k, v, mask, scale, softcap,
                   causal, dropout_p} (K/V before GQA expansion).
  needs_samples(site, options) -> bool
                   whether `prepare` reads captured values for this site (absent: always; a
                   masked site is captured whatever it says); where no site needs them and the
                   check is off, the pipeline plans without running the model.
  auto_ladder(site, options) -> list[dict]
                   option overrides from cheapest to most exact, for `--set auto=true`.

`reference` draws nothing random but its dropout mask, from the global RNG in a fixed order,
so that run under base.seeded_rng(dropout_seed) the mask is a pure function of the seed and
the backward op replays it.
"""
from . import exact

VARIANTS = {exact.NAME: exact}
from . import preconditioned  # noqa: E402
VARIANTS[preconditioned.NAME] = preconditioned
from . import conv_basis  # noqa: E402
VARIANTS[conv_basis.NAME] = conv_basis
from . import sparse  # noqa: E402
VARIANTS[sparse.NAME] = sparse
