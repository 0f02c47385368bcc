"""An ONNX graph as the passes read and write it: `Graph` (read-only indexes, shapes from inference or
from the graph's structure, small constant expressions folded), shape inference on a weightless
copy, `Builder` (emits fresh nodes and constants and tracks their dtypes), `constant` (a value
computed from initializers alone, evaluated) and `sweep` (drops what no output reaches).

Shapes come from onnxruntime's symbolic shape inference (symbolic dims keep their names), falling
back to onnx's own; where neither has a value's shape (onnx's stops at contrib ops), `Graph.shape`
reads it from the graph (`structural_shape`: a Reshape's constant shape, a Transpose's perm,
shape-preserving ops such as RotaryEmbedding and SimplifiedLayerNormalization). Weights are never
needed: large initializers are replaced by typed graph inputs on a light copy before inference.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper
from onnx.reference import ReferenceEvaluator


class Graph:
    """Read-only indexes over a (shape-inferred) GraphProto."""

    def __init__(self, model: onnx.ModelProto, inferred: onnx.ModelProto | None = None):
        self.model = model
        g = model.graph
        self.graph = g
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.producer = {o: n for n in g.node for o in n.output if o}
        self.users: dict[str, list] = {}
        for n in g.node:
            for i in n.input:
                if i:
                    self.users.setdefault(i, []).append(n)
        self.outputs = {o.name for o in g.output}
        self.inits = {t.name: t for t in g.initializer}
        self.types = {}
        src = inferred.graph if inferred is not None else g
        for v in list(src.value_info) + list(src.input) + list(src.output) + list(g.input) + list(g.output):
            if v.type.HasField("tensor_type") and v.name not in self.types:
                self.types[v.name] = v.type.tensor_type
        for t in g.initializer:
            self.types.setdefault(t.name, onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims)).tensor_type)
        self._structural = None        # ({name: dims}, {name: elem type}) where inference has none

    def inferred_shape(self, name: str) -> list | None:
        """The shape inference gave (or the graph declares); None when it has none."""
        t = self.types.get(name)
        if t is None or not t.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]

    def shape(self, name: str) -> list | None:
        """Dims as ints (static) or strings (symbolic); None entries for unknown ones.

        Where inference has no shape (it stops at ops it does not know, e.g. com.microsoft
        RotaryEmbedding when onnxruntime's symbolic inference gave up), the shape read
        from the graph's structure (`structural_shape`), often only its rank.
        """
        s = self.inferred_shape(name)
        return s if s is not None else self.structure()[0].get(name)

    def rank(self, name: str) -> int | None:
        s = self.shape(name)
        return None if s is None else len(s)

    def elem_type(self, name: str) -> int:
        t = self.types.get(name)
        if t is not None and t.elem_type:
            return t.elem_type
        return self.structure()[1].get(name, 0)

    def structure(self) -> tuple[dict, dict]:
        """Shapes and element types read from the graph itself, for values inference left
        without them; one pass in graph (topological) order, filled in on first use."""
        if self._structural is None:
            self._structural = shapes, types = {}, {}
            for n in self.graph.node:
                if not n.output or not n.output[0]:
                    continue
                o = n.output[0]
                if self.inferred_shape(o) is None:
                    dims = structural_shape(self, n)
                    if dims is not None:
                        shapes[o] = dims
                t = self.types.get(o)
                if t is None or not t.elem_type:
                    et = structural_type(self, n)
                    if et:
                        types[o] = et
        return self._structural

    def const(self, name: str):
        """The numpy value of an initializer or Constant node output, else None."""
        if name in self.inits:
            t = self.inits[name]
            if t.data_location == onnx.TensorProto.EXTERNAL and not t.raw_data:
                return None
            return numpy_helper.to_array(t)
        n = self.producer.get(name)
        if n is not None and n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":            # (a value left on disk is unknown here, as an initializer's)
                    external = a.t.data_location == onnx.TensorProto.EXTERNAL and not a.t.raw_data
                    return None if external else numpy_helper.to_array(a.t)
                if a.name in ("value_float", "value_int"):
                    return np.array(onnx.helper.get_attribute_value(a))
                if a.name in ("value_floats", "value_ints"):
                    return np.array(onnx.helper.get_attribute_value(a))
        return None

    def fold(self, name: str, depth: int = 8):
        """A small constant expression's value (scale from Sqrt(Cast(Shape(q)[-1])) etc.)."""
        c = self.const(name)
        n = self.producer.get(name)
        if c is not None or n is None or depth == 0:
            return c
        op = n.op_type
        if op == "Shape":
            s = self.shape(n.input[0])
            if s is None:
                return None
            s = s[attr(n, "start", 0):attr(n, "end", len(s))]     # unknown dims stay None
            return np.array([d if isinstance(d, int) else None for d in s], dtype=object)
        args = [self.fold(i, depth - 1) if i else None for i in n.input]
        if op == "ConstantOfShape":       # torch.full([], x) from the TorchScript exporter: ConstantOfShape([]) + x
            shape, value = args[0], attr(n, "value")
            if shape is None or shape.dtype == object or shape.size > 1 or (shape.size == 1 and shape[0] != 1):
                return None               # only a scalar (or one-element) fill is a small constant
            fill = numpy_helper.to_array(value) if value is not None else np.zeros(1, np.float32)
            return np.full([int(s) for s in shape.ravel()], fill.ravel()[0], dtype=fill.dtype)
        if op == "Concat" and args and all(a is not None and a.ndim <= 1 for a in args):
            return _known(np.concatenate([a.astype(object).ravel() for a in args]))   # a Reshape's dynamic shape
        if not args or any(a is None for a in args[:1 if op in self.UNARY else 2]):
            return None                   # (no inputs: a Constant whose value is not known here)
        a = args[0]
        if a.dtype == object and op not in ("Gather", "Slice", "Squeeze", "Unsqueeze"):
            return None
        if op in self.UNARY:
            fn = self.UNARY[op]
            return fn(a) if op != "Cast" else a.astype(onnx.helper.tensor_dtype_to_np_dtype(attr(n, "to")))
        if op == "Gather" and a.ndim == 1 and args[1] is not None:
            return _known(np.asarray(np.take(a, args[1], axis=0), dtype=a.dtype))
        if op == "Slice" and a.ndim == 1 and len(args) >= 3 and all(x is not None for x in args[1:]):
            start, end = int(args[1].ravel()[0]), int(args[2].ravel()[0])
            step = int(args[4].ravel()[0]) if len(args) > 4 else 1
            return _known(a[start:end:step]) if (len(args) < 4 or int(args[3].ravel()[0]) == 0) else None
        if op in ("Div", "Mul", "Pow", "Add", "Sub"):
            return {"Div": np.divide, "Mul": np.multiply, "Pow": np.power, "Add": np.add,
                    "Sub": np.subtract}[op](a.astype(np.float64), args[1].astype(np.float64)).astype(a.dtype)
        if op in ("Squeeze", "Unsqueeze", "Reshape") and a.size == 1:
            return a.reshape(())
        return None

    UNARY = {"Sqrt": np.sqrt, "Reciprocal": np.reciprocal, "Cast": None, "Identity": lambda a: a,
             "CastLike": lambda a: a}

    def scalar(self, name: str) -> float | None:
        c = self.fold(name)
        if c is None or c.size != 1 or c.dtype in (np.bool_, object):
            return None
        return float(c.reshape(()))

    def op(self, name: str, *types: str):
        n = self.producer.get(name)
        return n if n is not None and n.op_type in types else None

    def consumers(self, name: str) -> list:
        return self.users.get(name, [])

    def used(self, name: str) -> bool:
        return bool(name) and (name in self.outputs or bool(self.users.get(name)))


def _known(a):
    """An object array of dims as int64 once every entry is known, else keep it partial."""
    if a.dtype != object:
        return a
    return a.astype(np.int64) if all(x is not None for x in a.ravel()) else a


# ---------------------------------------------------------------- structural shapes

STD_DOMAINS = ("", "ai.onnx", "com.microsoft")
# output 0 has input 0's shape (and type): elementwise, normalisations, rotary embeddings
SAME_SHAPE = frozenset({
    "Identity", "Cast", "CastLike", "Softmax", "LogSoftmax", "Dropout", "Relu", "LeakyRelu", "Elu", "Selu",
    "Celu", "Gelu", "FastGelu", "BiasGelu", "QuickGelu", "Tanh", "Sigmoid", "HardSigmoid", "Softplus",
    "Mish", "Erf", "Sqrt", "Neg", "Exp", "Log", "Abs", "Reciprocal", "Floor", "Ceil", "Round", "Sign",
    "Clip", "IsNaN", "IsInf", "Not", "Trilu", "LayerNormalization", "SimplifiedLayerNormalization",
    "RMSNormalization", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "RotaryEmbedding"})
BROADCAST = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Mod", "Where", "And", "Or", "Xor", "Equal", "Less",
                       "LessOrEqual", "Greater", "GreaterOrEqual", "Max", "Min", "Sum", "PRelu"})
