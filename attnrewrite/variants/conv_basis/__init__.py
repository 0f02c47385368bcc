"""conv-basis — attention as a sum of k sub-convolutions, applied by FFT in O(k·n·d·log n).

Math (after Conv-Basis, arXiv 2405.05219 — the construction is ours, the paper's
algorithm text was not available). Let H = exp(s − c) on and below the diagonal, s the
site's scores (scale·q·kᵀ, soft-capped), c one shift shared by every row. Column j's
basis vector is bⱼ = H[j:, j] − H[j−1:n−1, j−1]; H = Σⱼ S(bⱼ, n−j) exactly, where S(b, m)
is zero but for a bottom-right m×m lower-triangular Toeplitz block with first column b.
Keeping k start columns s₀ = 0 < s₁ < … gives H̃ = Σᵢ S(b̃ᵢ, n−sᵢ), which is H with every
column j ∈ [sᵢ, sᵢ₊₁) replaced by start column sᵢ shifted down by j − sᵢ:

    H̃[r, j] = H[sᵢ + r − j, sᵢ]        (r ≥ j, sᵢ ≤ j < sᵢ₊₁)

so H̃·X = Σᵢ cᵢ ∗ X[sᵢ:sᵢ₊₁] — one causal convolution per start column cᵢ = H[sᵢ:, sᵢ]
(the telescoped form of Σ S(b̃ᵢ), without the differences' cancellation). Only the k
columns of q·kᵀ are computed (O(k·n·d)). Output O = (H̃V) / (H̃·1) row by row.
Bidirectional sites add a second basis for the strictly upper triangle: the same
construction on the reversed sequence.

Applying H̃ (n > DENSE_MAX_N), overlap-save: the rows are cut into nb blocks of P (a power
of two near n / FFT_BLOCKS), and the columns into segments, each one block intersected with
one start's columns (at most nb + k). Every segment of X = [V·w | w] is transformed once
(size 2P), every start column once per block lag (k·nb windows of 2P lags), and output
block o is Σ over segments s of window(owner s, lag o − block s) · X̂ₛ — for every
frequency one (nb × S)·(S × (d+1)) complex product — then one inverse transform per
output block and column. Work O((nb + k)·n·d·log P + (nb + k)·n·d), memory O((nb + k)·n·d).

Start columns (`starts`):
  norm     (default) 0 and the k − 1 columns with the largest difference norm ‖bⱼ‖,
           estimated on ~40 sampled diagonals (O(n·d) each); `eps` drops candidates whose
           norm is below eps·max (fewer than k starts when H is nearly conv).
  search   the recovery of the co-authors' public code (hliuav/k_conv_basis), in our words:
           after start s, binary-search j ∈ (s, n − T] for the first column whose diagonal
           segment (scores s[j + t, j], t < T = `segment`) differs in ℓ1 by at least `delta`
           from the last start's segment — that is, from the running sum of the basis
           vectors built on the scores; O(log n) probes of T·d each per start. Their basis
           b̃ᵢ = exp(b₁ + … + bᵢ) − exp(b₁ + … + bᵢ₋₁) sums to exactly the H̃ above for the
           same starts (the cumulative sums are the start columns' scores), so the
           apply step is shared; we subtract the shift c where they exponentiate raw scores.
  0,5,9    fixed columns (0 is always added).
k ≥ n keeps every column: H̃ = H, exact to round-off.

Numerics: c is shared by all rows (a per-row max breaks the Toeplitz structure), so a row
whose scores sit far below the global maximum has a normaliser H̃·1 of the size of the
FFT's round-off. `precision`: float64, or float32 (scores, kernels, transforms); `auto` is
float32 on the FFT path for float32/half inputs and float64 otherwise (the dense path and
float64 inputs). Rows whose normaliser is below `RELIABLE` (float64) or `RELIABLE_F32`
times its FFT error estimate (unit round-off × log₂ of the transform size × Σ over the
segments reaching the row's block of ‖window‖·‖w on the segment‖) are recomputed exactly
(O(n·d) each, in the working precision) and counted.
Masks: a key-only bias (padding) and the causal pattern are supported — the key bias
becomes a weight on V and on the ones vector; any other bias keeps the site exact.
Dropout: with dropout_p > 0 the op computes exact attention with dropout (the same mask as
`exact` for the same seed); the rewrite keeps such sites exact anyway.

Files: options.py (parameters, the op's argument order), selection.py (start columns: norm,
search, the k score columns), convolve.py (H̃·x: dense or overlap-save), compute.py (attend_heads,
the basis error, `reference`, the kernel path), planning.py (prepare, needs_samples, auto_ladder,
diagnostics), onnx_steps.py (what both ONNX lowerings share, the start columns among it),
onnx_dense.py, onnx_dft.py (the two lowerings), onnx_lowering.py (which one a site gets).
"""
from __future__ import annotations

from ...kernels.dispatch import Host, KernelPlan
from .. import costing
from ..base import BACKWARD_OPS, Variant, define_attention_op
from . import compute, convolve, onnx_dense, onnx_dft, onnx_lowering, onnx_steps, options, planning, selection
from .compute import (RELIABLE, RELIABLE_F32, _attend, _kernel_plan, attend_heads, kernel_forward, reference,
                      split_mask, working_dtype)
from .convolve import (DENSE_MAX_N, FFT_BLOCKS, FFT_CHUNK, FFT_MIN_BLOCK, UNIT, _conv_apply, _dense_apply,
                       _overlap_save, fft_block)
from .onnx_lowering import ONNX_DFT_MIN_N, ONNX_DFT_OPSET, onnx_lower
from .onnx_steps import ONNX_OFFSET_TABLE_N, _offset_table
from .options import NAME, OP_ARGS, OP_NAME, PARAMS, StartsParam, op_args
from .planning import auto_ladder, diagnostics, needs_samples, prepare
from .selection import DIAG_BAND, SAMPLED_DIAGONALS, _start_columns, find_starts, search_starts

KERNEL = KernelPlan(lambda params, causal: ("conv_basis", ()), host=Host(_kernel_plan, kernel_forward),
                    note="conv_basis: forward only — the start search and the FFT apply run in PyTorch between the "
                         "kernels (start columns; normalisation with the reliability test; exact rows); the "
                         "backward runs the reference")
op = define_attention_op(OP_NAME, reference, OP_ARGS, kernel=KERNEL)
backward_op = BACKWARD_OPS[OP_NAME]

VARIANT = Variant("conv-basis", OP_NAME, PARAMS, reference, op, op_args, diagnostics,
                  onnx_lower=onnx_lower, cost_model=costing.conv_basis_model,
                  prepare=prepare,
                  needs_samples=needs_samples,
                  auto_ladder=auto_ladder)
