"""Find every scaled-dot-product attention in an ONNX graph, as `AttentionSite` records.

Rules, each a plain function that returns an `OnnxSite` or raises `NoMatch` with the
reason (`--list --verbose` prints it for every candidate left unmatched):

* `match_decomposed` — anchored on a Softmax over the last axis (source "onnx-decomposed";
  the dynamo exporter, the TorchScript exporter and hand-written graphs)::

      s = MatMul(q' [* c | / c], kᵀ' [* c | / c])      # dynamo: c = sqrt(scale) on both
      s = Einsum("bhqd,bhkd->bhqk", q, k)              # any letters/orders, rank 4
      s = s * c | s / c | Cast(s)                       # scalar scales anywhere, c folded from
                                                        # Sqrt(Cast(Shape(v)[-1])) + ConstantOfShape([])
      s = cap * Tanh(s / cap)                           # soft-cap
      s = s + bias | Where(keep, s, -inf) | Where(drop, -inf, s)    # masks, any mix
      s = Reshape(s, (B, H, Lq, Lk))                    # once, of (B·H, Lq, Lk) scores
      p = Softmax(s, axis=-1) [Cast, Dropout, Where(IsNaN(p), 0, p)]
      p = Reshape(p, (B·H, Lq, Lk))                     # merged back for a bmm with v
      o = MatMul(p, v') | Einsum("bhqk,bhkd->bhqd", p, v)

  In `s + bias` the scores are the side that reaches a q·kᵀ product — a MatMul/Einsum
  whose operands are both computed (`onnx_walk.OnnxKind.qk_like`): baddbmm's
  Add(Mul(MatMul(q, kᵀ), alpha), Mul(alibi, beta)) and a bias made by x·W are told
  apart whatever their order. A fill is -inf or finite (finfo.min); a finite one does
  not commute with the other masks, so the chain's masks are then kept in order
  (`OnnxSite.mask_steps`) and replayed by the rewrite. Scores computed per (B·H) and
  split by a Reshape mark q/k (and v, the output, the masks added before the split)
  `flat`; the rewrite splits them by the head count, unless they were merged straight
  from (B, H, L, D) values (`unmerge_heads`), which are then used as they are.

  kᵀ' is turned back into k by composing its Transpose perm with a swap of the last two
  axes (so k is exactly the operand the product saw, whatever the perm was); dynamo's
  Reshape→Transpose([0,2,1])→Reshape is undone only when shape inference proves it keeps
  the leading axes. A repeat_kv (Unsqueeze(2)→Expand→Reshape) on k/v is peeled, once
  shapes prove it, so the site sees K/V before GQA expansion.
* `match_attention` — the opset-23/24 `Attention` op (source "onnx-attention").
* `match_contrib` — `com.microsoft` `Attention`, `MultiHeadAttention`,
  `GroupQueryAttention` (source "onnx-contrib"). Forms the rewrite cannot reproduce
  exactly (KV cache, rotary inside the op, packed QKV, index masks) are reported with
  `keep` set to the reason and are left as they are.

Shapes, element types and small constants are read through `onnx_graph.Graph` (shape
inference on a weightless copy, else the graph's own structure).

The step kinds, the order they must come in, the einsum equations and the two walks are
the detectors' shared vocabulary (`vocab`); `onnx_walk.OnnxKind` holds this graph kind's
spellings, and the walks along the chain and the operands' peeling are `onnx_walk`'s too.
This module matches the rules, describes each site and drives the search (`find_sites`).
"""
from __future__ import annotations

import onnx

from ..site import AttentionSite, NormalForm
from .onnx_graph import Graph, attr, infer
from .onnx_walk import (FLOAT_NAMES, OnnxSite, depends_on, einsum_equation, einsum_scores, follow_probs,
                        is_weight, peel_repeat_kv, peel_scale, same_dim, unmerge_heads, untranspose_key,
                        walk_scores)
from .vocab import NEAR_QUERY, NEAR_SCALE, NoMatch, default_scale, einsum_pv, mask_kind, miss, probs_read_elsewhere

MS = "com.microsoft"


