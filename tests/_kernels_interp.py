"""Worker for tests/test_kernels.py: runs every generated-kernel case in the Triton interpreter
and prints one JSON object {case: {"errors": {what: max abs error}, "tolerance": t} or {"error": text}}.

It must run in its own process with TRITON_INTERPRET=1 and ATTNREWRITE_KERNELS=interpret set
before triton is imported (Triton's library functions are interpreted only then), which is
why the test starts it as a subprocess instead of importing it.
"""
import json
import sys
import traceback

import torch

from attnrewrite import kernels
from attnrewrite.variants import conv_basis, exact, preconditioned, sparse
from attnrewrite.variants.base import expand_kv

F32, F16 = torch.float32, torch.float16


def tensors(d, dtype, lq, lk, heads=2, group=1, batch=1, kv_batch=None, dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, lq, d, generator=g).to(dtype)
    k = torch.randn(kv_batch or batch, heads // group, lk, d, generator=g).to(dtype)
    v = torch.randn(kv_batch or batch, heads // group, lk, dv or d, generator=g).to(dtype)
    return q, k, v


def make_mask(kind, q, lk, seed=1):
    g = torch.Generator().manual_seed(seed)
    b, h, lq = q.shape[:3]
    if kind == "none":
        return None
    if kind == "key-bool":                                   # key padding: the last keys removed
        m = torch.ones(b, 1, 1, lk, dtype=torch.bool)
        m[..., -3:] = False
        return m
    if kind == "key-additive":
        m = torch.zeros(b, 1, 1, lk)
        m[..., :2] = -1e4
        return m.to(q.dtype)
    if kind == "boolean":                                    # with one row that sees no key
        m = torch.rand(b, 1, lq, lk, generator=g) > 0.3
        if lq > 2:
            m[..., lq // 2, :] = False
        return m
    if kind == "additive":
        return torch.randn(b, h, lq, lk, generator=g).to(q.dtype)
    if kind == "additive-lowest":                           # HF's finfo.min fill: a whole row, and some keys
        m = torch.zeros(b, 1, lq, lk)
        m[..., 1, :] = torch.finfo(torch.float32).min
        m[..., 4:7] = torch.finfo(torch.float32).min
        return m
    raise ValueError(kind)


def max_err(a, b):
    return float((a.detach().float() - b.detach().float()).abs().max()) if a.numel() else 0.0


def exact_case(d, dtype, causal, mask_kind, lq, lk, group=1, softcap=0.0, kv_batch=None, batch=1, dv=None):
    q, k, v = tensors(d, dtype, lq, lk, heads=2 * group, group=group, batch=batch, kv_batch=kv_batch, dv=dv)
    mask = make_mask(mask_kind, q, lk)
    args = (q, k, v, mask, d ** -0.5, softcap, causal, 0.0)
    out = kernels.forward(exact.VARIANT.kernel, args)
    if out is None:
        raise AssertionError("no kernel ran")
    ref = exact.reference(*args)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    dq, dk, dv_ = kernels.backward(exact.VARIANT.kernel, grad, args)
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    ref_grads = torch.autograd.grad(exact.reference(*leaves, *args[3:]), leaves, grad.float())
    assert dq.shape == q.shape and dk.shape == k.shape and dv_.shape == v.shape
    errs = {"out": max_err(out, ref)}
    errs.update({n: max_err(a, b) for n, a, b in zip(("dq", "dk", "dv"), (dq, dk, dv_), ref_grads)})
    return errs


def window_case(d, dtype, causal, mask_kind, lq, lk, window, sinks, band, group=1):
    q, k, v = tensors(d, dtype, lq, lk, heads=2 * group, group=group)
    args = (q, k, v, make_mask(mask_kind, q, lk), d ** -0.5, 0.0, causal, 0.0,
            "window", 8, window, sinks, band, 64, 0.25, 1.0)
    out = kernels.forward(sparse.VARIANT.kernel, args)
    if out is None:
        raise AssertionError("no kernel ran")
    return {"out": max_err(out, sparse.reference(*args))}


def topk_case(d, dtype, causal, mask_kind, lq, lk, kept, group=1, softcap=0.0):
    q, k, v = tensors(d, dtype, lq, lk, heads=2 * group, group=group)
    args = (q, k, v, make_mask(mask_kind, q, lk), d ** -0.5, softcap, causal, 0.0,
            "topk", kept, 256, 4, "auto", 64, 0.25, 1.0)
    out = kernels.forward(sparse.VARIANT.kernel, args)
    if out is None:
        raise AssertionError("no kernel ran")
    return {"out": max_err(out, sparse.reference(*args))}


def preconditioned_case(d, dtype, causal, mask_kind, lq, lk, mode, group=1):
    q, k, v = tensors(d, dtype, lq, lk, heads=2 * group, group=group)
    gain = [0.5 + h for h in range(q.shape[1])]
    args = (q, k, v, make_mask(mask_kind, q, lk), d ** -0.5, 0.0, causal, 0.0, mode, gain)
    out = kernels.forward(preconditioned.VARIANT.kernel, args)
    if out is None:
        raise AssertionError("no kernel ran")
    return {"out": max_err(out, preconditioned.reference(*args))}


def block_sparse_case(d, dtype, causal, mask_kind, lq, lk, bm, bn, group=1, softcap=0.0, batch=1, kv_batch=None):
    """Random kept blocks (block 0 always), a random subset of the blocks no element mask cuts
    marked full; the reference is exact attention under the elementwise mask the blocks make,
    forward and (its autograd) backward against the kernels' through block_sparse_attention."""
    q, k, v = tensors(d, dtype, lq, lk, heads=2 * group, group=group, batch=batch, kv_batch=kv_batch)
    g = torch.Generator().manual_seed(3)
    qb, kb = -(-lq // bm), -(-lk // bn)
    keep = torch.rand(1, q.shape[1], qb, kb, generator=g) < 0.5
    keep[..., 0] = True
    i, j = torch.arange(qb)[:, None], torch.arange(kb)[None, :]
    uncut = ((j + 1) * bn <= lk) & (((j + 1) * bn - 1 <= i * bm + lk - lq) if causal else True)
    assert torch.equal(uncut, kernels.dispatch.uncut_blocks(qb, kb, bm, bn, lq, lk, causal))
    full = keep & uncut & (torch.rand(keep.shape, generator=g) < 0.7)
    mask = make_mask(mask_kind, q, lk)
    dense = keep.repeat_interleave(bm, -2)[..., :lq, :].repeat_interleave(bn, -1)[..., :lk]
    if mask is not None:
        dense = dense & mask if mask.dtype == torch.bool else mask.masked_fill(~dense, float("-inf"))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = kernels.block_sparse_attention(*leaves, kernels.block_lists(keep, full), bm, bn, mask=mask,
                                         causal=causal, softcap=softcap)
    grad = torch.randn(out.shape, generator=g).to(dtype)
    grads = torch.autograd.grad(out, leaves, grad)
    ref_leaves = [t.float().requires_grad_() for t in (q, k, v)]
    ref = exact.reference(*ref_leaves, dense, d ** -0.5, softcap, causal, 0.0)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad.float())
    assert all(a.shape == b.shape and a.dtype == dtype for a, b in zip(grads, (q, k, v)))
    return {"out": max_err(out, ref), **{n: max_err(a, b) for n, a, b in zip(("dq", "dk", "dv"), grads, ref_grads)},
            "full_blocks": float(full.sum()), "dropped_blocks": float((~keep).sum())}


def sparse_block_case(d, dtype, causal, mask_kind, lq, lk, block, density, group=1, **options):
    """sparse mode=block through the registered op and autograd under ATTNREWRITE_KERNELS=interpret
    (its selection in PyTorch, the block-sparse kernels forward and backward) against the
    variant's PyTorch reference, called directly."""
    q, k, v = tensors(d, dtype, lq, lk, heads=2 * group, group=group)
    o = {"mode": "block", "mass": 1.0, "select": "exact", "head_density": [], "head_pattern": [], "last": 64,
         **options}
    rest = (make_mask(mask_kind, q, lk), d ** -0.5, 0.0, causal, 0.0,
            o["mode"], 8, 4, 0, "auto", block, density, o["mass"], o["select"], o["head_density"],
            o["head_pattern"], o["last"])
    cfg, why = kernels.select(sparse.VARIANT.kernel, q, k, v, *rest[:5], rest[5:], "interpret")
    report = kernels.describe(sparse.VARIANT.kernel, q, k, v, *rest[:5], rest[5:])
    assert cfg is not None and cfg.template == "block_sparse", why
    assert report["kernel"]["backward"] == "kernel" and report["kernel_reason"] == "", report
    calls = kernels.dispatch.CALLS.get(cfg, 0)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = torch.ops.attnrewrite.sparse_attention(*leaves, *rest)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    grads = torch.autograd.grad(out, leaves, grad)
    assert kernels.dispatch.CALLS[cfg] == calls + 2, "the kernels did not run forward and backward"
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = sparse.reference(*ref_leaves, *rest)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad)
    keep = sparse.kept_blocks(q, k, v, *rest)
    return {"out": max_err(out, ref), **{n: max_err(a, b) for n, a, b in zip(("dq", "dk", "dv"), grads, ref_grads)},
            "dropped_blocks": float((~keep).sum())}


def conv_select(q, k, v, rest):
    """(config, plan) of a conv-basis call (rest: the op's arguments after v) under the interpreter."""
    plan = []
    cfg, why = kernels.select(conv_basis.VARIANT.kernel, q, k, v, *rest[:5], rest[5:], "interpret", plan=plan)
    assert cfg is not None and cfg.template == "conv_basis", why
    return cfg, plan[0]


def conv_columns_case(d, dtype, n, count, group=1, softcap=0.0):
    """The start-column kernel, both triangles (the lower one; the strictly upper one, which works on
    the reversed sequence), against the variant's _start_columns for random starts per head."""
    q, k, v = tensors(d, dtype, n, n, heads=2 * group, group=group)
    scale = d ** -0.5
    cfg, _ = conv_select(q, k, v, (None, scale, softcap, False, 0.0, count, None, 0.0, "norm", 1e-9, 1, "float32"))
    module = kernels.load(cfg)
    gen = torch.Generator().manual_seed(4)
    g = q.shape[0] * q.shape[1]
    starts = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long),
                                     torch.randperm(n - 1, generator=gen)[:count - 1] + 1]) for _ in range(g)])
    starts = starts.sort(-1).values                          # 0 and count − 1 other columns per head
    qw, kw = (q.float() * scale).reshape(g, n, d), expand_kv(q, k).float().reshape(g, n, d)
    errs = {}
    for strict in (False, True):
        qq, kk = (qw.flip(1), kw.flip(1)) if strict else (qw, kw)
        ref = conv_basis._start_columns(qq, kk, starts, softcap, strict)
        got = module.start_columns(q, k, scale, starts, strict)
        assert got.dtype == torch.float32 and torch.equal(ref == float("-inf"), got == float("-inf"))
        live = ref > float("-inf")
        assert live.sum() > n
        errs["upper" if strict else "lower"] = max_err(got[live], ref[live])
    return errs


