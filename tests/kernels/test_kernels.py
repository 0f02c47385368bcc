"""Generated Triton kernels against their variants' PyTorch references, in the Triton interpreter.

The cases (tests/_kernels_interp.py) cover every template: exact forward and backward over
head_dim 16/64/80/128, causal or not (bottom-right, Lq < Lk and Lq > Lk), every mask kind (none,
key padding as bool and as bias, full additive, full boolean with a row that sees no key),
GQA/MQA, a batch-broadcast K/V, Dv != D, soft-cap, fp32 and fp16, lengths that are not multiples of
the 16-row tiles; window + sinks, top-k (PyTorch selection, gathered keys) and both
preconditioned modes forward; block-sparse lists (partial and full blocks) forward and backward
against the autograd of exact attention under the mask the kept blocks make; sparse mode=block
(exact and pooled selection, per-head budgets) through its op forward and backward against the
variant's reference; conv-basis's kernels (start columns of both triangles against the
variant's, normalisation + exact rows on logits spread so that some rows fail the reliability
test — the same rows recomputed — and the op at k = n, where it is exact attention, and at small
k, fp32/fp16, d 16/64, causal or not, key padding, GQA); and the registered op with autograd.
Tolerances: max abs error
1e-4 (fp32) and 2e-2 (fp16, whose output is rounded to ~1e-3), ×4 for preconditioned (its
per-head gains scale the output up to 3.5×).

The interpreter needs TRITON_INTERPRET=1 before triton is imported, so the cases run once, in a
subprocess, and each test reads its case's result.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _kernels_interp import CASES
from _models import TinyAttention, save_tiny

import attnrewrite
from attnrewrite import kernels
from attnrewrite.cli import main
from attnrewrite.variants import conv_basis, exact
from attnrewrite.variants.base import KERNEL_PLANS


@pytest.fixture(scope="module")
def results():
    env = {**os.environ, "TRITON_INTERPRET": "1", "ATTNREWRITE_KERNELS": "interpret"}
    run = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "_kernels_interp.py")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


COUNTS = ("full_blocks", "dropped_blocks")


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(results, name):
    r = results[name]
    assert "error" not in r, r.get("error")
    errs = {k: v for k, v in r["errors"].items() if k not in COUNTS}
    assert all(e <= r["tolerance"] for e in errs.values()), (errs, r["tolerance"])
    for key in COUNTS:          # the full-block path really ran; the layout really drops blocks
        assert r["errors"].get(key, 1) > 0, (key, r["errors"])


def test_interpret_needs_triton_interpret_at_import():
    """Asking for the interpreter in a process whose triton was set up for GPUs is an error, not a
    silent fall-back to the reference."""
    if kernels.dispatch.INTERPRETER_ON_AT_IMPORT:
        pytest.skip("this process already runs the interpreter")
    q = torch.randn(1, 1, 4, 16)
    old = os.environ.get("ATTNREWRITE_KERNELS")
    os.environ["ATTNREWRITE_KERNELS"] = "interpret"
    try:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            kernels.forward(exact.VARIANT.kernel, (q, q, q, None, 0.25, 0.0, False, 0.0))
    finally:
        if old is None:
            del os.environ["ATTNREWRITE_KERNELS"]
        else:
            os.environ["ATTNREWRITE_KERNELS"] = old


def test_cpu_without_interpret_keeps_the_reference():
    q = torch.randn(1, 1, 4, 16)
    if kernels.interpreting():
        pytest.skip("ATTNREWRITE_KERNELS=interpret is set for this process")
    assert kernels.forward(exact.VARIANT.kernel, (q, q, q, None, 0.25, 0.0, False, 0.0)) is None


@pytest.mark.parametrize("op, params, dtype, dropout, reason", [
    ("sparse_attention", ("block", 8, 4, 0, "auto", 24, 0.25, 1.0), torch.float16, 0.0, "multiple of 16"),
    ("sparse_attention", ("topk", 8, 4, 0, "auto", 64, 0.25, 1.0, "pooled", []), torch.float16, 0.0, "pooled"),
    ("conv_basis_attention", (16, None, 0.0), torch.float16, 0.1, "dropout"),
    ("conv_basis_attention", (16, None, 0.0), torch.float64, 0.0, "float64"),
    ("exact_attention", (), torch.float16, 0.1, "dropout"),
    ("exact_attention", (), torch.float64, 0.0, "float64"),
])
def test_uncovered_calls_say_why(op, params, dtype, dropout, reason):
    q = torch.randn(1, 2, 4, 16, dtype=dtype)
    plan = KERNEL_PLANS[op]
    cfg, why = kernels.select(plan, q, q, q, None, 0.25, 0.0, False, dropout, params, "cuda")
    assert cfg is None and reason in why


def test_configuration_hash_names_the_source():
    base = dict(template="exact", head_dim=64, head_dim_v=64, dtype="float16")
    a, b = kernels.KernelConfig(**base), kernels.KernelConfig(**base, causal=True)
    assert a.hash != b.hash and a.name.startswith("exact_")
    src = kernels.specialise(b)
    assert "CAUSAL=True" in src and b.name in src and "def attn_fwd" in src
    compile(src, b.name, "exec")                      # the written module is valid Python


def test_sparse_block_sites_report_the_block_sparse_kernels():
    """mode=block runs the block-sparse template, its backward included, on blocks that are a
    multiple of 16; other block sizes keep the reference and say why."""
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    r = attnrewrite.rewrite(TinyAttention().eval(), "sparse", (x,), check=False, mode="block", block=32)
    site = r.report["sites"][0]
    assert site["kernel"]["template"] == "block_sparse" and site["kernel"]["backward"] == "kernel"
    assert site["kernel_reason"] == "" and site["kernel"]["config"]["params"] == {"SPARSE_M": 32, "SPARSE_N": 32}
    r = attnrewrite.rewrite(TinyAttention().eval(), "sparse", (x,), check=False, mode="block", block=8)
    site = r.report["sites"][0]
    assert site["kernel"] is None and "multiple of 16" in site["kernel_reason"]


@pytest.mark.parametrize("variant, options, template", [("exact", {}, "exact"),
                                                        ("sparse", {"mode": "window", "window": 4}, "window"),
                                                        ("conv-basis", {}, "conv_basis")])
def test_report_names_each_sites_kernel(variant, options, template, tmp_path):
    """Each rewritten site says which kernel it runs with (here: the CUDA choice, nothing ran on
    this CPU process) or null and why; --emit-kernels' writer puts that exact source on disk."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    r = attnrewrite.rewrite(TinyAttention().eval(), variant, (x,), check=False, **options)
    site = r.report["sites"][0]
    k = site["kernel"]
    if template == "conv_basis":                       # forward only; the report says the FFTs stay in PyTorch
        assert k["backward"] == "reference" and "FFT" in site["kernel_reason"]
    assert k["template"] == template and k["target"] == "cuda" and k["calls"] == 0
    assert k["name"] == f"{template}_{k['hash']}" and k["config"]["head_dim"] == 8
    written = kernels.emit(tmp_path, r.report["sites"])
    source = (tmp_path / f"{k['name']}.py").read_text()
    assert source == kernels.specialise(kernels.KernelConfig.from_dict(k["config"]))
    assert json.loads((tmp_path / "index.json").read_text()) == {site["name"]: k["name"]}
    assert len(written) == 2


