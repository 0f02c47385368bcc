"""The cost models: work, memory traffic and parallel depth of one attention site under a variant.

Each variant's `cost_model` is one of the `*_model(dims, options)` functions here (the
variant object points at it; `attnrewrite.cost` is the API that calls them). A model prices
one forward call of the site's attention as the variant's PyTorch reference runs it: which
tensors it builds, how it chunks, when it falls back. Where the reference does more than
its algorithm needs, a second number says what the algorithm needs (`flops_algorithm`,
`depth_algorithm`).

Sizes come from the site. A size that is a string (a symbolic dim such as "s0", or a
+ - * // expression of such names) is evaluated with `sizes={"s0": 128}`; when a name is
missing, or a size is None, the site has no cost: `site_cost` returns None. A None
`kv_heads` means no GQA (kv_heads = heads). v's head dim is taken equal to q's.
Dropout is not priced (inference); neither are the data-dependent parts named below.

Conventions
  flops   matmul (b, m, k) @ (b, k, n) = 2·b·m·k·n (a multiply-add is 2), the count
          torch.utils.flop_counter.FlopCounterMode gives; it is reported alone as
          `flops_matmul`. `flops_fft`: a real FFT (rfft / irfft) of length S costs
          2.5·S·log₂S (half the radix-2 complex count 5·S·log₂S), a complex product 6 and a
          complex add 2 per bin; FlopCounterMode does not count FFTs. `flops_other`: every
          elementwise add/sub/mul/div/exp/tanh/sqrt is 1 per element, a sum or max reduction
          is 1 per element reduced, a dot product outside a matmul 2 per term. Comparisons,
          masked_fill/where, casts, gathers, topk/sort and scatters are 0 flops (selection,
          not arithmetic). flops = flops_matmul + flops_fft + flops_other.
  bytes   q, k, v (k and v with their own kv_heads) read and the output written, at the
          site's dtype; a mask read once, taken as (batch, 1, q_len, kv_len) (1 byte per
          element if boolean, the site's dtype if additive); plus every intermediate the
          table lists, written once and read once (2 × its size), at the dtype the
          reference computes in: fp32 for fp16/bf16 sites, float64 for conv_basis.
          "Working copies" are q at the compute dtype (when it differs from the site's)
          and k, v repeated to `heads` at the compute dtype (when GQA or a cast applies).
  peak_extra_bytes   the largest single intermediate the reference holds (per chunk
          where it chunks), a lower bound on its extra live memory.
  depth   longest path in elementary operations: each elementwise op (arithmetic,
          comparison, select) is 1, a reduction over m elements is L(m) = ⌈log₂ m⌉, a dot
          product of length m is 1 + L(m), topk/sort over m is a bitonic network's
          Sd(m) = L(m)(L(m)+1)/2, an FFT of length S is 3·log₂S (complex mul then add per
          butterfly stage); casts, views, gathers and index arithmetic are 0. Independent
          chunks and heads run in parallel, so the deepest chunk counts.

Per variant. G = batch·heads, nq = q_len, n = kv_len, D = head_dim, L(m) = ⌈log₂ m⌉;
s = 3·[softcap] + [mask or causal] (score-side ops: softcap is div, tanh, mul; the bias add;
in the algorithm counts [mask] only, since causal pairs are skipped, not masked);
Vis = visible (query, key) pairs (nq·n, or the bottom-right triangle when causal); a chunk of c
rows scores n_c keys; k' = min(k, n_c).

  variant         flops (what the reference does)                  work           depth
  exact           G·nq·n·(4D + 7 + s)                              O(nq·n·D)      L(D) + 4L(n) + 9 + s
  preconditioned  exact + G·nq·n (a 2nd dead-row max),             O(nq·n·D)      exact + L(n) + 3, then
                  + output-norm G·nq·(4D + 2)                                     + L(D) + 8
                  | row-equilibrate G·nq·(3n + D + 2)                             | + L(n) + 8
  sparse topk     Σ G·c·[n_c·(2D + 3[sc] + [add]) + k'·(2D + 5)]    O(nq·n·D)      2 + L(D) + s₁ + Sd(n_c)
                  + G·nq·D                                                        + 3L(k') + 8
  sparse window   Σ G·c·n_c·(4D + 5 + 3[sc] + [add]) + G·nq·D       O(nq·(c+w)·D)  2 + L(D) + s₁ + 3L(n_c)
                                                                                  + 9
  sparse block    Σ G·c·n_c·(4D + 10 + 3[sc] + [add]) + G·nq·D      O(nq·n·D)      2 + L(D) + s₁ + 4L(n_c)
                                                                                  + L(b²) + Sd(⌈n_c/b⌉) + 13
                                                                                  [+ L(⌈n_c/b⌉) + 3 if mass < 1]
  select=pooled   2G·nqb·D·nkb (pooled logits) + Σ_I 4G·b·D·κ_I·b      O(n²D/b² +     means, pooled logits,
  (block, topk)   (query block I's b padded rows against its κ_I kept    Σκ_I·b²·D)    Sd(nkb) + Sd(κ), then
                  blocks: ⌈density·n_I⌉ in float32, topk ≥ ⌈k/b⌉ + 1),                 the chunk's scores,
                  + means and elementwise; nqb, nkb = blocks of q, k                   softmax and P·V
  conv_basis      per head and triangle (1 if causal, else 2):     n ≤ 512:       1 + search + L(D) + 3[sc]
                  2nDk' (start columns, matmul) + search ≈ 2TnD    O(n²·D),       + L(k'n) + [1 if 2 triangles]
                  + (5 + 3[sc])k'n + 3mn, then dense 2n²m           else           + 6 + apply + #triangles + 2;
                  (matmul, n ≤ 512) or overlap-save FFT               O(k·D·n·log n) apply: dense 2 + L(n), FFT
                  2.5·S·log₂S·(σm + k'b + bm) + the spectra's                          6·log₂S + 2 + L(σ)
                  product 2(P+1)·b·σ·m (complex, counted as the flop
                  counter does); + 3nD per head; m = D + 1, block P =
                  2^⌈log₂⌈n/16⌉⌉ ≥ 16, b = ⌈n/P⌉ blocks, σ = b + k'
                  segments, S = 2P

  Σ runs over the reference's query chunks; [add] = additive mask; s₁ = 3[softcap] + [mask]
  (+ [causal] for topk and block, whose causal fill is separate); the window adds its own
  band fill. search (when starts are searched and k' < n): 1 + L(D) + 3[sc] + L(T·n) + L(T)
  + Sd(n) + Sd(k') + 13 over T ≈ 48 sampled diagonals. sparse's softmax is max, fill, sub,
  exp, sum, where, div (2L(m) + 7); safe_softmax (exact, preconditioned) first checks for dead
  rows with one more max (3L(n) + 6 in all), so the reference's critical path holds four
  reductions over keys where the algorithm needs three (max, sum, P·V):
  depth_algorithm(exact) = L(D) + 3L(n) + 6 + 3[softcap] + [mask].

  Intermediates (bytes, each written and read once): exact S, P (G·nq·n each) and the bias;
  preconditioned adds C·A (G·nq·n) or the output before C; topk per chunk S (c·n_c), top
  values, P, indices (c·k'), V gathered (c·k'·D); window per chunk K, V gathered (n_c·D),
  S, P (c·n_c); block per chunk S, P, kept, renormalised (c·n_c) and a 1-byte keep mask;
  sparse also its chunk outputs (nq·D); conv_basis q, k, v, [V|1], H̃[V|1], output in
  the working precision (float64 dense, float32 on the FFT path unless the site is float64
  or precision=float64), the search diagonals (T·n), start columns (3·k'·n), then the dense
  H̃ (3·n²) or the overlap-save tensors (X segments σ·m·P, their spectra σ·m·(P+1), kernel
  windows k'·b·S and spectra, the (P+1)·b·σ combination, output spectra and inverse), by
  chunks of heads; plus the working copies where they apply.

What the references do beyond their algorithm (hence flops_algorithm / depth_algorithm)
  exact, preconditioned: causal work is not skipped (masked by a bias); an extra dead-row
          max; the scale multiplies scores, not q. Algorithm: Vis pairs only, one max,
          q·scale (every variant's algorithm count scales q and skips causal pairs).
  sparse topk: exact top-k needs every visible score, so scoring all keys is intrinsic;
          causal chunks also score the in-chunk upper triangle. Algorithm: Vis scored pairs,
          softmax and PV over min(k, visible) keys.
  sparse window: each row scores its chunk's whole span (c + width − 1 keys, c ≤
          max(width, 64)), not its own band; with q_len ≤ max(width, 64) all rows share one span.
          Algorithm: |Ωᵢ| = |band ∪ sinks| (∩ causal) keys per row.
  sparse block: the ranking uses the dense softmax mass (needs all scores), but P·V is
          dense although only the kept blocks are non-zero. Algorithm: PV over the kept
          blocks, ⌈density·#visible blocks⌉ per query block (an upper bound when mass < 1).
  conv_basis: for n ≤ 512 H̃ is built as an n×n matrix (O(n²·D)), not applied by FFT.
          Algorithm: the FFT path at every n. Not priced (data dependent): rows whose
          normaliser is unreliable are recomputed exactly (O(n·D) each); eps only
          repeats column 0, which costs the same. T, the number of sampled diagonals, is
          computed in double precision; the reference's float32 grid can differ by one.
          q_len ≠ kv_len runs exact attention instead (priced as exact).
"""
from __future__ import annotations

