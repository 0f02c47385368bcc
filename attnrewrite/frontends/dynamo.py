"""The dynamo front end: a graph torch.compile hands a backend, lowered to ATen.

Dynamo gives torch-level graphs (`torch._C._nn.scaled_dot_product_attention`, method calls,
`F.multi_head_attention_forward`, the fused `_transformer_encoder_layer_fwd` fast path).
`lower` first swaps the two fused fast paths for their plain-op spelling, then traces the
graph pre-dispatch (make_fx on Dynamo's own fake inputs, so dynamic sizes stay symbolic)
into an ATen graph — the same dialect as torch.export's training IR — on which the FX
detector and rewriter run unchanged. The rewritten GraphModule is what the backend runs
(eagerly, or handed to aot_autograd + Inductor).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch.fx import GraphModule
from torch.fx import traceback as fx_traceback
from torch.fx.experimental.proxy_tensor import make_fx
from torch._subclasses.fake_tensor import FakeTensor

from ..io import InputError
from .base import Rewritten
from .fxgraph import FxFrontEnd, named_float_outputs


def _fast_path_bias(mask, mask_type, batch: int, lq: int, lk: int, dtype):
    """The fast path's mask (True / -inf = masked out) as an additive bias broadcasting to (B, H, Lq, Lk)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    if mask_type == 1 or (mask.dim() == 2 and mask.shape[0] == batch and mask.shape[1] == lk and mask_type != 0):
        return mask.view(batch, 1, 1, lk).to(dtype)             # key padding (B, Lk)
    return mask.to(dtype)                                       # (Lq, Lk) or (B, H, Lq, Lk)


def native_multi_head_attention(query, key, value, embed_dim, num_head, qkv_weight, qkv_bias, proj_weight,
                                proj_bias, mask=None, need_weights=True, average_attn_weights=True,
                                mask_type=None):
    """`torch._native_multi_head_attention` (nn.MultiheadAttention's fast path) in plain ops.

    Batch-first (B, L, E) inputs; returns (output, weights), weights empty unless asked for.
    """
    b, lq, lk, d = query.shape[0], query.shape[1], key.shape[1], embed_dim // num_head
    wq, wk, wv = qkv_weight.chunk(3)
    bq, bk, bv = qkv_bias.chunk(3)
    q = F.linear(query, wq, bq).view(b, lq, num_head, d).transpose(1, 2)
    k = F.linear(key, wk, bk).view(b, lk, num_head, d).transpose(1, 2)
    v = F.linear(value, wv, bv).view(b, lk, num_head, d).transpose(1, 2)
    bias = _fast_path_bias(mask, mask_type, b, lq, lk, q.dtype)
    if need_weights:
        s = torch.matmul(q, k.transpose(-2, -1)) * d ** -0.5
        p = torch.softmax(s if bias is None else s + bias, dim=-1)
        o = torch.matmul(p, v)
        weights = p.mean(dim=1) if average_attn_weights else p
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        weights = query.new_empty(0)
    return F.linear(o.transpose(1, 2).reshape(b, lq, embed_dim), proj_weight, proj_bias), weights


def transformer_encoder_layer_fwd(src, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias,
                                  use_gelu, norm_first, eps, norm_weight_1, norm_bias_1, norm_weight_2,
                                  norm_bias_2, ffn_weight_1, ffn_bias_1, ffn_weight_2, ffn_bias_2, mask=None,
                                  mask_type=None):
    """`torch._transformer_encoder_layer_fwd` (nn.TransformerEncoderLayer's fast path) in plain ops."""
    def attend(x):
        return native_multi_head_attention(x, x, x, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight,
                                           proj_bias, mask, False, True, mask_type)[0]

    def feed_forward(x):
        h = F.linear(x, ffn_weight_1, ffn_bias_1)
        return F.linear(F.gelu(h) if use_gelu else F.relu(h), ffn_weight_2, ffn_bias_2)

    def norm(x, w, bias):
        return F.layer_norm(x, (embed_dim,), w, bias, eps)

    x = src
    if norm_first:
        x = x + attend(norm(x, norm_weight_1, norm_bias_1))
        return x + feed_forward(norm(x, norm_weight_2, norm_bias_2))
    x = norm(x + attend(x), norm_weight_1, norm_bias_1)
    return norm(x + feed_forward(x), norm_weight_2, norm_bias_2)


FAST_PATHS = {torch._native_multi_head_attention: native_multi_head_attention,
              torch._transformer_encoder_layer_fwd: transformer_encoder_layer_fwd}


def without_fast_paths(gm: GraphModule) -> int:
    """Point every fused fast-path call in `gm` at its plain-op spelling; returns how many."""
    count = 0
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in FAST_PATHS:
            n.target = FAST_PATHS[n.target]
            count += 1
    if count:
        gm.recompile()
    return count


