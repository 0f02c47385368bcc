"""sparse — each query keeps a set Ωᵢ of keys and renormalises its softmax over it.

Math. With sᵢⱼ = scale·qᵢ·kⱼ (soft-capped) + biasᵢⱼ and the dense row pᵢ = softmax(sᵢ),

    qᵢⱼ = pᵢⱼ / mᵢ  for j ∈ Ωᵢ (else 0),   mᵢ = Σ_{j∈Ωᵢ} pᵢⱼ   (the dense mass kept),
    oᵢ = Σⱼ qᵢⱼ vⱼ  — the same as softmax over the kept scores only.

Error identity (every mode): ‖pᵢ − qᵢ‖₁ = (1 − mᵢ) + mᵢ(1/mᵢ − 1) = 2(1 − mᵢ), hence
‖oᵢ − ôᵢ‖₂ ≤ 2(1 − mᵢ)·maxⱼ‖vⱼ‖₂. The rewrite is exact iff mᵢ = 1, i.e. when Ωᵢ covers
every unmasked key. `diagnostics` reports mᵢ (min, mean, per head) and the measured
identity gap. A row with no visible key (or whose Ωᵢ holds none) returns zeros, never NaN.

Modes (Lq, Lk the query/key lengths; i' = i + Lk − Lq is query i's key position, the
bottom-right alignment `causal` uses in base.py):
  topk    Ωᵢ = the k highest scores of row i (torch.topk: exactly k, ties broken by it), taken
          *after* the mask and causal bias, so a masked key is never chosen over a visible one.
          k is clamped to Lk; k ≥ Lk is exact.
  window  Ωᵢ = band ∪ sinks, intersected with the causal visibility when `causal`:
            band "backward" (default for causal sites):  i' − window < j ≤ i'   (`window` keys
                                                          ending at the diagonal)
            band "two-sided" (default otherwise):       |j − i'| ≤ window // 2
            sinks:                                      j < sinks   (StreamingLLM's first tokens)
          `band=auto` means backward when the site is causal — its causal flag or, at rewrite
          time, a mask that removes exactly the keys after the diagonal — else two-sided.
          A chunk of c ≤ max(width, 64) rows scores only the sinks and its band's contiguous
          span (c + width − 1 keys, width = the band's key count): O(Lq·(window + sinks)·D)
          work, never all Lk keys.
          window ≥ Lk (backward) or window ≥ 2·max(Lq, Lk) (two-sided) is exact.
  block   queries and keys cut in blocks of `block` (block I holds rows I·b … I·b+b−1).
          For each query block, key blocks are ranked by their dense softmax mass summed
          over the block's rows and kept best-first; selection stops at whichever target is
          met first: `density` (kept ≤ ⌈density · #visible key blocks⌉) or `mass` (stop once the
          mean row mass kept in the query block reaches `mass`; mass = 1 switches this stop
          off, so the default selects by density alone). density = 1 is exact.
          select=pooled ranks key blocks without scoring any key: by the pooled logit
            z_IJ = scale·q̄_I·k̄_J (soft-capped) + mean bias over the block + log(visible pairs)
          (q̄, k̄ the block means; the log of the block's mass were all its scores equal), O(nq·nk·D);
          then each chunk gathers only its kept key blocks and scores those: O(Lq·kept·b·D) work
          in all. The mass stop then uses the pooled shares. density = 1 is still exact.
          budget=global replaces the one density by one per query head (`head_density`, filled in
          at rewrite time by share_budget from the example inputs); each head keeps ⌈dₕ · n_I⌉.
  topk with select=pooled: the candidates are the keys of the key blocks block mode would keep at
          `density` (at least ⌈k/b⌉ + 1 blocks, so k ≥ Lk is exact); Ωᵢ = the k best among them.

Normal form, GQA, masks and the causal convention are base.py's; half inputs are computed in
fp32; dropout (training) applies to the renormalised weights, as in exact. Chunks run in order
and each draws its mask from the RNG in turn; a checkpointed chunk restores the RNG state it
started from before recomputing (torch.utils.checkpoint's preserve_rng_state), so a seeded
call and its backward see the same masks.

Memory: queries are processed in chunks of ≤ CHUNK_ELEMENTS scores (chunk·Lk for topk/block —
causal chunks score only the keys up to their last diagonal — chunk·(chunk + window + sinks)
for window, chunk·kept blocks·b for select=pooled), so no (Lq, Lk) tensor ever exists; topk also
keeps O(chunk·k·D); under autograd each
chunk is checkpointed (recomputed in backward, as Gupta et al. 2021 do), keeping backward
memory linear as well. Selections (top-k, block ranking) are data-dependent and happen per
input at run time; gradients flow through the kept scores, not through the selection.
"""
from __future__ import annotations