import ast
import math
import operator

import numpy as np

from ..site import AttentionSite

# The references' own constants (tests/passes/test_cost.py checks they still agree).
SPARSE_CHUNK_ELEMENTS = 1 << 20
CONV_DENSE_MAX_N = 512
CONV_FFT_CHUNK = 1 << 26
CONV_SAMPLED_DIAGONALS = 40
CONV_FFT_BLOCKS = 16          # overlap-save block: power of two ≥ n / CONV_FFT_BLOCKS, ≥ CONV_FFT_MIN_BLOCK
CONV_FFT_MIN_BLOCK = 16
CONV_DIAG_BAND = 64           # the search's sampled diagonals below this offset: one banded matmul

_DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
SUMMED = ("flops", "flops_matmul", "flops_fft", "flops_other", "flops_algorithm", "bytes",
           "depth", "depth_algorithm")


def L(m: int) -> int:
    """⌈log₂ m⌉ for m ≥ 1: the depth of a reduction over m elements."""
    return (max(int(m), 1) - 1).bit_length()


def Sd(m: int) -> int:
    """Depth of a bitonic sorting network on m elements: our model of topk and sort."""
    return L(m) * (L(m) + 1) // 2


# ----------------------------------------------------------------------------- sizes

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def _eval(node, sizes: dict) -> int:
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.Name):
        return int(sizes[node.id])
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.left, sizes), _eval(node.right, sizes))
    raise ValueError(ast.dump(node))