BOOL_OUT = frozenset({"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "Not",
                      "IsNaN", "IsInf"})
INT64_OUT = frozenset({"Shape", "Size", "NonZero", "ArgMax", "ArgMin"})
TYPE_OF_INPUT0 = SAME_SHAPE | BROADCAST | frozenset({
    "Transpose", "Reshape", "MatMul", "Einsum", "Unsqueeze", "Squeeze", "Expand", "Concat", "Slice",
    "Gather", "GatherElements", "Tile", "Flatten", "Range", "ReduceSum", "ReduceMean", "ReduceMax",
    "ReduceMin", "CumSum", "Gemm"})


def _broadcast(shapes: list) -> list:
    """numpy broadcasting of dims lists (ints, symbols, None for unknown)."""
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        dims = [s[i - rank + len(s)] for s in shapes if i - rank + len(s) >= 0]
        big = {d for d in dims if isinstance(d, int) and d != 1}
        rest = {d for d in dims if d != 1}
        if big:
            out.append(big.pop() if len(big) == 1 else None)
        elif not rest:
            out.append(1)
        else:
            out.append(rest.pop() if len(rest) == 1 and None not in rest else None)
    return out


def structural_shape(g: "Graph", n) -> list | None:
    """Output 0's dims read from the node and its inputs' dims, or None.

    Rank first: a Reshape by a constant shape of four entries is rank 4 (0 copies a dim,
    -1 is solved when the rest are known), a Transpose has its perm's length, MatMul
    broadcasts the batch axes, shape-preserving ops (RotaryEmbedding, the layer norms,
    elementwise) keep input 0's; dims nothing proves are None.
    """
    op = n.op_type
    if n.domain not in STD_DOMAINS or not n.input:
        return None
    x = g.shape(n.input[0]) if n.input[0] else None
    if op in SAME_SHAPE:       # (a RotaryEmbedding exported as a function puts its result last)
        return None if op == "RotaryEmbedding" and len(n.output) > 1 else x
    if op in BROADCAST:
        shapes = [g.shape(i) for i in n.input if i]
        return None if any(s is None for s in shapes) else _broadcast(shapes)
    if op == "Transpose":
        perm = attr(n, "perm")
        if perm is None:
            return None if x is None else x[::-1]
        return [x[p] for p in perm] if x is not None and len(x) == len(perm) else [None] * len(perm)
    if op == "Reshape" and len(n.input) > 1:
        target = g.fold(n.input[1])
        if target is None or target.ndim != 1:
            ts = g.shape(n.input[1])
            return [None] * ts[0] if ts and len(ts) == 1 and isinstance(ts[0], int) else None
        out = []
        for i, d in enumerate(target.tolist()):
            if d is None or d == -1:
                out.append(None)
            elif d == 0 and not attr(n, "allowzero", 0):
                out.append(x[i] if x is not None and i < len(x) else None)
            else:
                out.append(int(d))
        if out.count(None) == 1 and -1 in target.tolist() and x is not None \
                and all(isinstance(d, int) for d in x) and all(isinstance(d, int) for d in out if d is not None):
            known = int(np.prod([d for d in out if d is not None]))
            if known and int(np.prod(x)) % known == 0:
                out[out.index(None)] = int(np.prod(x)) // known
        return out
    if op == "MatMul" and len(n.input) == 2:
        y = g.shape(n.input[1])
        if x is None or y is None or len(x) < 2 or len(y) < 2:
            return None
        return _broadcast([x[:-2], y[:-2]]) + [x[-2], y[-1]] if len(x) > 2 or len(y) > 2 else [x[-2], y[-1]]
    if op in ("Unsqueeze", "Squeeze"):
        axes = g.const(n.input[1]) if len(n.input) > 1 and n.input[1] else attr(n, "axes")
        if x is None or axes is None:
            return None
        axes = [int(a) for a in np.ravel(axes)]
        if op == "Squeeze":
            axes = {a % len(x) for a in axes}
            return [d for i, d in enumerate(x) if i not in axes]
        out, rank = list(x), len(x) + len(axes)
        for a in sorted(a % rank for a in axes):
            out.insert(a, 1)
        return out
    if op == "Einsum":
        eq = attr(n, "equation", b"")
        eq = eq.decode() if isinstance(eq, bytes) else eq
        rhs = eq.replace(" ", "").partition("->")[2]
        return [None] * len(rhs) if "->" in eq and "..." not in rhs else None
    return None


