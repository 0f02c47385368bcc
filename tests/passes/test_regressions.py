"""Cases that once broke the rewrite: a site reading another site's output, plain GQA inputs."""
import pytest
import torch
import torch.nn.functional as F

import attnrewrite


class Attn(torch.nn.Module):
    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(-1) @ v


class Chained(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attn()

    def forward(self, q, k, v):
        return self.attn(self.attn(q, k, v), k, v)


class PlainGQA(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


@pytest.mark.parametrize("core", [False, True])
def test_site_reading_another_sites_output(core):
    torch.manual_seed(0)
    args = (torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8))
    ep = torch.export.export(Chained().eval(), args)
    ep = ep.run_decompositions() if core else ep
    r = attnrewrite.rewrite(ep, "exact")
    assert [s.status for s in r.sites] == ["rewritten", "rewritten"]
    assert r.report["check"]["rel_err"] <= 1e-5
    torch.testing.assert_close(r.program.module()(*args), Chained()(*args), rtol=1e-5, atol=1e-6)


def test_sdpa_enable_gqa_with_fewer_kv_heads():
    torch.manual_seed(0)
    args = (torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8))
    ep = torch.export.export(PlainGQA().eval(), args)
    r = attnrewrite.rewrite(ep, "exact")
    assert [(s.heads, s.kv_heads) for s in r.sites] == [(4, 2)]
    assert r.report["check"]["rel_err"] <= 1e-5
    op = [n for n in r.program.graph.nodes if n.target == torch.ops.attnrewrite.exact_attention.default]
    assert op[0].args[1].meta["val"].shape[1] == 2        # k passed un-repeated


def test_detect_without_inputs_uses_example_inputs():
    ep = torch.export.export(Attn().eval(), (torch.randn(1, 2, 5, 4),) * 3)
    sites = attnrewrite.detect(ep)
    assert [(s.heads, s.q_len, s.head_dim, s.scale) for s in sites] == [(2, 5, 4, 0.5)]