# ---------------------------------------------------------------- decomposed rule
def match_decomposed(g: Graph, sm) -> OnnxSite:
    """The decomposed chain around Softmax `sm`: its scores walked back to q·kᵀ, its
    probabilities followed to P·V, the operands read from both products."""
    x = sm.input[0]
    r = g.rank(x)
    axis = attr(sm, "axis", -1 if g.opset >= 13 else 1)
    if not (axis == -1 or (r is not None and axis == r - 1)):
        raise NoMatch(f"softmax over axis {axis}, not the last (key) axis")
    site = OnnxSite("decomposed", sm.name, "", "", scores=x)
    prod, factor = walk_scores(g, x, site)
    try:
        pv, px, others = follow_probs(g, sm.output[0])
        pv_missing = ""
    except NoMatch as e:         # said after the operands are read: a learned query says more
        pv, px, others, pv_missing = None, None, None, str(e)
    rank, fq, fk = _score_operands(g, prod, site)
    _check_scores(g, prod, site, pv is not None, pv_missing)
    rank = _heads_layout(g, prod, pv, px, site, rank)
    site.rank = rank
    site.scale = factor * fq * fk
    _value_operand(g, pv, px, site, rank)
    _unmerge_and_unrepeat(g, site)
    site.out, site.out_node = pv.output[0], pv.name
    used = [o for o in others if any(g.used(x) for x in o.output)]
    if used:                    # e.g. returned weights: the dense probabilities stay, so the site does
        site.keep = probs_read_elsewhere(o.op_type for o in used)
    return site


def _score_operands(g: Graph, prod, site: OnnxSite) -> tuple[int, float, float]:
    """q and k of the q·kᵀ product into `site` (k untransposed, scalar scales peeled):
    (rank, q's factor, k's factor)."""
    if prod.op_type == "Einsum":
        q, kt, rank = einsum_scores(g, prod, site)
        q, fq = peel_scale(g, q)
        k, fk = peel_scale(g, kt)
        site.q, site.k = q, k
        return rank, fq, fk
    q, fq = peel_scale(g, prod.input[0])
    kt, fk = peel_scale(g, prod.input[1])
    if is_weight(g, kt):
        raise NoMatch(f"{prod.name}: the key is a constant weight (a classifier or pooling softmax)",
                      near=NEAR_QUERY)
    rank = g.rank(q) or g.rank(prod.output[0])
    if rank not in (3, 4) or (g.rank(kt) not in (None, rank)):
        raise NoMatch(f"{prod.name}: q·kᵀ of rank {rank}, expected 3 or 4")
    k, kperm = untranspose_key(g, kt, rank)
    k, fk2 = peel_scale(g, k)                      # a scalar on k before its transpose
    fk *= fk2
    site.q, site.k, site.k_perm = q, k, kperm
    return rank, fq, fk


def _check_scores(g: Graph, prod, site: OnnxSite, has_pv: bool, pv_missing: str) -> None:
    """NoMatch for a classifier or pooling softmax (a constant key, or a constant query with
    no P·V), a per-head scale computed from the scores, or no P·V product (`pv_missing`)."""
    if is_weight(g, site.k):
        raise NoMatch(f"{prod.name}: the key is a constant weight (a classifier or pooling softmax)", near=NEAR_QUERY)
    if is_weight(g, site.q) and not has_pv:
        raise NoMatch(f"{prod.name}: the query is a constant weight and the probabilities are not contracted "
                      f"with a value tensor ({pv_missing})", near=NEAR_QUERY)
    for t, _ in site.head_scales:
        if depends_on(g, t, prod.output[0]):
            raise NoMatch(f"{t} scales the scores by a value computed from them", near=NEAR_SCALE)
    if not has_pv:
        raise NoMatch(pv_missing)


def _heads_layout(g: Graph, prod, pv, px: str, site: OnnxSite, rank: int) -> int:
    """The roles computed with the heads merged into the first axis (`site.flat`) and the
    head count that splits them; returns the rank of the normal form."""
    if site.flat_heads is not None:                    # (B·H, L, D) product, split scores
        if rank != 3:
            raise NoMatch(f"{prod.name}: a head split of scores of rank {rank}")
        site.flat |= {"q", "k"}
        rank = 4
    pv_rank = g.rank(px)
    if rank == 4 and pv_rank == 3:                     # probabilities merged back for a bmm with v
        if site.flat_heads is None:
            sh = g.shape(site.scores)
            if not sh or len(sh) != 4 or not isinstance(sh[1], int):
                raise NoMatch(f"{pv.name}: probabilities merged into (B·H, Lq, Lk) with an unknown head count")
            site.flat_heads = sh[1]
        site.flat |= {"v", "out"}
    return rank