from ...kernels.dispatch import KernelPlan, selected_lists, topk_indices
from .. import costing
from ..base import BACKWARD_OPS, Variant, define_attention_op
from . import blocks, compute, onnx_lowering, options, planning, scores
from .blocks import _block_plan, _block_stats, _n_keep, _select
from .onnx_lowering import onnx_lower
from .options import NAME, OP_ARGS, OP_NAME, PARAMS, inapplicable, op_args, _options
from .planning import auto_ladder, diagnostics, needs_samples, prepare, share_budget
from .compute import FLEX_WINDOW, kept_blocks, reference

# ---------------------------------------------------------------- the generated kernels

def _kernel_template(params: tuple, causal: bool):
    """Which template covers a call with these op arguments (op_args' order): window → window
    (its band as BEFORE/AFTER, and SINKS), top-k with an exact selection → topk, block and heads →
    block_sparse on the blocks `kept_blocks` picks (blocks a multiple of 16)."""
    mode, _, window, sinks, band, block = params[:6]
    if mode == "window":
        backward = band == "backward" or (band == "auto" and causal)
        before, after = (window - 1, 0) if backward else (window // 2, window // 2)
        return "window", (("BEFORE", int(before)), ("AFTER", int(after)), ("SINKS", int(sinks)))
    if mode == "topk":
        select = params[8] if len(params) > 8 else "exact"
        if select != "exact":
            return None, (f"sparse mode=topk select={select}: its candidates come from pooled block "
                          "scores; the top-k template gathers an exact selection only")
        return "topk", ()
    if mode in ("block", "heads"):
        if int(block) % 16:
            return None, (f"sparse mode={mode} block={block}: the block-sparse kernel needs blocks that are a "
                          "multiple of 16 (its tiles divide them, and a GPU dot takes at least 16 rows)")
        return "block_sparse", (("SPARSE_M", int(block)), ("SPARSE_N", int(block)))
    return None, f"sparse mode={mode!r} has no template"


def _kernel_extra(cfg, args, backward: bool) -> tuple:
    """The top-k template's indices, or the block-sparse template's layout of the kept blocks."""
    q, k, v, mask, scale, softcap, causal, dropout_p, *params = args
    if cfg.template == "topk":
        return (topk_indices(q, k, mask, scale, softcap, causal, params[1]),)
    if cfg.template == "block_sparse":
        return selected_lists(kept_blocks(*args), args, dict(cfg.params)["SPARSE_M"], backward)
    return ()


KERNEL = KernelPlan(_kernel_template, _kernel_extra)
op = define_attention_op(OP_NAME, reference, OP_ARGS, fast=(FLEX_WINDOW,), kernel=KERNEL)
backward_op = BACKWARD_OPS[OP_NAME]


VARIANT = Variant("sparse", OP_NAME, PARAMS, reference, op, op_args, diagnostics,
                  onnx_lower=onnx_lower, cost_model=costing.sparse_model,
                  prepare=prepare,
                  needs_samples=needs_samples,
                  auto_ladder=auto_ladder,
                  inapplicable=inapplicable,
                  share_budget=share_budget)

# the parts, and the names tests and benchmarks read from the package
__all__ = ["NAME", "OP_NAME", "PARAMS", "VARIANT", "KERNEL", "op", "backward_op", "op_args", "reference",
           "kept_blocks", "diagnostics", "prepare", "needs_samples", "auto_ladder", "share_budget",
           "inapplicable", "onnx_lower", "blocks", "compute", "onnx_lowering", "options", "planning", "scores",
           "_options", "_block_plan", "_block_stats", "_n_keep", "_select"]
