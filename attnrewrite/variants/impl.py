"""The implementation table: which code an op call runs, on the device it runs on.

Every variant lists its implementations, fastest first (`IMPLEMENTATIONS` in its module);
the op takes, per call, the first one whose `covers(*args)` says nothing against the call.
`args` are the reference's arguments (q, k, v, mask, scale, softcap, causal, dropout_p,
*variant params). Whatever a variant lists, the table is

    triton      (ATTNREWRITE_KERNELS=interpret only: the kernels are then what is under test)
    <the variant's fast paths>   e.g. exact → scaled_dot_product_attention, sparse window → FlexAttention
    triton      the generated kernel, on CUDA, where a template covers the call
    reference   the variant's PyTorch reference: covers everything

An implementation is differentiable in q, k and v: the op's backward recomputes the forward
with the same implementation under autograd (its dropout replayed from the seed), unless the
generated kernels have a backward of their own. `lower` is the same computation as a function
a tracer can follow (ATen ops, FlexAttention's higher-order op): the compile backend and
`lowered_module` substitute it for the op so that Inductor compiles it as it compiles any
attention, with no Python call on the hot path. An implementation without `lower` keeps the
op in the graph.

The label a report shows is "<name>-<device>" ("sdpa-cpu", "flex-cuda", "triton-sm90",
"triton-interpret", "reference"). `counting()` collects how many calls each label served
while it is open (the pipeline opens one around its check), so counts belong to a rewrite,
not to the process.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from .. import kernels
from ..tally import Tally


@dataclasses.dataclass(frozen=True)
class Implementation:
    name: str                                   # sdpa | flex | triton | reference
    covers: Callable                            # (*args) -> None, or why this implementation cannot run the call
    run: Callable                               # (*args) -> output (B, H, Lq, Dv), differentiable
    lower: Callable | None = None               # traceable form of run, or None (the op stays in the graph)
    seeded: bool = True                         # run under the op's dropout seed (draws its mask from the RNG)
    quiet: bool = False                         # its reason for not running is not worth a report line


FORCE_ENV = "ATTNREWRITE_IMPL"     # a name (sdpa, flex, triton, reference): take it wherever it covers the call


def label(impl: Implementation, device) -> str:
    device = torch.device(device)
    if impl.name == "reference":
        return "reference"
    if impl.name == "triton":
        if device.type != "cuda":
            return "triton-interpret"
        major, minor = torch.cuda.get_device_capability(device)
        return f"triton-sm{major}{minor}"
    return f"{impl.name}-{device.type}"


def _triton_covers(plan):
    def covers(*args):
        return kernels.reason(plan, args)
    return covers


def _triton_run(plan):
    def run(*args):
        return kernels.forward(plan, args)
    return run


def table(reference, fast: tuple = (), kernel=None) -> tuple:
    """The full ordered table for an op: its fast paths between the kernels (its KernelPlan,
    kernels/dispatch.py) and the reference."""
    triton = Implementation("triton", _triton_covers(kernel), _triton_run(kernel))
    first = Implementation("triton", lambda *a: triton.covers(*a) if kernels.interpreting() else "not interpreting",
                           triton.run, quiet=True)
    ref = Implementation("reference", lambda *a: None, reference, lower=None)
    return (first, *fast, triton, ref)


def choose(impls, args) -> tuple[Implementation, list[str]]:
    """(the implementation that runs the call, why each one before it did not)."""
    forced = os.environ.get(FORCE_ENV, "").strip().lower()
    skipped = []
    for impl in impls:
        if forced and impl.name not in (forced, "reference"):
            continue
        why = impl.covers(*args)
        if why is None:
            return impl, skipped
        if not impl.quiet and impl.name not in [s.split(":")[0] for s in skipped]:
            skipped.append(f"{impl.name}: {why}")
    raise RuntimeError("no implementation covers the call")   # the reference always does


def differentiable(impls, args):
    """The function the op's backward recomputes the call with under autograd: what covers
    `args` (leaves that want a gradient), skipping the interpreter's kernels that `table` puts
    first; a kernel chosen there (forward only) stands for the reference's VJP."""
    chosen, _ = choose(impls[1:], args)
    return (impls[-1].run if chosen.name == "triton" else chosen.run), chosen


