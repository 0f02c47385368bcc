"""Generated Triton kernels against their variants' PyTorch references, in the Triton interpreter.

The cases (tests/_kernels_interp.py) cover every template: exact forward and backward over
head_dim 16/64/80/128, causal or not (bottom-right, Lq < Lk and Lq > Lk), every mask kind (none,
key padding as bool and as bias, full additive, full boolean with a row that sees no key),
GQA/MQA, a batch-broadcast K/V, Dv != D, soft-cap, fp32 and fp16, lengths that are not multiples of
the 16-row tiles; window + sinks, top-k (PyTorch selection, gathered keys), block-sparse lists
(partial and full blocks) and both preconditioned modes forward; and the registered op with
autograd. Tolerances: max abs error
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


@pytest.fixture(scope="module")
def results():
    env = {**os.environ, "TRITON_INTERPRET": "1", "ATTNREWRITE_KERNELS": "interpret"}
    run = subprocess.run([sys.executable, str(Path(__file__).parent / "_kernels_interp.py")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(results, name):
    r = results[name]
    assert "error" not in r, r.get("error")
    errs = {k: v for k, v in r["errors"].items() if k != "full_blocks"}
    assert all(e <= r["tolerance"] for e in errs.values()), (errs, r["tolerance"])
    if "full_blocks" in r["errors"]:
        assert r["errors"]["full_blocks"] > 0          # the full-block path really ran


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
            kernels.forward("exact_attention", (q, q, q, None, 0.25, 0.0, False, 0.0))
    finally:
        if old is None:
            del os.environ["ATTNREWRITE_KERNELS"]
        else:
            os.environ["ATTNREWRITE_KERNELS"] = old


def test_cpu_without_interpret_keeps_the_reference():
    q = torch.randn(1, 1, 4, 16)
    if kernels.interpreting():
        pytest.skip("ATTNREWRITE_KERNELS=interpret is set for this process")
    assert kernels.forward("exact_attention", (q, q, q, None, 0.25, 0.0, False, 0.0)) is None


@pytest.mark.parametrize("op, params, dtype, dropout, reason", [
    ("sparse_attention", ("block", 8, 4, 0, "auto", 64, 0.25, 1.0), torch.float16, 0.0, "block selection"),
    ("sparse_attention", ("topk", 8, 4, 0, "auto", 64, 0.25, 1.0, "pooled", []), torch.float16, 0.0, "pooled"),
    ("conv_basis_attention", (16, None, 0.0), torch.float16, 0.0, "FFT"),
    ("exact_attention", (), torch.float16, 0.1, "dropout"),
    ("exact_attention", (), torch.float64, 0.0, "float64"),
])
def test_uncovered_calls_say_why(op, params, dtype, dropout, reason):
    q = torch.randn(1, 2, 4, 16, dtype=dtype)
    cfg, why = kernels.select(op, q, q, q, None, 0.25, 0.0, False, dropout, params, "cuda")
    assert cfg is None and reason in why


def test_configuration_hash_names_the_source():
    base = dict(template="exact", head_dim=64, head_dim_v=64, dtype="float16")
    a, b = kernels.KernelConfig(**base), kernels.KernelConfig(**base, causal=True)
    assert a.hash != b.hash and a.name.startswith("exact_")
    src = kernels.specialise(b)
    assert "CAUSAL = tl.constexpr(True)" in src and b.name in src and "def attn_fwd" in src
    compile(src, b.name, "exec")                      # the generated module is valid Python


@pytest.mark.parametrize("variant, options, template", [("exact", {}, "exact"),
                                                        ("sparse", {"mode": "window", "window": 4}, "window"),
                                                        ("conv-basis", {}, None)])
def test_report_names_each_sites_kernel(variant, options, template, tmp_path):
    """Each rewritten site says which kernel it runs with (here: the CUDA choice, nothing ran on
    this CPU process) or null and why; --emit-kernels' writer puts that exact source on disk."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    r = attnrewrite.rewrite(TinyAttention().eval(), variant, (x,), check=False, **options)
    site = r.report["sites"][0]
    if template is None:
        assert site["kernel"] is None and "FFT" in site["kernel_reason"]
        return
    k = site["kernel"]
    assert k["template"] == template and k["target"] == "cuda" and k["calls"] == 0
    assert k["name"] == f"{template}_{k['hash']}" and k["config"]["head_dim"] == 8
    written = kernels.emit(tmp_path, r.report["sites"])
    source = (tmp_path / f"{k['name']}.py").read_text()
    assert source == kernels.specialise(kernels.KernelConfig.from_dict(k["config"]))
    assert json.loads((tmp_path / "index.json").read_text()) == {site["name"]: k["name"]}
    assert len(written) == 2


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
