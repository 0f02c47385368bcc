"""The one pipeline: detection once per rewrite, auto-tuning on every front end, an acyclic import graph."""
from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest
import torch

import attnrewrite
from attnrewrite import pipeline
from attnrewrite.passes import fx_detect, onnx_detect
from _models import TinyAttention

PACKAGE = Path(attnrewrite.__file__).parent


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TinyAttention().eval(), (torch.randn(2, 8, 16),), str(path), input_names=["x"],
                          dynamo=False, opset_version=17)
    return path


def tiny_program():
    torch.manual_seed(0)
    return torch.export.export(TinyAttention().eval(), (torch.randn(2, 8, 16),))


def counting(monkeypatch, module):
    calls = []
    real = module.find_sites

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(module, "find_sites", spy)
    return calls


@pytest.mark.parametrize("front", ["export", "onnx", "dynamo"])
def test_detection_runs_once_per_rewrite_even_when_auto_tuning(front, monkeypatch, tiny_onnx):
    calls = counting(monkeypatch, onnx_detect if front == "onnx" else fx_detect)
    opts = {"mode": "topk", "auto": True}
    if front == "dynamo":
        torch._dynamo.reset()
        be = attnrewrite.compile_backend("sparse", inner="eager", tolerance=1e-6, **opts)
        torch.compile(TinyAttention(), backend=be)(torch.randn(2, 8, 16))
        assert be.sites_rewritten == 1
    else:
        r = attnrewrite.rewrite(str(tiny_onnx) if front == "onnx" else tiny_program(), "sparse", tolerance=1e-6,
                                **opts)
        assert [s.status for s in r.sites] == ["rewritten"]
    assert len(calls) == 1


@pytest.mark.parametrize("front", ["export", "onnx", "dynamo"])
def test_auto_tune_on_every_front_end(front, tiny_onnx):
    """A tight tolerance forces k = n (exact); a loose one lets the site keep fewer keys."""
    chosen = {}
    for tol in (1e-6, 0.95):
        if front == "dynamo":
            torch._dynamo.reset()
            be = attnrewrite.compile_backend("sparse", inner="eager", tolerance=tol, check=True, mode="topk",
                                             auto=True)
            torch.manual_seed(0)
            torch.compile(TinyAttention(), backend=be)(torch.randn(2, 8, 16))
            rep = be.reports[0]
        else:
            obj = str(tiny_onnx) if front == "onnx" else tiny_program()
            rep = attnrewrite.rewrite(obj, "sparse", tolerance=tol, mode="topk", auto=True).report
        assert rep["check"]["passed"] is True and rep["check"]["rel_err"] <= tol
        chosen[tol] = rep["sites"][0]["options"]["k"]
    assert chosen[1e-6] >= 8 > chosen[0.95]


def test_statuses_come_from_the_pipeline(tiny_onnx):
    r = attnrewrite.rewrite(str(tiny_onnx), "exact", sites="5")          # no site 5: nothing selected
    assert [s.status for s in r.sites] == ["unselected"]
    r = attnrewrite.rewrite(tiny_program(), "conv_basis", check=False, sites="0", k=2)
    assert [s.status for s in r.sites] == ["rewritten"] and r.sites[0].options["k"] == 2


def test_no_attention_is_an_input_error_except_in_the_backend():
    with pytest.raises(pipeline.InputError, match="no attention found"):
        attnrewrite.rewrite(torch.nn.Linear(4, 4), "exact", example_inputs=(torch.randn(2, 4),))
    torch._dynamo.reset()
    be = attnrewrite.compile_backend("exact", inner="eager")
    m = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    assert torch.equal(torch.compile(m, backend=be)(x), m(x)) and be.reports[0]["sites"] == []


# ---------------------------------------------------------------- the import graph

def _imports(path: Path):
    """(module-level internal imports, internal imports inside functions) of one package file."""
    name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top, nested = set(), []
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            targets = [f"{base}.{node.module}" if node.module else base]
            if not node.module:
                targets = [f"{base}.{a.name}" for a in node.names]
        else:
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
        targets = [t for t in targets if t.split(".")[0] == "attnrewrite"]
        if node.col_offset == 0:
            top.update(targets)
        elif targets:
            nested.append((node.lineno, targets))
    return name, top, nested


def test_import_graph_is_acyclic_and_no_internal_import_hides_in_a_function():
    graph, hidden = {}, []
    for path in PACKAGE.rglob("*.py"):
        name, top, nested = _imports(path)
        graph[name] = top
        if path.name != "cli.py":       # the command imports what it needs after parsing (--help without torch)
            hidden += [f"{path.name}:{line}" for line, _ in nested]
    assert not hidden, hidden
    modules = set(graph)

    def resolve(t):                                     # `from .x import y` may name a module or a symbol
        return t if t in modules else t.rpartition(".")[0]

    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for t in {resolve(t) for t in graph.get(m, ())} - {m}:
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [m, t]))
            if t in modules and t not in state:
                visit(t, stack + [m])
        state[m] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m, [])