def _conv_call(n=6, lk=None, dtype=torch.float16, mask=None, causal=False, dropout=0.0, precision="auto"):
    q = torch.randn(2, 4, n, 16, dtype=dtype)
    k = torch.randn(2, 2, lk or n, 16, dtype=dtype)
    return kernels.select(conv_basis.VARIANT.kernel, q, k, k, mask, 0.25, 0.0, causal, dropout,
                          (4, None, 0.0, "norm", 1e-9, 1, precision), "cuda")


def test_conv_basis_kernels_cover_what_its_construction_covers():
    """The conv-basis kernels are specialised on the variant's own reading of the call: a full mask
    that is causal + key padding runs them as causal with a key bias; the working precision follows
    the reference (float64 up to DENSE_MAX_N under auto); what the construction does not cover keeps
    the reference, with the reason."""
    pad = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    pad[..., -2:] = False
    cfg, why = _conv_call(mask=pad & torch.ones(6, 6, dtype=torch.bool).tril())
    assert why == "" and cfg.template == "conv_basis" and cfg.causal and cfg.mask == "key" and cfg.group == 2
    assert dict(cfg.params) == {"WORK_F64": True}
    cfg, _ = _conv_call(causal=True, precision="float32")
    assert cfg.causal and cfg.mask == "none" and dict(cfg.params) == {"WORK_F64": False}
    cfg, _ = _conv_call(n=600, dtype=torch.float32)
    assert dict(cfg.params) == {"WORK_F64": False}           # auto: float32 on the FFT path
    for call, reason in [(dict(mask=torch.rand(2, 1, 6, 6) > 0.5), "causal + per-key"),
                         (dict(lk=9), "q_len == kv_len"), (dict(dropout=0.1), "dropout"),
                         (dict(dtype=torch.float64), "float64")]:
        cfg, why = _conv_call(**call)
        assert cfg is None and reason in why


def test_cli_emits_the_kernels_each_site_runs(tmp_path, capsys):
    model = save_tiny(tmp_path, 5)
    code = main([str(model), "--variant", "exact", "--no-check", "-o", str(tmp_path / "out.pt2"),
                 "--emit-kernels", str(tmp_path / "k"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    name = report["sites"][0]["kernel"]["name"]
    assert (tmp_path / "k" / f"{name}.py").read_text().startswith(f'"""{name}: generated by attnrewrite.kernels')
    code = main([str(model), "--variant", "exact", "--target", "sm_80"])
    assert code == 2 and "--target needs --emit-kernels" in capsys.readouterr().err


def test_report_counts_the_kernel_calls_of_its_own_rewrite():
    """A report's kernel `calls` are the calls made inside its rewrite's `kernels.counting()`
    (the pipeline counts its check), not every call this process has made."""
    q = torch.randn(1, 2, 4, 16, dtype=torch.float16)
    plan, args = exact.VARIANT.kernel, (q, q, q, None, 0.25, 0.0, False, 0.0, ())
    cfg, _ = kernels.select(plan, *args, "cuda")
    kernels.dispatch._count(cfg)                              # an earlier rewrite's call
    with kernels.counting() as mine:
        kernels.dispatch._count(cfg)
        kernels.dispatch._count(cfg)
    with kernels.counting() as other:
        pass
    assert kernels.describe(plan, *args, calls=mine)["kernel"]["calls"] == 2
    assert kernels.describe(plan, *args, calls=other)["kernel"]["calls"] == 0
    assert kernels.describe(plan, *args)["kernel"]["calls"] == kernels.dispatch.CALLS[cfg] >= 3