def structural_type(g: "Graph", n) -> int:
    """Output 0's element type read from the node (0 when it cannot be told)."""
    op = n.op_type
    if n.domain not in STD_DOMAINS:
        return 0
    if op == "Cast":
        return attr(n, "to", 0)
    if op == "CastLike" and len(n.input) > 1:
        return g.elem_type(n.input[1])
    if op in BOOL_OUT:
        return onnx.TensorProto.BOOL
    if op in INT64_OUT:
        return onnx.TensorProto.INT64
    if op == "Where" and len(n.input) == 3:
        return g.elem_type(n.input[1]) or g.elem_type(n.input[2])
    if op == "Constant":
        v = attr(n, "value")
        return v.data_type if v is not None else 0
    if op == "ConstantOfShape":
        v = attr(n, "value")
        return v.data_type if v is not None else onnx.TensorProto.FLOAT
    if op in TYPE_OF_INPUT0 and n.input and n.input[0]:
        return g.elem_type(n.input[0])
    return 0


def attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


# ---------------------------------------------------------------- shape inference

def light_copy(model: onnx.ModelProto, limit: int = 64) -> onnx.ModelProto:
    """The model without its weights: large initializers become typed graph inputs."""
    src = model.graph
    g = onnx.helper.make_graph(list(src.node), src.name, list(src.input), list(src.output),
                               value_info=list(src.value_info))
    names = {i.name for i in src.input}
    for t in src.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        if n > limit or (t.data_location == onnx.TensorProto.EXTERNAL and not t.raw_data):
            if t.name not in names:
                g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            g.initializer.append(t)
    m = onnx.helper.make_model(g, opset_imports=list(model.opset_import))
    m.ir_version = model.ir_version
    return m


