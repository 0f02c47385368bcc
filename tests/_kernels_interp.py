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
from attnrewrite.variants import exact, preconditioned, sparse

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
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def exact_case(d, dtype, causal, mask_kind, lq, lk, group=1, softcap=0.0, kv_batch=None, batch=1, dv=None):
    q, k, v = tensors(d, dtype, lq, lk, heads=2 * group, group=group, batch=batch, kv_batch=kv_batch, dv=dv)
    mask = make_mask(mask_kind, q, lk)
    args = (q, k, v, mask, d ** -0.5, softcap, causal, 0.0)
    out = kernels.forward("exact_attention", args)
    if out is None:
        raise AssertionError("no kernel ran")
    ref = exact.reference(*args)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    dq, dk, dv_ = kernels.backward("exact_attention", grad, args)
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
    out = kernels.forward("sparse_attention", args)
    if out is None:
        raise AssertionError("no kernel ran")
    return {"out": max_err(out, sparse.reference(*args))}


def topk_case(d, dtype, causal, mask_kind, lq, lk, kept, group=1, softcap=0.0):
    q, k, v = tensors(d, dtype, lq, lk, heads=2 * group, group=group)
    args = (q, k, v, make_mask(mask_kind, q, lk), d ** -0.5, softcap, causal, 0.0,
            "topk", kept, 256, 4, "auto", 64, 0.25, 1.0)
    out = kernels.forward("sparse_attention", args)
    if out is None:
        raise AssertionError("no kernel ran")
    return {"out": max_err(out, sparse.reference(*args))}


def preconditioned_case(d, dtype, causal, mask_kind, lq, lk, mode, group=1):
    q, k, v = tensors(d, dtype, lq, lk, heads=2 * group, group=group)
    gain = [0.5 + h for h in range(q.shape[1])]
    args = (q, k, v, make_mask(mask_kind, q, lk), d ** -0.5, 0.0, causal, 0.0, mode, gain)
    out = kernels.forward("preconditioned_attention", args)
    if out is None:
        raise AssertionError("no kernel ran")
    return {"out": max_err(out, preconditioned.reference(*args))}


def block_sparse_case(d, dtype, causal, mask_kind, lq, lk, bm, bn, group=1):
    """Random kept blocks (block 0 always), a random subset of the blocks no element mask cuts
    marked full; the reference is exact attention under the elementwise mask the blocks make."""
    q, k, v = tensors(d, dtype, lq, lk, heads=2 * group, group=group)
    g = torch.Generator().manual_seed(3)
    qb, kb = -(-lq // bm), -(-lk // bn)
    keep = torch.rand(1, q.shape[1], qb, kb, generator=g) < 0.5
    keep[..., 0] = True
    i, j = torch.arange(qb)[:, None], torch.arange(kb)[None, :]
    uncut = ((j + 1) * bn <= lk) & (((j + 1) * bn - 1 <= i * bm + lk - lq) if causal else True)
    full = keep & uncut & (torch.rand(keep.shape, generator=g) < 0.7)
    mask = make_mask(mask_kind, q, lk)
    dense = keep.repeat_interleave(bm, -2)[..., :lq, :].repeat_interleave(bn, -1)[..., :lk]
    out = kernels.block_sparse_attention(q, k, v, kernels.block_lists(keep, full), bm, bn, mask=mask,
                                         causal=causal)
    ref = exact.reference(q, k, v, dense if mask is None else dense & mask, d ** -0.5, 0.0, causal, 0.0)
    return {"out": max_err(out, ref), "full_blocks": float(full.sum())}


def op_case():
    """Through the registered op and autograd: the kernels back attnrewrite::exact_attention."""
    q, k, v = tensors(32, F32, 19, 19, heads=4, group=2)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = torch.ops.attnrewrite.exact_attention(*leaves, None, 32 ** -0.5, 0.0, True, 0.0)
    grads = torch.autograd.grad(out.sum(), leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = exact.reference(*ref_leaves, None, 32 ** -0.5, 0.0, True, 0.0)
    ref_grads = torch.autograd.grad(ref.sum(), ref_leaves)
    cfg, _ = kernels.select("exact_attention", q, k, v, None, 1.0, 0.0, True, 0.0, (), "interpret")
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
    # block-sparse on given lists, forward
    "block-d16-f32-causal": (block_sparse_case, (16, F32, True, "none", 50, 64, 16, 32)),
    "block-d64-f16-keybool-gqa2": (block_sparse_case, (64, F16, False, "key-bool", 33, 70, 32, 16), {"group": 2}),
    # preconditioned, forward
    "precond-d16-f32-causal-outputnorm": (preconditioned_case, (16, F32, True, "none", 40, 40, "output-norm")),
    "precond-d64-f16-boolean-rowequil": (preconditioned_case, (64, F16, False, "boolean", 20, 45,
                                                               "row-equilibrate")),
    # the op itself, forward and backward through autograd
    "op-exact-f32-causal-gqa2": (lambda: op_case(), ()),
}


def tolerance(case) -> float:
    fn, args = case[0], case[1]
    dtype = next((a for a in args if isinstance(a, torch.dtype)), F32)
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