def resolve(value, sizes: dict | None) -> int | None:
    """An int size, a symbolic one evaluated at `sizes`, or None when it cannot be."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return _eval(ast.parse(value.strip(), mode="eval").body, sizes or {})
        except (KeyError, ValueError, SyntaxError, TypeError):
            return None
    return None


class Dims:
    def __init__(self, site: AttentionSite, sizes):
        names = ("batch", "heads", "kv_heads", "q_len", "kv_len", "head_dim")
        vals = {n: resolve(getattr(site, n), sizes) for n in names}
        if site.kv_heads is None:
            vals["kv_heads"] = vals["heads"]
        self.ok = all(v is not None and v > 0 for v in vals.values())
        self.B, self.H, self.Hkv = vals["batch"], vals["heads"], vals["kv_heads"]
        self.Lq, self.Lk, self.D = vals["q_len"], vals["kv_len"], vals["head_dim"]
        self.G = (self.B or 0) * (self.H or 0)
        self.e = _DTYPE_BYTES.get(str(site.dtype).replace("torch.", ""), 4)
        self.ec = 4 if self.e == 2 else self.e            # half sites compute in fp32
        self.sc = 1 if site.softcap else 0
        self.mask = site.mask or "none"
        self.causal = bool(site.causal)

    def visible(self, i: int) -> int:
        """Keys query row i may see (bottom-right causal alignment)."""
        return min(self.Lk, max(0, i + self.Lk - self.Lq + 1)) if self.causal else self.Lk


class _Tally:
    """Flops by kind and the intermediates (total and largest-at-once bytes, by name)."""

    def __init__(self):
        self.matmul = self.fft = self.other = 0.0
        self.total: dict = {}
        self.peak: dict = {}

    def mm(self, batch, m, k, n):
        self.matmul += 2 * batch * m * k * n

    def hold(self, name, elements, nbytes, peak=None):
        self.total[name] = self.total.get(name, 0) + elements * nbytes
        self.peak[name] = max(self.peak.get(name, 0), (elements if peak is None else peak) * nbytes)


def _working_copies(d: Dims, t: _Tally) -> None:
    if d.ec != d.e:
        t.hold("q copy", d.G * d.Lq * d.D, d.ec)
    if d.ec != d.e or d.H != d.Hkv:
        t.hold("k, v copies", 2 * d.G * d.Lk * d.D, d.ec, d.G * d.Lk * d.D)


def _io_bytes(d: Dims) -> int:
    qkvo = d.e * (2 * d.G * d.Lq * d.D + 2 * d.B * d.Hkv * d.Lk * d.D)
    mask = {"boolean": 1, "additive": d.e}.get(d.mask, 0) * d.B * d.Lq * d.Lk
    return qkvo + mask


def _finish(d, t, depth, flops_alg, depth_alg, runs) -> dict:
    flops = t.matmul + t.fft + t.other
    return {"runs": runs, "flops": int(flops), "flops_matmul": int(t.matmul), "flops_fft": int(t.fft),
            "flops_other": int(t.other), "flops_algorithm": int(flops_alg),
            "bytes": int(_io_bytes(d) + 2 * sum(t.total.values())),
            "peak_extra_bytes": int(max(t.peak.values(), default=0)),
            "depth": int(depth), "depth_algorithm": int(depth_alg)}


# ----------------------------------------------------------------------------- variants

def _pairs(d: Dims) -> int:
    return sum(d.visible(i) for i in range(d.Lq)) if d.causal else d.Lq * d.Lk


def _exact(d: Dims, o: dict, dead_checks: int = 1):
    """exact (and preconditioned's core): matmuls over every (query, key) pair."""
    G, nq, n, D = d.G, d.Lq, d.Lk, d.D
    t = _Tally()
    bias = int(d.mask != "none" or d.causal)
    t.mm(G, nq, D, n)                                   # S = Q Kᵀ
    t.mm(G, nq, n, D)                                   # P V
    t.other += G * nq * n * (1 + 3 * d.sc + bias + dead_checks + 5)   # scale, softcap, bias, softmax
    _working_copies(d, t)
    t.hold("S, P", 2 * G * nq * n, d.ec, G * nq * n)
    if bias:
        t.hold("bias", (d.B if d.mask != "none" else 1) * nq * n, d.ec)
    score = 1 + L(D) + 1 + 3 * d.sc + bias              # dot, scale, softcap, bias
    depth = score + dead_checks * (L(n) + 2) + (2 * L(n) + 4) + (1 + L(n))
    masked = int(d.mask != "none")                      # the algorithm skips causal pairs, adds a mask
    flops_alg = G * (nq * D + _pairs(d) * (4 * D + 5 + 3 * d.sc + masked))   # scale on q, one max
    depth_alg = score - bias + masked + (2 * L(n) + 3) + (1 + L(n))
    return t, depth, flops_alg, depth_alg


def exact_model(d, o):
    return _finish(d, *_exact(d, o), "exact")


def preconditioned_model(d, o):
    t, depth, flops_alg, depth_alg = _exact(d, o, dead_checks=2)   # _weights checks dead rows twice
    G, nq, n, D = d.G, d.Lq, d.Lk, d.D
    depth += 1                                          # _weights' own fill after safe_softmax
    if o["mode"] == "row-equilibrate":                  # A·(1/‖A‖₂): square, sum, sqrt, 1/x, mul
        extra, deep = G * nq * (3 * n + 2), L(n) + 7
        t.hold("C·A", G * nq * n, d.ec)
        t.hold("output before gain", G * nq * D, d.ec)
    else:                                               # O·(1/‖O‖₂)
        extra, deep = G * nq * (3 * D + 2), L(D) + 7
        t.hold("outputs before C, gain", 2 * G * nq * D, d.ec, G * nq * D)
    extra += G * nq * D                                 # the gain
    t.other += extra
    return _finish(d, t, depth + deep + 1, flops_alg + extra, depth_alg + deep + 1, f"preconditioned/{o['mode']}")


def _row_chunks(lq, per_row, align=1, most=None):
    """The sparse reference's query chunks [(i0, i1)] (the same arithmetic)."""
    rows = max(1, SPARSE_CHUNK_ELEMENTS // max(per_row, 1))
    rows = max(align, min(rows, most or rows) // align * align)
    return [(i, min(i + rows, lq)) for i in range(0, lq, rows)]


def _band(d: Dims, o: dict):
    if o["band"] == "backward" or (o["band"] == "auto" and d.causal):
        return min(o["window"], d.Lk) - 1, 0
    half = min(o["window"] // 2, max(d.Lq, d.Lk))
    return half, half


def _window_span(d, o, before, after, i0, i1) -> int:
    """Keys a window chunk scores: the sinks ∪ its rows' band span (1 if none)."""
    j0 = min(max(i0 + d.Lk - d.Lq - before, 0), d.Lk)
    j1 = min(max(i1 - 1 + d.Lk - d.Lq + after + 1, 0), d.Lk)
    sinks, span = min(o["sinks"], d.Lk), max(0, j1 - j0)
    overlap = max(0, min(sinks, j1) - j0) if span else 0
    return (sinks + span - overlap) or 1


def _window_row(d, o, before, after, i) -> int:
    """|Ωᵢ|: the band ∪ sinks keys row i keeps (∩ causal)."""
    ip = i + d.Lk - d.Lq
    last = min(d.Lk - 1, ip) if d.causal else d.Lk - 1
    lo, hi = max(0, ip - before), min(last, ip + after)
    band = max(0, hi - lo + 1)
    sinks = max(0, min(o["sinks"], last + 1))
    overlap = max(0, min(sinks - 1, hi) - lo + 1) if band else 0
    return band + sinks - overlap


def sparse_model(d, o):
    G, nq, nk, D, mode = d.G, d.Lq, d.Lk, d.D, o["mode"]
    t = _Tally()
    t.other += G * nq * D                               # q · scale
    _working_copies(d, t)
    t.hold("chunk outputs", G * nq * D, d.ec, G * nq * D)
    add, masked = int(d.mask == "additive"), int(d.mask != "none")
    score = 2 + L(D) + 3 * d.sc                          # q·scale, dot, softcap
    bias = masked                                       # the algorithm skips causal pairs, adds a mask
    score_alg = 1 + L(D) + 1 + 3 * d.sc + bias
    if mode == "window":
        before, after = _band(d, o)
        width = before + after + 1
        widest = 1
        for i0, i1 in _row_chunks(nq, G * (2 * width + min(o["sinks"], nk)), most=max(width, 64)):
            c, n = i1 - i0, _window_span(d, o, before, after, i0, i1)
            t.mm(G, c, D, n)
            t.mm(G, c, n, D)
            t.other += G * c * n * (3 * d.sc + add + 5)
            t.hold("K, V gathered", 2 * G * n * D, d.ec, G * n * D)
            t.hold("S, P", 2 * G * c * n, d.ec, G * c * n)
            widest = max(widest, n)
        depth = score + 1 + masked + (2 * L(widest) + 7) + 1 + L(widest)
        omega = [_window_row(d, o, before, after, i) for i in range(nq)]
        flops_alg = G * (nq * D + sum(omega) * (4 * D + 5 + 3 * d.sc + bias))
        depth_alg = score_alg + 3 * L(max(omega, default=1)) + 4
        return _finish(d, t, depth, flops_alg, depth_alg, "sparse/window")
    causal = int(d.causal)
    if mode == "heads":
        return _heads_model(d, o, t, score)
    if o["select"] == "pooled":
        return _pooled_model(d, o, t, score)
    if mode == "topk":
        chunks = _row_chunks(nq, G * (nk + min(o["k"], nk) * D))
    else:
        chunks = _row_chunks(nq, G * nk, o["block"])
    widest = 1
    for i0, i1 in chunks:
        c = i1 - i0
        n = min(nk, max(i1 + nk - nq, 1)) if d.causal else nk
        widest = max(widest, n)
        t.mm(G, c, D, n)
        t.hold("S", G * c * n, d.ec)
        if mode == "topk":
            kc = min(o["k"], n)
            t.mm(G * c, 1, kc, D)
            t.other += G * c * n * (3 * d.sc + add) + G * c * kc * 5
            t.hold("top, P", 2 * G * c * kc, d.ec, G * c * kc)
            t.hold("top indices", G * c * kc, 8)
            t.hold("V gathered", G * c * kc * D, d.ec)
        else:                       # softmax 5, block mass 1, live blocks 1, p·keep 1, renormalise 2
            t.mm(G, c, n, D)
            t.other += G * c * n * (3 * d.sc + add + 10)
            t.hold("P, kept, renormalised", 3 * G * c * n, d.ec, G * c * n)
            t.hold("keep mask", G * c * n, 1)
    vis = [d.visible(i) for i in range(nq)]
    if mode == "topk":
        kc = min(o["k"], widest)
        depth = score + masked + causal + Sd(widest) + (2 * L(kc) + 7) + 1 + L(kc)
        kept = sum(min(o["k"], v) for v in vis)
        flops_alg = G * (nq * D + sum(vis) * (2 * D + 3 * d.sc + bias) + kept * (2 * D + 5))
        depth_alg = score_alg + Sd(max(vis)) + 3 * L(min(o["k"], max(vis))) + 4
        return _finish(d, t, depth, flops_alg, depth_alg, "sparse/topk")
    b = o["block"]
    nkb = -(-widest // b)
    mass_stop = L(nkb) + 3 if o["mass"] < 1.0 else 0
    depth = (score + masked + causal + (2 * L(widest) + 7) + L(b * b) + Sd(nkb) + 1 + mass_stop + 1
             + (L(widest) + 3) + 1 + L(widest))
    kept, widest_kept = 0, 1
    for r0 in range(0, nq, b):                          # kept keys per query block: ⌈density·#visible blocks⌉
        rows = vis[r0:r0 + b]
        blocks = -(-max(rows) // b)
        keys = min(max(rows), b * max(1, math.ceil(o["density"] * blocks)))
        kept += sum(min(v, keys) for v in rows)
        widest_kept = max(widest_kept, keys)
    flops_alg = G * (nq * D + sum(vis) * (2 * D + 6 + 3 * d.sc + bias) + kept * (2 * D + 2))
    depth_alg = (score_alg + 2 * L(max(vis)) + 3 + L(b * b) + Sd(-(-max(vis) // b)) + 2
                 + L(widest_kept) + 1 + 1 + L(widest_kept))
    return _finish(d, t, depth, flops_alg, depth_alg, "sparse/block")


def _pooled_keep(d: Dims, o: dict) -> list[int]:
    """Key blocks each query block keeps under select=pooled, as the reference's budget: ⌈density·n_I⌉
    (in float32, as it computes), n_I = the key blocks query block I sees; topk keeps at least
    ⌈k/b⌉ + 1; never more than n_I, never fewer than 1."""
    b, nqb = o["block"], -(-d.Lq // o["block"])
    out = []
    for i in range(nqb):
        n = -(-d.visible(min((i + 1) * b, d.Lq) - 1) // b)
        keep = math.ceil(float(np.float32(o["density"]) * np.float32(n)))
        if o["mode"] == "topk":
            keep = max(keep, -(-o["k"] // b) + 1)
        out.append(min(max(keep, 1), max(n, 1)))
    return out


def _heads_model(d: Dims, o: dict, t: _Tally, score: int) -> dict:
    """sparse mode=heads: gathered blocks like select=pooled, at the heads' mean density, plus the
    vertical-slash heads' estimate (the last queries' scores against every key)."""
    hd, patterns = o.get("head_density") or (), o.get("head_pattern") or (1,)
    vslash = sum(1 for x in patterns if int(x) == 1) / len(patterns)
    t.mm(d.G * vslash, min(o["last"], d.Lq), d.D, d.Lk)
    return _pooled_model(d, {**o, "density": sum(hd) / len(hd) if hd else o["density"]}, t, score)


def _pooled_model(d: Dims, o: dict, t: _Tally, score: int) -> dict:
    """sparse block/topk with select=pooled: block means of q and k, the pooled logits
    (nq/b × nk/b per head) ranked, then every query block scores only its kept key blocks
    (whole blocks of b padded rows × kept·b keys) and applies P·V over them; topk takes its k
    best among those keys first. No key outside the kept blocks is ever scored."""
    G, nq, nk, D, b = d.G, d.Lq, d.Lk, d.D, o["block"]
    nqb, nkb = -(-nq // b), -(-nk // b)
    keep = _pooled_keep(d, o)
    t.hold("padded q, k, v", G * (nqb + 2 * nkb) * b * D, d.ec, G * max(nqb, nkb) * b * D)
    t.other += G * (nqb + nkb) * (b + 1) * D                       # block sums and means
    t.mm(G, nqb, D, nkb)                                           # pooled logits
    t.other += G * nqb * (D + nkb * (3 * d.sc + 1))                # q̄·scale, softcap, + offset
    t.hold("pooled logits", G * nqb * nkb, d.ec, G * min(nqb, max(1, SPARSE_CHUNK_ELEMENTS // max(G * nkb, 1))) * nkb)
    t.hold("chosen blocks", 2 * G * nqb * max(keep), 8, G * nqb * max(keep))
    kept_alg = 0
    for i, kb in enumerate(keep):
        keys = kb * b
        t.mm(G, b, D, keys)                                        # scores of the block's rows
        t.mm(G, b, keys, D)                                        # P·V over the candidates
        t.hold("K, V gathered", 2 * G * keys * D, d.ec, G * keys * D)
        t.hold("S, P", 2 * G * b * keys, d.ec, G * b * keys)
        if o["mode"] == "topk":
            kc = min(o["k"], keys)
            t.other += G * b * (keys * (3 * d.sc + int(d.mask == "additive")) + kc * 5)
        else:
            t.other += G * b * keys * (3 * d.sc + int(d.mask == "additive") + 5)
        rows = range(i * b, min((i + 1) * b, nq))
        kept_alg += sum(min(d.visible(r), keys) for r in rows)
    widest = max(keep) * b
    rank = L(b) + 1 + score + 1 + Sd(nkb) + Sd(max(keep))         # means, pooled logits, top, sort
    if o["mode"] == "topk":
        kc = min(o["k"], widest)
        tail = Sd(widest) + (2 * L(kc) + 7) + 1 + L(kc)
    else:
        tail = (2 * L(widest) + 7) + 1 + L(widest)
    depth = rank + score + int(d.mask != "none") + int(d.causal) + tail
    pooled = G * ((nqb + nkb) * (b + 1) * D + nqb * (D + nkb * (2 * D + 1 + 3 * d.sc)))
    flops_alg = pooled + G * (nq * D + kept_alg * (4 * D + 5 + 3 * d.sc + int(d.mask != "none")))
    return _finish(d, t, depth, min(flops_alg, t.matmul + t.fft + t.other), depth, f"sparse/{o['mode']} pooled")


def _sampled_diagonals(n: int, strict: bool) -> int:
    """How many diagonals the start search reads (0..7 and a log-spaced grid, as the reference)."""
    top = math.log10(max(n - 1, 1))
    steps = CONV_SAMPLED_DIAGONALS
    grid = {int(10 ** (top * i / (steps - 1))) for i in range(steps)}
    return len({x for x in {*range(min(8, n)), *grid} if x < n and not (strict and x == 0)})


def conv_basis_model(d, o):
    if d.Lq != d.Lk:                                    # the op runs exact attention
        return _finish(d, *_exact(d, o), "conv_basis->exact")
    G, n, D = d.G, d.Lk, d.D
    m = D + 1                                           # [V·w | w]: numerator and normaliser
    triangles = [False] if d.causal else [False, True]
    fixed = o.get("starts")
    fixed = None if isinstance(fixed, str) else fixed                # norm | search: found per input
    kp = len({0, *(min(int(s), n - 1) for s in fixed)}) if fixed is not None else min(int(o["k"]), n)
    search = fixed is None and kp < n and o.get("starts") != "search"   # search: O(k·log n) probes, not priced
    dense = n <= CONV_DENSE_MAX_N
    p = max(CONV_FFT_MIN_BLOCK, 1 << (max(1, -(-n // CONV_FFT_BLOCKS)) - 1).bit_length())
    nb = -(-n // p)
    segs, bins, size = nb + kp, p + 1, 2 * p            # overlap-save: segments, bins, transform size
    log_s = L(size)
    wide = dense or d.e == 8 or o.get("precision") == "float64"
    fb = 8 if wide else 4                               # working precision (float32 on the FFT path: auto)
    t = _Tally()
    t.other += 3 * G * n * D                            # q·scale, V·w, the final division
    t.hold("q, k, v in the working precision", 3 * G * n * D, fb, G * n * D)
    t.hold("[V|1], H̃[V|1]", 2 * G * n * m, fb, G * n * m)
    t.hold("output in the working precision", G * n * D, fb)
    per = min(G, max(1, CONV_FFT_CHUNK // (segs * m * size)))   # heads per chunk
    fft_flops = 2.5 * size * log_s * (segs * m + kp * nb + nb * m)
    combine = 2 * bins * nb * segs * m                  # as the flop counter counts the complex product
    other, tdiag = 0, 1
    for strict in triangles:
        if search:
            tp = _sampled_diagonals(n, strict)
            tdiag = max(tdiag, tp)
            other += 2 * tp * n * D + (3 * d.sc + 7) * tp * n + n
            t.mm(G * -(-n // CONV_DIAG_BAND), CONV_DIAG_BAND, D, 2 * CONV_DIAG_BAND)   # the near diagonals' band
            t.hold("search diagonals", 3 * G * tp * n, 8, G * tp * n)
        t.mm(G, n, D, kp)                               # the k' start columns of q·kᵀ
        other += 3 * d.sc * n * kp + kp * n + 2 * kp * n + 2 * kp * n + 2 * n * m + n * m
        t.hold("start columns", 3 * G * kp * n, 8, G * kp * n)   # (scores, columns, kernels)
        if dense:
            t.mm(G, n, n, m)
            t.hold("dense H̃", 3 * G * n * n, 8, G * n * n)     # (picked columns, index, H̃)
        else:
            t.fft += G * fft_flops
            t.mm(G * bins, nb, segs, m)                 # the spectra combined: complex, counted as one product
            for name, elements, nbytes in (
                    ("X segments", segs * m * p, fb), ("segment spectra", segs * m * bins, 2 * fb),
                    ("kernel windows", kp * nb * size, fb), ("window spectra", kp * nb * bins, 2 * fb),
                    ("combination matrix", bins * nb * segs, 2 * fb), ("output spectra", nb * m * bins, 2 * fb),
                    ("inverse FFT", nb * m * size, fb)):
                t.hold(name, G * elements, nbytes, per * elements)
    t.other += G * other
    searched = 0
    if search:                                          # vecdot, softcap, fill, max, exp, differences, Σ, topk, sort
        searched = (1 + L(D) + 3 * d.sc + 1 + L(tdiag * n) + 6 + L(tdiag) + 1 + Sd(n) + 4 + Sd(kp))
    columns = 1 + L(D) + 3 * d.sc + 1 + L(kp * n) + (len(triangles) - 1) + 2 + 2   # dot, fill, c, exp(col − c)
    by_fft = 6 * log_s + 2 + L(segs)
    by_dense = 1 + 1 + L(n)
    tail = len(triangles) + 2                           # y += part, clamp, divide
    depth = 1 + searched + columns + (by_dense if dense else by_fft) + tail
    flops_alg = t.matmul + t.other + (G * len(triangles) * (fft_flops + combine - 2 * n * n * m) if dense else t.fft)
    depth_alg = 1 + searched + columns + by_fft + tail
    return _finish(d, t, depth, flops_alg, depth_alg, "conv_basis/" + ("dense" if dense else "fft"))