def lower(gm: GraphModule) -> GraphModule:
    """Dynamo's torch-level graph → an ATen graph (pre-dispatch, symbolic sizes kept, module paths kept).

    A Python float that Dynamo made dynamic (an attribute that changed between calls: a softmax
    scale, a dropout rate) reaches the graph as a 0-d tensor input read by `.item()`; Dynamo's
    fake for it remembers the symbol standing for its value (`item_memo`). make_fx fakes its
    inputs afresh and forgets that symbol, and `.item()` on fake data then fails; so each
    input gets its symbol back before the graph runs. The lowered graph then reads the float as
    Dynamo's own graph does: where it stays symbolic (a scale) it is an argument of the graph;
    where an op needs a number (SDPA's dropout_p) Dynamo has already guarded on its value.
    """
    without_fast_paths(gm)
    fakes = [n.meta.get("example_value", n.meta.get("val")) for n in gm.graph.nodes if n.op == "placeholder"]
    memos = [getattr(f, "item_memo", None) for f in fakes]

    def run(*args):
        for a, memo in zip(args, memos):
            if memo is not None:
                a.item_memo = memo
        return torch.fx.Interpreter(gm).run(*args)

    with fx_traceback.preserve_node_meta():
        return make_fx(run, pre_dispatch=True, tracing_mode="fake")(*fakes)


DYNAMO_ROOT = re.compile(r"^[LG]\[[^\]]*\](?:\[[^\]]*\])*\.?")   # L['self'], L['fn'], G['net'], L['args'][0]


def model_module_paths(gm: GraphModule) -> None:
    """Module paths in `gm`'s `nn_module_stack` as the model itself names them ("layers.0.attn"):
    without the expression Dynamo reached the root module by (`L['self']`, `L['fn']`, `G['net']`),
    which says how the model was called, not where the attention sits. Site names come from these."""
    for n in gm.graph.nodes:
        stack = n.meta.get("nn_module_stack")
        if stack:
            n.meta["nn_module_stack"] = {key: (DYNAMO_ROOT.sub("", str(path)), *rest)
                                         for key, (path, *rest) in stack.items()}


STATE_WORDS = ("_parameters_", "_buffers_", "_modules_")   # in Dynamo's names for module state


def _concrete(x):
    """A symbolic size Dynamo passes as an example input, as the int it stands for here (no guard)."""
    return x.node.hint if isinstance(x, torch.SymInt) else x


class DynamoFrontEnd(FxFrontEnd):
    """One graph from torch.compile, lowered to ATen; its one input set is Dynamo's example inputs."""

    fmt = "dynamo"

    def __init__(self, gm: GraphModule, example_inputs: list, name: str = "torch.compile graph"):
        # which inputs are the model's state (parameters, buffers: Dynamo names them after their
        # module path) and which are data; read before lowering renames the placeholders
        sources = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        self._is_state = [isinstance(x, torch.nn.Parameter) or any(w in nm for w in STATE_WORDS)
                          for nm, x in zip(sources, example_inputs)]
        self.graph_module = lower(gm)
        model_module_paths(self.graph_module)
        self.program = self.graph_module
        usable = not any(isinstance(x, FakeTensor) for x in example_inputs)
        self.inputs = [[_concrete(x) for x in example_inputs]] if usable else []
        self.inputs_kind = "example" if usable else "none"
        self.inputs_problem = "" if usable else "Dynamo passed fake example inputs: no values to plan or check on"
        self.name = name
        names = [n.name for n in self.graph_module.graph.nodes if n.op == "placeholder"]
        self.params = {nm for nm, x in zip(names, example_inputs) if isinstance(x, torch.nn.Parameter)}
        self.constants = {}

    def flat_inputs(self, input_set):
        return list(input_set)

    def synthesise(self, seed: int) -> list:
        """One more input set like Dynamo's example: the model's state as it is; data drawn
        with `seed` — integer ids uniformly within the example's range, 0/1 masks and flags as
        they are, floats with the example tensor's own mean and standard deviation."""
        if not self.inputs:
            raise InputError(self.inputs_problem)
        g = torch.Generator().manual_seed(seed)
        out = []
        for x, state in zip(self.inputs[0], self._is_state):
            if state or not isinstance(x, torch.Tensor) or x.numel() < 2 or x.dtype == torch.bool:
                out.append(x)
            elif x.is_floating_point():
                out.append(torch.randn(x.shape, generator=g).to(x.dtype) * x.float().std().to(x.dtype)
                           + x.float().mean().to(x.dtype))
            else:
                lo, hi = int(x.min()), int(x.max())
                out.append(x if hi - lo <= 1 else torch.randint(lo, hi + 1, x.shape, generator=g, dtype=x.dtype))
        return [out]

    def rewrite(self, sites, variant, choice):
        return Rewritten(self.rewrite_graph_module(sites, variant, choice), {}, {})

    def outputs(self, program, input_set):
        with torch.no_grad():
            return named_float_outputs((program or self.program)(*input_set))