def infer(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """Shape-inferred light copy: onnxruntime's symbolic inference, else onnx's."""
    light = light_copy(model)
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
        import logging
        logging.getLogger("onnxruntime.tools.symbolic_shape_infer").setLevel(logging.ERROR)
        out = SymbolicShapeInference.infer_shapes(light, auto_merge=True, guess_output_rank=True)
        if out is not None:
            return out
    except Exception:  # noqa: BLE001 - fall back to onnx's inference
        pass
    try:
        return onnx.shape_inference.infer_shapes(light, data_prop=True)
    except Exception:  # noqa: BLE001
        return None


# ---------------------------------------------------------------- emitting nodes

class Builder:
    """Emits nodes and constants for one graph; every name is fresh; tracks dtypes."""

    def __init__(self, g: Graph, prefix: str = "attnrewrite"):
        self.g, self.prefix = g, prefix
        self.opset = g.opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.types: dict[str, int] = {}
        self._n = 0
        self._taken = set(g.producer) | set(g.inits) | {i.name for i in g.graph.input}

    def fresh(self, hint: str) -> str:
        while True:
            self._n += 1
            name = f"{self.prefix}/{hint}_{self._n}"
            if name not in self._taken:
                self._taken.add(name)
                return name

    def require_opset(self, version: int) -> None:
        """The default-domain opset the emitted nodes need (`rewrite_model` raises the model's to it)."""
        self.opset = max(self.opset, version)

    def dtype(self, name: str) -> int:
        return self.types.get(name) or self.g.elem_type(name)

    def op(self, op_type: str, *inputs, domain: str = "", dtype: int | None = None, **attrs) -> str:
        """One node with one output; returns the output's name."""
        out = self.fresh(op_type)
        self.nodes.append(helper.make_node(op_type, [i or "" for i in inputs], [out],
                                           name=self.fresh(op_type + "_node"), domain=domain, **attrs))
        if dtype is None:                     # most ops keep their first input's type
            dtype = self.dtype(inputs[1] if op_type == "Where" else inputs[0]) if inputs else 0
        self.types[out] = dtype
        return out

    def const(self, value, dtype: int | None = None) -> str:
        arr = np.asarray(value, dtype=helper.tensor_dtype_to_np_dtype(dtype) if dtype else None)
        name = self.fresh("const")
        self.inits.append(numpy_helper.from_array(arr, name))
        self.types[name] = helper.np_dtype_to_tensor_dtype(arr.dtype)
        return name

    def ints(self, *values) -> str:
        return self.const(np.array(values, dtype=np.int64))

    def scalar_like(self, value: float, like: str) -> str:
        return self.const(np.array(value), self.dtype(like))

    def transpose(self, x: str, perm) -> str:
        return x if perm is None else self.op("Transpose", x, perm=list(perm))

    def reduce(self, op_type: str, x: str, axes, keepdims: int = 1) -> str:
        """A Reduce* node over `axes`, which are an input from opset 18 on (ReduceSum: 13)."""
        if (op_type == "ReduceSum" and self.opset >= 13) or self.opset >= 18:
            return self.op(op_type, x, self.ints(*axes), keepdims=keepdims)
        return self.op(op_type, x, axes=list(axes), keepdims=keepdims)

    def compare(self, op_type: str, x: str, y: str) -> str:
        """A comparison (Less, Equal, …) or logical op: a bool output."""
        return self.op(op_type, x, y, dtype=TensorProto.BOOL)

    def shape_of(self, x: str, start: int, end: int) -> str:
        return self.op("Slice", self.op("Shape", x, dtype=TensorProto.INT64), self.ints(start),
                       self.ints(end), dtype=TensorProto.INT64)

    def cast(self, x: str, to: int) -> str:
        return x if self.dtype(x) == to else self.op("Cast", x, to=to, dtype=to)


# ---------------------------------------------------------------- constant values

FOLD_NODES = 16          # `constant` evaluates at most this many nodes ...
FOLD_ELEMENTS = 1 << 28  # ... into a value of at most this many elements (a 16k × 16k mask)


def constant(b: Builder, name: str | None):
    """The value of `name` as a numpy array when it is an initializer or computed from
    initializers and Constant nodes alone by at most FOLD_NODES standard-domain nodes, into a
    value of a known shape of at most FOLD_ELEMENTS elements (exporters leave e.g. a causal
    mask as Where(Equal(Trilu(ones), 0), …)); else None.
    Evaluated once per builder with onnx's reference evaluator."""
    if not name:
        return None
    cache = b.__dict__.setdefault("_constants", {})
    if name not in cache:
        cache[name] = _fold(b.g, name)
    return cache[name]


def _fold(g: Graph, name: str):
    if name in g.inits:
        t = g.inits[name]
        return None if external_data_helper.uses_external_data(t) else numpy_helper.to_array(t)
    shape = g.shape(name)
    if shape is None or not all(isinstance(d, int) for d in shape) or math.prod(shape) > FOLD_ELEMENTS:
        return None
    nodes, inits, stack = {}, set(), [name]
    while stack:
        x = stack.pop()
        if x in g.inits:
            if external_data_helper.uses_external_data(g.inits[x]):     # (reading it would fill the model's proto)
                return None
            inits.add(x)
            continue
        n = g.producer.get(x)
        if n is None or n.domain not in ("", "ai.onnx") or len(nodes) >= FOLD_NODES or \
                any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
            return None
        if id(n) not in nodes:
            nodes[id(n)] = n
            stack.extend(i for i in n.input if i)
    order = [n for n in g.graph.node if id(n) in nodes]
    out = helper.make_tensor_value_info(name, g.elem_type(name) or TensorProto.FLOAT, None)
    sub = helper.make_model(helper.make_graph(order, "fold", [], [out], [g.inits[i] for i in sorted(inits)]),
                            opset_imports=[o for o in g.model.opset_import if o.domain in ("", "ai.onnx")])
    try:
        return np.asarray(ReferenceEvaluator(sub).run(None, {})[0])
    except Exception:  # noqa: BLE001 - an op the evaluator lacks: not a constant we can read
        return None


# ---------------------------------------------------------------- dead nodes

def subgraph_inputs(node) -> set:
    names = set()
    for a in node.attribute:
        for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for n in sub.node:
                names.update(n.input)
                names |= subgraph_inputs(n)
    return names


def subgraph_made(node) -> set:
    """Names defined inside `node`'s subgraphs (their inputs, initializers and node outputs)."""
    names = set()
    for a in node.attribute:
        for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            names |= {i.name for i in sub.input} | {t.name for t in sub.initializer}
            for n in sub.node:
                names.update(n.output)
                names |= subgraph_made(n)
    return names


def sweep(model: onnx.ModelProto) -> None:
    """Remove nodes and initializers nothing reaches from the graph outputs."""
    g = model.graph
    live = {o.name for o in g.output}
    keep = []
    for n in reversed(g.node):
        if any(o in live for o in n.output if o):
            keep.append(n)
            live.update(i for i in n.input if i)
            live |= subgraph_inputs(n)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [t for t in g.initializer if t.name in live]
    del g.initializer[:]
    g.initializer.extend(inits)
    vi = [v for v in g.value_info if v.name in live]
    del g.value_info[:]
    g.value_info.extend(vi)