def describe(impls, args, device=None) -> dict:
    """{"impl": label, "impl_reason": why faster ones were not used ("" when the first ran)};
    `device` labels a call described on meta tensors."""
    impl, skipped = choose(impls, args)
    return {"impl": label(impl, device or args[0].device), "impl_reason": "; ".join(skipped)}


def count(impl: Implementation, device) -> None:
    _CALLS.add(label(impl, device))


_CALLS = Tally("implementation calls")
counting = _CALLS.counting   # `with counting() as counts:` {label: calls} of every op call made inside


# ---------------------------------------------------------------- lowering the ops in a graph

def _value(a):
    """A node argument as the lowering decision sees it: its example value (fake tensor), or itself."""
    if isinstance(a, torch.fx.Node):
        return a.meta.get("val")
    if isinstance(a, (list, tuple)):
        return type(a)(_value(x) for x in a)
    return a


def lowering_for(impls, out_map_fn, n_args: int):
    """The function substituted for an op call: the chosen implementation's traceable form, then
    the calibrated output map; the dropout seed is dropped (the compiled graph draws its own mask)."""
    def lowered(*args, **kwargs):
        args = (*args, *[None] * (n_args - len(args)))
        out_map = kwargs.get("out_map", args[-1])
        ref_args = args[:-2]
        impl, _ = choose(impls, ref_args)
        return out_map_fn(impl.lower(*ref_args), out_map)
    return lowered


def lower_graph(gm: torch.fx.GraphModule, ops: dict) -> dict:
    """Replace, in place, each call of an op in `ops` ({op overload: (implementations, out_map_fn)})
    whose chosen implementation has a traceable form, by that form. Returns {node name: label or
    "kept: why"} for every op call met."""
    done = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in ops:
            continue
        impls, out_map_fn = ops[node.target]
        n_args = len(node.target._schema.arguments)
        args = [_value(a) for a in node.args]
        args = (*args, *[None] * (n_args - len(args)))[:-2]
        if any(a is None for a in args[:3]):
            done[node.name] = "kept: no example value for q, k or v"
            continue
        impl, skipped = choose(impls, args)
        if impl.lower is None:
            done[node.name] = _kept_label(impls, args, impl, skipped)
            continue
        node.meta[LOWERED_FROM] = node.target
        node.target = lowering_for(impls, out_map_fn, n_args)
        done[node.name] = label(impl, args[0].device)
    gm.graph.lint()
    gm.recompile()
    return done


def _symbolic(t) -> bool:
    return isinstance(t, torch.Tensor) and not all(isinstance(d, int) for d in t.shape)


def _at_hints(args):
    """`args` with each tensor of symbolic sizes replaced by a data-less one of the sizes its symbols
    stand for in the example Dynamo traced with; None when a size has no such value."""
    out = []
    for a in args:
        if _symbolic(a):
            hints = [d if isinstance(d, int) else getattr(d.node, "hint", None) for d in a.shape]
            if any(h is None for h in hints):
                return None
            with FakeTensorMode():
                a = torch.empty([int(h) for h in hints], dtype=a.dtype, device=a.device, requires_grad=a.requires_grad)
        out.append(a)
    return tuple(out)


def _kept_label(impls, args, impl: Implementation, skipped: list[str]) -> str:
    """What a kept op call is labelled: the implementation its table takes, and why no faster one.
    With symbolic sizes the op chooses per call, at run time, at the call's real sizes (a window
    runs FlexAttention from 1024 keys on): the label says so, and what the example's sizes take."""
    dev = args[0].device
    if not any(_symbolic(a) for a in args[:4]):
        return f"kept: {label(impl, dev)}" + (f" ({'; '.join(skipped)})" if skipped else "")
    runtime = "kept: chosen per call at run time (sizes are symbolic)"
    hinted = _at_hints(args)
    if hinted is None:
        return runtime
    at_hint, why = choose(impls, hinted)
    return f"{runtime}; at the example's sizes: {label(at_hint, dev)}" + (f" ({'; '.join(why)})" if why else "")


LOWERED_FROM = "attnrewrite_lowered_from"     # node.meta key: the op a lowered call stands for


def unlower_graph(gm: torch.fx.GraphModule) -> None:
    """Undo lower_graph: every lowered call is the op again (which then runs its table)."""
    for node in gm.graph.nodes:
        if LOWERED_FROM in node.meta:
            node.target = node.meta.pop(LOWERED_FROM)
    gm.recompile()