def _value_operand(g: Graph, pv, px: str, site: OnnxSite, rank: int) -> None:
    """v of the P·V product into `site`: MatMul(p, v), Einsum, or v'·pᵀ (v and the output
    transposed)."""
    transposed = pv.op_type == "MatMul" and pv.input[1] == px        # o' = v' · pᵀ
    if is_weight(g, pv.input[0] if transposed else pv.input[1]):
        raise NoMatch(f"{pv.name}: the values are a constant weight: the probabilities mix weights, "
                      "not the input", near=NEAR_QUERY)
    if transposed:
        if "v" in site.flat or rank != g.rank(pv.input[0]):
            raise NoMatch(f"{pv.name}: a transposed P·V product with the heads merged")
        site.v, site.v_perm = pv.input[0], [*range(rank - 2), rank - 1, rank - 2]
        site.out_perm = [0, 1, 3, 2]           # on the (B, H, Lq, Dv) output (rank 3: unsqueezed first)
    elif pv.op_type == "Einsum":
        vp, op_ = einsum_pv(einsum_equation(pv), 0)
        if len(vp) != 4:
            raise NoMatch(f"{pv.name}: einsum equation is not a rank-4 p·v")
        site.v_perm = None if vp == [0, 1, 2, 3] else vp
        site.out_perm = None if op_ == [0, 1, 2, 3] else op_
        site.v = pv.input[1]
    else:
        site.v = pv.input[1]
        want = 3 if "v" in site.flat else rank
        if g.rank(site.v) not in (None, want):
            raise NoMatch(f"{pv.name}: values of rank {g.rank(site.v)}, scores of rank {want}")


def _unmerge_and_unrepeat(g: Graph, site: OnnxSite) -> None:
    """q, k, v merged to (B·H, L, D) straight from (B, H, L, D) are read as those; k and v
    before a repeat_kv."""
    for role in ("q", "k", "v"):                       # (B·H, L, D) straight from (B, H, L, D): use that
        four = unmerge_heads(g, getattr(site, role), site.flat_heads) if role in site.flat else None
        if four is not None and getattr(site, role + "_perm") is None:
            setattr(site, role, four)
            site.flat.discard(role)
    if site.k_perm is None and "k" not in site.flat:
        site.k = peel_repeat_kv(g, site.k)
    if site.v_perm is None and "v" not in site.flat:
        site.v = peel_repeat_kv(g, site.v)


# ---------------------------------------------------------------- fused ops

def _present(node, i: int) -> str:
    return node.input[i] if len(node.input) > i and node.input[i] else ""


def _outputs_used(g: Graph, node, first: int = 1) -> bool:
    return any(g.used(o) for o in node.output[first:])


def match_attention(g: Graph, n) -> OnnxSite:
    """ONNX `Attention` (opset 23/24): Y = Attention(Q, K, V, attn_mask?, ...)."""
    site = OnnxSite("attention", n.name, n.output[0], n.name, q=n.input[0], k=n.input[1], v=n.input[2])
    site.inputs = list(n.input)
    site.attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
    site.scale = site.attrs.get("scale")
    site.softcap = float(site.attrs.get("softcap", 0.0))
    site.causal = bool(site.attrs.get("is_causal", 0))
    mask = _present(n, 3)
    if mask:
        if g.elem_type(mask) == onnx.TensorProto.BOOL:
            site.keeps.append((mask, True))
        else:
            site.biases.append((mask, 1.0))
    site.rank = g.rank(n.input[0]) or 4
    if site.rank == 3:
        site.heads, site.kv_heads = site.attrs.get("q_num_heads"), site.attrs.get("kv_num_heads")
    if _present(n, 4) or _present(n, 5):
        site.keep = "KV cache inputs (past_key/past_value): kept as is"
    elif _present(n, 6):
        site.keep = "nonpad_kv_seqlen input: kept as is"
    elif _outputs_used(g, n):
        site.keep = "present_key/value or qk_matmul_output are used: kept as is"
    elif site.causal and g.opset < 24:
        sq, sk = g.shape(n.input[0]), g.shape(n.input[1])
        lq = sq[-2] if sq and site.rank == 4 else (sq[1] if sq else None)
        lk = sk[-2] if sk and site.rank == 4 else (sk[1] if sk else None)
        if not same_dim(lq, lk):
            site.keep = "is_causal with q_len possibly ≠ kv_len (opset-23 upper-left alignment): kept as is"
    return site


