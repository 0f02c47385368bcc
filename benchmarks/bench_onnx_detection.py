"""Attention sites found in the same ONNX files by attnrewrite, ORT's transformer optimizer
and onnxscript's ORT fusions.

For each transformers family of tests/test_hf_models.py (2 layers, hidden 64, 4 heads,
attn_implementation="sdpa"), exported with torch.onnx.export dynamo=True (opset 20) and
dynamo=False (TorchScript exporter, opset 17), count:

* attnrewrite — sites detected, and how many of them the `exact` rewrite reproduces to
  rel_err ≤ 1e-5 per site and end to end in onnxruntime ("found / verified");
* ORT optimizer — `onnxruntime.transformers.optimizer.optimize_model(path, model_type,
  num_heads=4, hidden_size=64, opt_level=0)`, then the number of Attention /
  MultiHeadAttention / GroupQueryAttention nodes in the result;
* onnxscript — `onnxscript.rewriter.ort_fusions.optimize_for_ort`, same node count.

    .venv/bin/python benchmarks/bench_onnx_detection.py [--families bert,gpt2] [--markdown]
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import time
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / d) for d in ("", "models", "passes")]  # test_hf_models, test_onnx_models
sys.path.insert(0, str(ROOT))

FUSED = ("Attention", "MultiHeadAttention", "GroupQueryAttention")
# ORT's optimizer has no model_type for every family: the closest one is used.
ORT_TYPE = {"bert": "bert", "roberta": "bert", "distilbert": "bert", "vit": "vit", "gpt2": "gpt2",
            "gpt_neox": "gpt_neox", "opt": "gpt2", "falcon": "gpt2", "llama": "gpt2", "mistral": "gpt2",
            "qwen2": "gpt2", "phi": "phi", "gemma": "gpt2", "t5": "t5", "bart": "bart", "whisper": "bart"}


def count_fused(model) -> int:
    return sum(n.op_type in FUSED for n in model.graph.node)


def by_attnrewrite(path: str, feeds) -> str:
    import attnrewrite
    try:
        r = attnrewrite.rewrite(path, "exact", example_inputs=feeds)
    except Exception as e:  # noqa: BLE001
        return f"error: {type(e).__name__}"
    ok = sum(s.status == "rewritten" and s.check and s.check["rel_err"] <= 1e-5 for s in r.sites)
    ok = ok if r.report["check"]["rel_err"] <= 1e-5 else 0
    return f"{len(r.sites)} / {ok}"


def by_ort(path: str, family: str) -> str:
    from onnxruntime.transformers.optimizer import optimize_model
    try:
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            m = optimize_model(path, model_type=ORT_TYPE[family], num_heads=4, hidden_size=64, opt_level=0)
        return str(count_fused(m.model))
    except Exception as e:  # noqa: BLE001
        return f"error: {type(e).__name__}"


def by_onnxscript(path: str) -> str:
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort
    try:
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            model = ir.load(path)
            out = optimize_for_ort(model)
            model = out[0] if isinstance(out, tuple) else model
            proto = ir.serde.serialize_model(model)
        return str(count_fused(proto))
    except Exception as e:  # noqa: BLE001
        return f"error: {type(e).__name__}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", help="comma-separated (default: all of test_onnx_models)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import test_hf_models as HF
    import test_onnx_models as M

    fams = args.families.split(",") if args.families else M.ONNX_FAMILIES
    rows = []
    t0 = time.perf_counter()
    for fam in fams:
        expected = len(HF.FAMILIES[fam][5])
        for exporter in M.EXPORTERS:
            if (fam, exporter) in M.NOT_EXPORTABLE:
                rows.append((fam, exporter, expected, "export fails", "-", "-"))
                continue
            with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
                path, feeds = M.family_export(fam, exporter)
            rows.append((fam, exporter, expected, by_attnrewrite(str(path), feeds), by_ort(str(path), fam),
                         by_onnxscript(str(path))))
            print(*rows[-1], sep=" | ", file=sys.stderr)
    head = ("family", "exporter", "attention calls", "attnrewrite found / verified", "ORT optimizer",
            "onnxscript optimize_for_ort")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    print("\n".join(lines))
    print(f"\n({time.perf_counter() - t0:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
