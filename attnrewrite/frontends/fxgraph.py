"""What the two FX front ends (export, dynamo) share: detect, capture and rewrite over a GraphModule."""
from __future__ import annotations

import torch
import torch.utils._pytree as pytree
from torch.fx import GraphModule

from ..passes import fx_detect
from ..passes.fx_rewrite import probe_graph, rewrite_graph
from ..passes.vocab import probs_read_elsewhere
from ..site import AttentionSite, NormalForm
from .base import FrontEnd


class _Collect(torch.fx.Interpreter):
    """Runs a graph and keeps the values of the `wanted` nodes."""

    def __init__(self, gm, wanted):
        super().__init__(gm)
        self.wanted, self.got = set(wanted), {}

    def run_node(self, n):
        r = super().run_node(n)
        if n in self.wanted:
            self.got[n] = r
        return r


def named_float_outputs(out) -> list[tuple[str, torch.Tensor]]:
    leaves, _ = pytree.tree_flatten_with_path(out)
    return [(pytree.keystr(path) or "output", t) for path, t in leaves
            if isinstance(t, torch.Tensor) and t.is_floating_point()]


class FxFrontEnd(FrontEnd):
    """A front end whose program wraps one FX GraphModule (`self.graph_module`)."""

    graph_module: GraphModule
    params: set = frozenset()          # placeholder names holding weights
    constants: dict = {}               # placeholder name -> scalar tensor value

    def find_sites(self):
        return fx_detect.find_sites(self.graph_module.graph, self.params, self.constants)

    def flat_inputs(self, input_set) -> list:
        """The graph's placeholder values for one input set."""
        raise NotImplementedError

    def keep_reason(self, site: AttentionSite) -> str | None:
        if site.graph.others:          # e.g. need_weights=True: the dense probabilities are returned
            return probs_read_elsewhere(str(o.target) for o in site.graph.others)
        return None

    def scalars(self, site: AttentionSite) -> dict:
        form = NormalForm.of(site)
        return {"scale": form.scale, "softcap": form.softcap, "causal": form.causal, "dropout_p": form.dropout_p}

    def capture(self, sites, inputs):
        if not sites:
            return {}
        gm, probes = probe_graph(self.graph_module, sites)
        wanted = [n for p in probes.values() for n in p.values() if n is not None]
        got: dict[int, list] = {i: [] for i in probes}
        for input_set in inputs:
            run = _Collect(gm, wanted)
            with torch.no_grad():
                run.run(*self.flat_inputs(input_set), enable_io_processing=False)
            for sid, nodes in probes.items():
                got[sid].append({k: run.got.get(n) if n is not None else None for k, n in nodes.items()})
        return got

    def rewrite_graph_module(self, sites, variant, choice) -> GraphModule:
        return rewrite_graph(self.graph_module, sites, variant, choice)