def match_contrib(g: Graph, n) -> OnnxSite:
    """com.microsoft Attention / MultiHeadAttention / GroupQueryAttention."""
    a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
    kind = {"Attention": "msattention", "MultiHeadAttention": "mha", "GroupQueryAttention": "gqa"}[n.op_type]
    site = OnnxSite(kind, n.name, n.output[0], n.name, inputs=list(n.input), attrs=a)
    site.heads = a.get("num_heads")
    site.kv_heads = a.get("kv_num_heads", site.heads)
    site.scale = a.get("scale") or None
    site.softcap = float(a.get("softcap", 0.0))
    keep = []
    if _outputs_used(g, n):
        keep.append("present/qk outputs are used")
    if kind == "msattention":
        site.causal = bool(a.get("unidirectional", 0))
        if _present(n, 4) or _present(n, 6):
            keep.append("KV cache input (past)")
        if a.get("do_rotary", 0):
            keep.append("rotary inside the op")
        m = _present(n, 3)
        if m and g.rank(m) != 2:
            keep.append("mask_index is not a (batch, kv_len) 0/1 mask")
        if g.rank(n.input[0]) != 3:
            keep.append("input is not (batch, seq, hidden)")
        site.q = n.input[0]
    elif kind == "mha":
        site.causal = bool(a.get("unidirectional", 0))
        if any(_present(n, i) for i in (6, 7, 8, 9)):
            keep.append("KV cache inputs (past_key/past_value)")
        if not _present(n, 1) or not _present(n, 2) or g.rank(n.input[0]) != 3:
            keep.append("packed QKV/KV input")
        elif g.rank(n.input[1]) not in (3, 4) or g.rank(n.input[1]) != g.rank(n.input[2]):
            keep.append("key/value layout not (B, L, hidden) or (B, H, L, D)")
        m = _present(n, 4)
        if m and g.rank(m) != 2:
            keep.append("key_padding_mask is not (batch, kv_len)")
        site.q, site.k, site.v = n.input[0], n.input[1] if len(n.input) > 1 else "", \
            n.input[2] if len(n.input) > 2 else ""
    else:
        site.causal = bool(a.get("causal", 1))
        if _present(n, 3) or _present(n, 4):
            keep.append("KV cache inputs (past_key/past_value)")
        if a.get("do_rotary", 0):
            keep.append("rotary inside the op")
        if not _present(n, 1) or not _present(n, 2):
            keep.append("packed QKV input")
        if a.get("local_window_size", -1) != -1:
            keep.append("local window")
        if a.get("smooth_softmax", 0) or _present(n, 11) or any(_present(n, i) for i in range(9, 17) if i != 10):
            keep.append("smooth softmax / head sink / quantised cache / position or norm inputs")
        site.q, site.k, site.v = n.input[0], _present(n, 1), _present(n, 2)
    if keep:
        site.keep = "; ".join(keep) + ": kept as is"
    return site


# ---------------------------------------------------------------- describe

