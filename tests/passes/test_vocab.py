"""The detectors' shared vocabulary (attnrewrite.passes.vocab), tested directly.

The einsum equations, the fill and soft-cap rules, the order of score-chain steps, the
two walks (on a toy graph kind), and both detectors' rule tables: one NoMatch, one mask
floor, and the same step kinds read from the same chain in an FX and an ONNX graph.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from attnrewrite import site
from attnrewrite.passes import fx_detect, fx_graph, fx_walk, onnx_detect, onnx_graph, onnx_walk, vocab
from attnrewrite.passes.vocab import (ADD, FILL, IGNORE, OTHER, PRODUCT, PRODUCT_DEPTH, SCALE, SOFTCAP,
                                      GraphKind, NoMatch, check_order, einsum_pv, einsum_qk, is_mask_fill,
                                      is_softcap, mask_kind, parse_einsum, rule_table)


# ----------------------------------------------------------------------------- one vocabulary
def test_one_nomatch_and_one_mask_floor():
    assert fx_detect.NoMatch is onnx_detect.NoMatch is NoMatch
    assert fx_walk.MASK_FLOOR == onnx_walk.MASK_FLOOR == vocab.MASK_FLOOR == site.MASK_FLOOR
    with pytest.raises(onnx_detect.NoMatch):
        parse_einsum("ij,jk")                       # raised by the vocab, caught as either name


def test_both_kinds_search_for_the_product_the_same_way():
    for kind in (fx_walk.FxKind, onnx_walk.OnnxKind):
        assert kind.reaches_product is GraphKind.reaches_product
        assert kind.walk_back is GraphKind.walk_back
        assert kind.follow_forward is GraphKind.follow_forward


# ----------------------------------------------------------------------------- einsum
def test_parse_einsum_reads_explicit_two_operand_products():
    assert parse_einsum("bhqd, bhkd -> bhqk") == ("bhqd", "bhkd", "bhqk")


@pytest.mark.parametrize("eq", ["bhqd,bhkd",            # implicit output
                                "...qd,...kd->...qk",    # ellipsis
                                "bqd,bkd,bkd->bqk",      # three operands
                                "bhqq,bhkd->bhqk",       # a letter twice in a term (a diagonal)
                                "a->b->c"])
def test_parse_einsum_rejects(eq):
    with pytest.raises(NoMatch):
        parse_einsum(eq)


@pytest.mark.parametrize("eq,shapes", [
    ("bhqd,bhkd->bhqk", [(2, 3, 4, 5), (2, 3, 6, 5)]),
    ("bqhd,bkhd->bhqk", [(2, 4, 3, 5), (2, 6, 3, 5)]),     # (B, L, H, D) layout
    ("bhqd,bhdk->bhqk", [(2, 3, 4, 5), (2, 3, 5, 6)]),     # k already transposed
    ("qd,kd->qk", [(4, 5), (6, 5)]),
    ("nqd,nkd->nqk", [(6, 4, 5), (6, 6, 5)]),
    ("hqbd,bdhk->bhqk", [(3, 4, 2, 5), (2, 5, 3, 6)]),     # axes in a rotated order
])
def test_einsum_qk_perms_reproduce_the_einsum(eq, shapes):
    q, k = (torch.randn(*s) for s in shapes)
    qp, kp = einsum_qk(eq)
    torch.testing.assert_close(q.permute(qp) @ k.permute(kp).transpose(-2, -1), torch.einsum(eq, q, k))


@pytest.mark.parametrize("eq", ["bhqd,bhkd->bhkq",      # kᵀ·q: the score axes swapped
                                "bhqd,bhkd->bhqd",      # nothing contracted into a score matrix
                                "bhqd,bhke->bhqk",      # no shared contraction axis
                                "bxqd,bxkd->bqk",       # two axes contracted
                                "bhqd,bkd->bhqk",       # a batch axis missing on k
                                "bhqd,bhkd->q"])        # no score matrix at all
def test_einsum_qk_rejects_misaligned(eq):
    with pytest.raises(NoMatch):
        einsum_qk(eq)


@pytest.mark.parametrize("eq,p_index,shapes", [
    ("bhqk,bhkd->bhqd", 0, [(2, 3, 4, 6), (2, 3, 6, 5)]),
    ("bhqk,bkhd->bqhd", 0, [(2, 3, 4, 6), (2, 6, 3, 5)]),   # v and output in (B, L, H, D)
    ("bhkd,bhqk->bhqd", 1, [(2, 3, 4, 6), (2, 3, 6, 5)]),   # P as the second operand
    ("bhqk,bhdk->bhdq", 0, [(2, 3, 4, 6), (2, 3, 5, 6)]),
    ("bhqk,hkdb->qbhd", 0, [(2, 3, 4, 6), (3, 6, 5, 2)]),   # axes in a rotated order
])
def test_einsum_pv_perms_reproduce_the_einsum(eq, p_index, shapes):
    p, v = torch.randn(*shapes[0]), torch.randn(*shapes[1])     # P's shape first, whatever its place
    vp, op = einsum_pv(eq, p_index)
    want = torch.einsum(eq, *((p, v) if p_index == 0 else (v, p)))
    torch.testing.assert_close((p @ v.permute(vp)).permute(op), want)


@pytest.mark.parametrize("eq", ["bhqk,bhqd->bhkd",      # contracted over the query axis
                                "bhqk,bhkd->bhkd",      # key axis kept in the output
                                "bhqk,bhke->bhqd"])     # no value axis
def test_einsum_pv_rejects_misaligned(eq):
    with pytest.raises(NoMatch):
        einsum_pv(eq, 0)


# ----------------------------------------------------------------------------- rules
def test_fill_rule_at_and_above_the_floor():
    floor = site.MASK_FLOOR
    assert is_mask_fill(floor) and is_mask_fill(float("-inf")) and is_mask_fill(-1e9)
    assert is_mask_fill(torch.finfo(torch.float32).min)
    assert not is_mask_fill(floor + 1) and not is_mask_fill(-1.0) and not is_mask_fill(0.0)
    assert not is_mask_fill(float("nan"))


def test_softcap_rule():
    assert is_softcap(30.0, "div", 30.0) and is_softcap(50.0, "mul", np.float32(1 / 50))
    assert is_softcap(30.0, "div", 30.0 * (1 + 1e-6))             # float rounding of the constants
    assert not is_softcap(30.0, "div", 30.01) and not is_softcap(30.0, "div", 10.0)
    assert not is_softcap(30.0, "mul", 30.0)
    assert not is_softcap(None, "div", 30.0) and not is_softcap(30.0, "div", None)
    assert not is_softcap(30.0, "mul", 0.0) and not is_softcap(0.0, "div", 0.0)


SC, CAP, BIAS, MASK = vocab.scale("mul", 0.5), vocab.softcap(30.0), vocab.add("bias", 1.0), vocab.fill("m", -1e9, True)


@pytest.mark.parametrize("steps", [[], [SC, CAP, BIAS, MASK], [SC, SC, CAP, MASK], [BIAS, SC, MASK, SC],
                                   [CAP], [vocab.view([2, 3], [6], None), CAP, vocab.view([6], [2, 3], None)]])
def test_order_in_the_normal_form(steps):
    check_order(steps)


@pytest.mark.parametrize("steps,why", [([BIAS, CAP], "mask before the soft-cap"),
                                       ([MASK, SC, CAP], "mask before the soft-cap"),
                                       ([CAP, SC], "scale after the soft-cap"),
                                       ([CAP, MASK, SC], "scale after the soft-cap"),
                                       ([CAP, CAP], "second soft-cap")])
def test_order_outside_the_normal_form(steps, why):
    with pytest.raises(NoMatch, match=why):
        check_order(steps)


def test_mask_kind():
    assert mask_kind(True, True) == mask_kind(True, False) == "additive"
    assert mask_kind(False, True) == "boolean" and mask_kind(False, False) == "none"


def test_rule_table_refuses_an_op_in_two_rows():
    assert rule_table(({"a", "b"}, len), ({"c"}, abs)) == {"a": len, "b": len, "c": abs}
    with pytest.raises(ValueError):
        rule_table(({"a", "b"}, len), ({"b"}, abs))


# ----------------------------------------------------------------------------- walks (toy graph kind)
class Toy(GraphKind):
    """Nodes are (output, op, inputs); a value is the output name."""
    products = frozenset({"mm"})
    rules = rule_table(({"cast"}, lambda gk, n: (n[2][0], None)),
                       ({"mul"}, lambda gk, n: (n[2][0], vocab.scale("mul", n[2][1]))),
                       ({"add"}, lambda gk, n: (n[2][0], vocab.add(n[2][1], 1.0))))

    def __init__(self, *nodes):
        self.nodes = {n[0]: n for n in nodes}

    def producer(self, x):
        return self.nodes.get(x)

    def op(self, node):
        return node[1]

    def inputs(self, node):
        return list(node[2])

    def readers(self, x):
        return [n for n in self.nodes.values() if x in n[2]]

    def name(self, node):
        return node[0]

    def origin(self, x):
        return f"input {x}"

    def classify_reader(self, u, x):
        if u[1] == "mm" and u[2][0] == x:
            return PRODUCT
        if u[1] == "cast":
            return [u[0]]
        return IGNORE if u[1] == "shape" else OTHER


def _casts(n):
    """s0 = mm(q, k); s1 = cast(s0); ...; sn = cast(s(n-1))."""
    return Toy(("s0", "mm", ("q", "k")), *((f"s{i}", "cast", (f"s{i - 1}",)) for i in range(1, n + 1)))


def test_reaches_product_searches_exactly_product_depth_steps():
    assert _casts(PRODUCT_DEPTH - 1).reaches_product(f"s{PRODUCT_DEPTH - 1}")
    assert not _casts(PRODUCT_DEPTH).reaches_product(f"s{PRODUCT_DEPTH}")
    assert not Toy(("s", "relu", ("x",)), ("x", "mm", ("q", "k"))).reaches_product("s")   # not a chain op


def test_walk_back_returns_the_product_and_forward_steps():
    g = Toy(("s", "mm", ("q", "k")), ("c", "cast", ("s",)), ("m", "mul", ("c", "0.5")), ("a", "add", ("m", "b")))
    prod, steps = g.walk_back("a")
    assert prod[0] == "s" and steps == [vocab.scale("mul", "0.5"), vocab.add("b", 1.0)]
    with pytest.raises(NoMatch, match="relu"):
        Toy(("r", "relu", ("s",)), ("s", "mm", ("q", "k"))).walk_back("r")
    with pytest.raises(NoMatch, match="input x"):
        Toy(("c", "cast", ("x",))).walk_back("c")


def test_follow_forward_finds_the_one_product():
    g = Toy(("c", "cast", ("p",)), ("o", "mm", ("c", "v")), ("n", "shape", ("p",)), ("r", "sum", ("p",)))
    prod, x, followed, others = g.follow_forward("p")
    assert prod[0] == "o" and x == "c" and [u[0] for u in followed] == ["c"] and [u[0] for u in others] == ["r"]
    with pytest.raises(NoMatch, match="several products"):
        Toy(("o", "mm", ("p", "v")), ("c", "cast", ("p",)), ("o2", "mm", ("c", "v"))).follow_forward("p")
    with pytest.raises(NoMatch, match="consumers: mm, sum"):      # P·v must read P first
        Toy(("r", "sum", ("p",)), ("o", "mm", ("v", "p"))).follow_forward("p")


# ----------------------------------------------------------------------------- the two rule tables
def test_rule_tables_cover_the_score_chain_ops():
    aten = torch.ops.aten
    assert set(onnx_walk.OnnxKind.rules) == {"Cast", "Identity", "Add", "Sub", "Mul", "Div", "Where", "Tanh"}
    fx_ops = set(fx_walk.FxKind.rules)
    for op in (aten.mul.Tensor, aten.div_.Scalar, aten.add.Tensor, aten.sub.Tensor, aten.masked_fill.Scalar,
               aten.where.self, aten.tanh.default, aten._to_copy.default, aten.view.default):
        assert op in fx_ops
    assert aten.bmm.default not in fx_ops and aten.bmm.default in fx_walk.FxKind.products


def test_every_rule_shows_the_spelling_it_reads():
    for kind in (fx_walk.FxKind, onnx_walk.OnnxKind):
        for read in set(kind.rules.values()):
            assert read.__doc__ and "s = " in read.__doc__, read.__name__


class Chain(torch.nn.Module):
    """s = q·kᵀ * 0.125; s = 30 * tanh(s / 30); s = s + bias; s = s masked where not keep."""

    def forward(self, q, k, v, bias, keep):
        s = q @ k.transpose(-2, -1) * 0.125
        s = 30.0 * torch.tanh(s / 30.0)
        s = (s + bias).masked_fill(~keep, float("-inf"))
        return torch.softmax(s, dim=-1) @ v


def _onnx_chain(fill=float("-inf")):
    """The same chain as `Chain`, written as an ONNX graph."""
    f = TensorProto.FLOAT
    consts = {"c": 0.125, "cap": 30.0, "fill": fill}
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["s0"]),
             helper.make_node("Mul", ["s0", "c"], ["s1"]),
             helper.make_node("Div", ["s1", "cap"], ["s2"]),
             helper.make_node("Tanh", ["s2"], ["s3"]),
             helper.make_node("Mul", ["s3", "cap"], ["s4"]),
             helper.make_node("Add", ["s4", "bias"], ["s5"]),
             helper.make_node("Where", ["keep", "s5", "fill"], ["s6"]),
             helper.make_node("Softmax", ["s6"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["o"])]
    inputs = [helper.make_tensor_value_info(n, f, [1, 2, 3, 4]) for n in ("q", "k", "v")]
    inputs += [helper.make_tensor_value_info("bias", f, [1, 1, 3, 3]),
               helper.make_tensor_value_info("keep", TensorProto.BOOL, [1, 1, 3, 3])]
    inits = [numpy_helper.from_array(np.array(x, dtype=np.float32), n) for n, x in consts.items()]
    graph = helper.make_graph(nodes, "chain", inputs, [helper.make_tensor_value_info("o", f, None)], inits)
    return onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_fx_and_onnx_read_the_same_steps_from_the_same_chain():
    args = (torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4),
            torch.randn(1, 1, 3, 3), torch.ones(1, 1, 3, 3, dtype=torch.bool))
    ep = torch.export.export(Chain(), args, strict=False)
    sm = next(n for n in ep.graph.nodes if n.target in fx_graph.SOFTMAX)
    _, fx_steps = fx_walk.walk_scores(sm.args[0], {})
    g = onnx_graph.Graph(_onnx_chain())
    _, onnx_steps = onnx_walk.OnnxKind(g).walk_back("s6")
    assert [st[0] for st in fx_steps] == [st[0] for st in onnx_steps] == [SCALE, SOFTCAP, ADD, FILL]
    assert fx_steps[1][1] == onnx_steps[1][1] == 30.0

    os_ = onnx_walk.OnnxSite("decomposed", "sm", "", "")
    _, factor = onnx_walk.walk_scores(g, "s6", os_)
    assert factor == 0.125 and os_.softcap == 30.0
    assert os_.biases == [("bias", 1.0)] and os_.keeps == [("keep", True)]


@pytest.mark.parametrize("fill,kept", [(site.MASK_FLOOR, True), (site.MASK_FLOOR + 1, False)])
def test_onnx_where_fill_at_and_above_the_floor(fill, kept):
    g = onnx_graph.Graph(_onnx_chain(fill))
    if kept:
        assert onnx_walk.OnnxKind(g).walk_back("s6")[1][-1][0] == FILL
    else:
        with pytest.raises(NoMatch, match="not a mask value"):
            onnx_walk.OnnxKind(g).walk_back("s6")