def conv_finish_case(d, dtype, causal, mask_kind, n, count, group=1, spread=2.0, softcap=0.0, precision="float32"):
    """Normalisation and exact rows: spread-out logits leave some rows' normalisers under the
    reliability bound; the kernel path must flag the same rows as the reference, recompute them
    exactly and give the reference's output."""
    q, k, v = tensors(d, dtype, n, n, heads=2 * group, group=group)
    q, k = (q.float() * spread).to(dtype), (k.float() * spread).to(dtype)
    rest = (make_mask(mask_kind, q, n), d ** -0.5, softcap, causal, 0.0, count, None, 0.0, "norm", 1e-9, 1, precision)
    cfg, plan = conv_select(q, k, v, rest)
    assert dict(cfg.params)["WORK_F64"] == (precision == "float64")
    ours, theirs = {}, {}
    out = conv_basis.kernel_forward(kernels.load(cfg), (q, k, v, *rest), plan, ours)
    ref = conv_basis._attend(q, k, v, *rest[:8], theirs, 1e-9, 1, precision)
    assert 0 < theirs["fallback_rows"] < theirs["rows"], theirs
    return {"out": max_err(out, ref), "fallback_rows_differ": abs(ours["fallback_rows"] - theirs["fallback_rows"])}


def conv_op_case(d, dtype, causal, mask_kind, n, count, group=1, softcap=0.0, precision="auto"):
    """The registered op, its kernels under the interpreter, against the variant's reference; at
    k = n also against exact attention. mask_kind "causal-full": a full boolean causal mask with key
    padding and causal=False (the plan must find the causal + per-key split)."""
    q, k, v = tensors(d, dtype, n, n, heads=2 * group, group=group)
    mask = make_mask("key-bool" if mask_kind == "causal-full" else mask_kind, q, n)
    if mask_kind == "causal-full":
        mask = mask & torch.ones(n, n, dtype=torch.bool).tril()
    rest = (mask, d ** -0.5, softcap, causal, 0.0, count, None, 0.0, "norm", 1e-9, 1, precision)
    cfg, _ = conv_select(q, k, v, rest)
    assert cfg.causal == (causal or mask_kind == "causal-full") and cfg.mask == ("none" if mask is None else "key")
    calls = kernels.dispatch.CALLS.get(cfg, 0)
    out = torch.ops.attnrewrite.conv_basis_attention(q, k, v, *rest)
    assert kernels.dispatch.CALLS[cfg] == calls + 1, "the kernels did not run"
    errs = {"out": max_err(out, conv_basis.reference(q, k, v, *rest))}
    if count >= n:
        errs["vs_exact"] = max_err(out, exact.reference(q, k, v, *rest[:5]))
    return errs