def site_name(node) -> str:
    """The module path when the exporter recorded one, else the node name."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = eval(p.value, {"__builtins__": {}})  # noqa: S307 - a list literal of str
                if len(scopes) >= 2 and scopes[-2]:
                    return scopes[-2]
            except Exception:  # noqa: BLE001
                pass
    name = node.name
    if name.startswith("/") and name.count("/") > 1:
        return ".".join(p for p in name.split("/")[1:-1] if p)
    return name or node.op_type


def _dims_bhsd(g: Graph, name: str, perm, rank: int):
    s = g.shape(name)
    if not s or len(s) != rank:
        return [None] * 4
    if perm is not None:
        s = [s[i] for i in perm]
    return [None, *s] if rank == 3 else s


def describe(g: Graph, os_: OnnxSite, idx: int, node) -> AttentionSite:
    source = {"decomposed": "onnx-decomposed", "attention": "onnx-attention"}.get(os_.kind, "onnx-contrib")
    b = h = hkv = lq = lk = d = None
    dtype = FLOAT_NAMES.get(g.elem_type(os_.q or node.input[0]), "float32")
    if os_.kind == "decomposed" and {"q", "k"} & os_.flat:     # (B·H, L, D) q or k: dims from the scores
        b, h, lq, lk = (g.shape(os_.scores) or [None] * 4)[:4]
        hkv = h
        sq = g.shape(os_.q)
        d = sq[-1] if sq else None
    elif os_.kind == "decomposed" or (os_.kind == "attention" and os_.rank == 4):
        b, h, lq, d = _dims_bhsd(g, os_.q, os_.q_perm, os_.rank)
        _, hkv, lk, _ = _dims_bhsd(g, os_.k, os_.k_perm, os_.rank)
        if os_.rank == 3:
            b, h, hkv = None, None, None
    else:
        sq = g.shape(os_.q) or [None] * 3
        b, lq = (sq[0], sq[1]) if len(sq) >= 2 else (None, None)
        h, hkv = os_.heads, os_.kv_heads
        hidden = sq[-1] if len(sq) == 3 else None
        if os_.kind == "msattention":
            sizes = os_.attrs.get("qkv_hidden_sizes")
            w = g.shape(os_.inputs[1])
            hidden = sizes[0] if sizes else (w[1] // 3 if w and isinstance(w[1], int) else None)
            lk = lq
        elif os_.k:
            sk = g.shape(os_.k) or []
            lk = sk[1] if len(sk) == 3 else (sk[2] if len(sk) == 4 else None)
        d = hidden // h if isinstance(hidden, int) and isinstance(h, int) and h else None
    scale = os_.scale
    if scale is None and isinstance(d, int):
        scale = default_scale(d)
    mask = mask_kind(bool(os_.biases), bool(os_.keeps))
    if os_.kind in ("mha", "msattention") and _present(node, 4 if os_.kind == "mha" else 3):
        mask = "boolean" if not os_.biases else "additive"
    if os_.kind in ("mha", "msattention", "gqa") and _present(node, {"mha": 5, "msattention": 5, "gqa": 10}[os_.kind]):
        mask = "additive"
    site = AttentionSite(id=idx, name=site_name(node), source=source, batch=b, heads=h, kv_heads=hkv,
                         q_len=lq, kv_len=lk, head_dim=d, dtype=dtype,
                         scale="per-head" if os_.head_scales else (None if scale is None else float(scale)),
                         softcap=os_.softcap or None, causal=os_.causal, mask=mask, dropout=0.0,
                         graph=os_, form=NormalForm(os_.scale if os_.head_scales else scale,
                                                    float(os_.softcap or 0.0), bool(os_.causal)))
    if os_.rank == 3 and os_.kind == "decomposed":
        site.add_reason("3-D product: batch and heads are merged in the first axis")
    if os_.keep:
        site.add_reason(os_.keep)
    return site


def find_sites(model: onnx.ModelProto, inferred: onnx.ModelProto | None = None, *, shapes: bool = True):
    """([AttentionSite], [(node name, reason)]) for every candidate in the main graph."""
    if inferred is None and shapes:
        inferred = infer(model)
    g = Graph(model, inferred)
    sites, unmatched = [], []
    for n in model.graph.node:
        try:
            if n.op_type == "Softmax" and n.domain in ("", "ai.onnx"):
                s = match_decomposed(g, n)
            elif n.op_type == "Attention" and n.domain in ("", "ai.onnx"):
                s = match_attention(g, n)
            elif n.domain == MS and n.op_type in ("Attention", "MultiHeadAttention", "GroupQueryAttention"):
                s = match_contrib(g, n)
            else:
                continue
        except NoMatch as e:
            unmatched.append((n.name, miss(e)))
            continue
        sites.append(describe(g, s, len(sites), n))
    return sites, unmatched, g