def op_case():
    """Through the registered op and autograd: the kernels back attnrewrite::exact_attention."""
    q, k, v = tensors(32, F32, 19, 19, heads=4, group=2)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = torch.ops.attnrewrite.exact_attention(*leaves, None, 32 ** -0.5, 0.0, True, 0.0)
    grads = torch.autograd.grad(out.sum(), leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = exact.reference(*ref_leaves, None, 32 ** -0.5, 0.0, True, 0.0)
    ref_grads = torch.autograd.grad(ref.sum(), ref_leaves)
    cfg, _ = kernels.select(exact.VARIANT.kernel, q, k, v, None, 1.0, 0.0, True, 0.0, (), "interpret")
    assert cfg is not None
    return {"out": max_err(out, ref), **{n: max_err(a, b) for n, a, b in zip(("dq", "dk", "dv"), grads, ref_grads)}}


TOL = {F32: 1e-4, F16: 2e-2}
CASES = {
    # exact: forward and backward
    "exact-d16-f32-none": (exact_case, (16, F32, False, "none", 37, 37)),
    "exact-d64-f16-causal-gqa2": (exact_case, (64, F16, True, "none", 20, 37), {"group": 2}),
    "exact-d128-f32-causal-keybool": (exact_case, (128, F32, True, "key-bool", 23, 23)),
    "exact-d16-f32-causal-boolean-deadrow-lq>lk": (exact_case, (16, F32, True, "boolean", 37, 20)),
    "exact-d64-f16-additive-softcap": (exact_case, (64, F16, False, "additive", 21, 30), {"softcap": 5.0}),
    "exact-d80-f32-keyadditive-gqa2-kvbatch1-dv48": (exact_case, (80, F32, False, "key-additive", 18, 33),
                                                     {"group": 2, "batch": 2, "kv_batch": 1, "dv": 48}),
    "exact-d16-f32-additive-lowest-row": (exact_case, (16, F32, False, "additive-lowest", 9, 21)),
    "exact-d16-f16-causal-boolean-mqa-decode": (exact_case, (16, F16, True, "boolean", 1, 33), {"group": 2}),
    "exact-d128-f16-causal-keyadditive": (exact_case, (128, F16, True, "key-additive", 17, 17)),
    # sparse window (+ sinks), forward
    "window-d16-f32-causal-backward": (window_case, (16, F32, True, "none", 40, 40, 8, 3, "auto")),
    "window-d64-f16-twosided-keybool-gqa2": (window_case, (64, F16, False, "key-bool", 33, 50, 10, 4, "auto"),
                                             {"group": 2}),
    "window-d16-f32-sinks-past-band": (window_case, (16, F32, False, "additive", 30, 60, 4, 40, "backward")),
    # sparse top-k (selection in PyTorch, the kernel gathers the kept keys), forward
    "topk-d16-f32-causal-boolean": (topk_case, (16, F32, True, "boolean", 21, 40, 7)),
    "topk-d64-f16-keyadditive-gqa2-softcap": (topk_case, (64, F16, False, "key-additive", 9, 37, 20),
                                              {"group": 2, "softcap": 5.0}),
    # block-sparse on given lists, forward and backward
    "block-d16-f32-causal": (block_sparse_case, (16, F32, True, "none", 50, 64, 16, 32)),
    "block-d64-f16-keybool-gqa2": (block_sparse_case, (64, F16, False, "key-bool", 33, 70, 32, 16), {"group": 2}),
    "block-d16-f32-causal-boolean-deadrow-softcap-lq>lk": (block_sparse_case,
                                                           (16, F32, True, "boolean", 37, 20, 16, 16), {"softcap": 5.0}),
    "block-d64-f16-causal-keyadditive-kvbatch1": (block_sparse_case, (64, F16, True, "key-additive", 40, 48, 16, 32),
                                                  {"batch": 2, "kv_batch": 1}),
    # sparse mode=block: the selection in PyTorch, the block-sparse kernels forward and backward
    "sparse-block-d16-f32-causal": (sparse_block_case, (16, F32, True, "none", 50, 50, 16, 0.5)),
    "sparse-block-d64-f16-keybool-gqa2": (sparse_block_case, (64, F16, False, "key-bool", 33, 45, 16, 0.5),
                                          {"group": 2}),
    "sparse-block-d16-f32-additive-pooled-mass": (sparse_block_case, (16, F32, False, "additive", 40, 70, 16, 0.4),
                                                  {"select": "pooled", "mass": 0.9}),
    "sparse-heads-d16-f32-causal-mixed": (sparse_block_case, (16, F32, True, "none", 70, 70, 16, 0.5),
                                          {"mode": "heads", "head_pattern": [0, 2], "mass": 0.9, "last": 9}),
    "sparse-heads-d64-f16-keybool-gqa2-vslash": (sparse_block_case, (64, F16, False, "key-bool", 40, 56, 16, 0.5),
                                                 {"group": 2, "mode": "heads", "head_pattern": [1, 0, 2, 1]}),
    "sparse-block-d16-f32-causal-keybool-headdensity-b32": (sparse_block_case,
                                                            (16, F32, True, "key-bool", 70, 70, 32, 0.5),
                                                            {"head_density": [0.3, 0.7]}),
    # preconditioned, forward
    "precond-d16-f32-causal-outputnorm": (preconditioned_case, (16, F32, True, "none", 40, 40, "output-norm")),
    "precond-d64-f16-boolean-rowequil": (preconditioned_case, (64, F16, False, "boolean", 20, 45,
                                                               "row-equilibrate")),
    # conv-basis: kernel start columns, normalisation + exact rows, the op (starts and FFTs in PyTorch)
    "conv-columns-d16-f32-softcap": (conv_columns_case, (16, F32, 37, 5), {"softcap": 5.0}),
    "conv-columns-d64-f16-gqa2": (conv_columns_case, (64, F16, 30, 4), {"group": 2}),
    "conv-finish-d16-f32-causal-keybool": (conv_finish_case, (16, F32, True, "key-bool", 40, 4)),
    "conv-finish-d64-f16-bidir": (conv_finish_case, (64, F16, False, "none", 33, 3)),
    "conv-finish-d16-f32-bidir-keybool-softcap-f64": (conv_finish_case, (16, F32, False, "key-bool", 40, 4),
                                                      {"spread": 4.0, "softcap": 50.0, "precision": "float64"}),
    "conv-op-k=n-d16-f32-causal-softcap": (conv_op_case, (16, F32, True, "none", 24, 24), {"softcap": 5.0}),
    "conv-op-k=n-d64-f16-bidir-keybool": (conv_op_case, (64, F16, False, "key-bool", 20, 20)),
    "conv-op-k4-d64-f16-bidir-keybool-gqa2": (conv_op_case, (64, F16, False, "key-bool", 48, 4), {"group": 2}),
    "conv-op-k6-d16-f32-causalfull-softcap-f32": (conv_op_case, (16, F32, False, "causal-full", 80, 6),
                                                  {"softcap": 5.0, "precision": "float32"}),
    # the op itself, forward and backward through autograd
    "op-exact-f32-causal-gqa2": (lambda: op_case(), ()),
}


def tolerance(case) -> float:
    fn, args = case[0], case[1]
    dtype = next((a for a in args if isinstance(a, torch.dtype)), F32)
    if fn is conv_columns_case:                                  # scores in fp32 from the same inputs
        return 1e-5
    return TOL[dtype] * (4 if fn is preconditioned_case else 1)   # gains up to 3.5 scale the output


def main(names):
    results = {}
    for name in names or CASES:
        case = CASES[name]
        try:
            errs = case[0](*case[1], **(case[2] if len(case) > 2 else {}))
            results[name] = {"errors": errs, "tolerance": tolerance(case)}
        except Exception:                                   # reported per case, the test fails it
            results[name] = {"error": traceback.format_exc(limit=4)}
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
