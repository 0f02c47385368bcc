"""Whole models, not ops: attnrewrite through torch.compile against Inductor, in one process.

    .venv/bin/python benchmarks/bench_models.py [--models gpt2,llama,bert] [--lengths 1024,4096,8192]
        [--configs eager,inductor,exact,window,block,conv-basis,pt2,aoti] [--rounds 3] [--threads 2]

Models from transformers configs with random weights (hidden 256, 4 heads, 2 layers, vocab 1000,
eval, batch 1, no_grad): a GPT-2-style and a Llama-style causal LM (SDPA attention) and a
BERT-style encoder. Columns, each a time ratio t(Inductor) / t(config) (> 1: faster than
`torch.compile(model)`):
  eager        the model as it is
  inductor     torch.compile(model): the baseline (its absolute time is printed)
  exact        torch.compile(model, backend=attnrewrite.compile_backend("exact"))
  window       … sparse mode=window, window 256 (+ 4 sinks)
  block        … sparse mode=block, density 0.1, select=pooled
  conv-basis   … conv-basis k = 16
  pt2          the CLI's rewritten exact program (rewrite → torch.export.save → load), `.module()` eagerly
  aoti         that program, its ops lowered by attnrewrite.lower, through
               torch._inductor.aoti_compile_and_package, run by aoti_load_package
  pt2-original, aoti-original   the same for the exported program before the rewrite (what the
               rewritten program replaces: torch.export materialises the model's causal mask)
Each approximate config also gets its quality against the original logits (or hidden states):
top-1 agreement of the argmax over the vocabulary and the mean KL(original ‖ rewritten) in nats.
Time: medians over --rounds interleaved rounds (each config once per round) after one warm-up
call, so a slow spell on a shared machine hits every config alike.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import attnrewrite  # noqa: E402

VARIANTS = {"exact": ("exact", {}), "window": ("sparse", {"mode": "window", "window": 256}),
            "block": ("sparse", {"mode": "block", "density": 0.1, "select": "pooled"}),
            "conv-basis": ("conv-basis", {"k": 16})}


def build(name: str, length: int):
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    common = dict(vocab_size=1000)
    if name == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=256, n_head=4, n_layer=2, n_positions=length, **common))
    elif name == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=4,
                                             intermediate_size=688, num_hidden_layers=2,
                                             max_position_embeddings=length, **common))
    elif name == "bert":
        model = BertModel(BertConfig(hidden_size=256, num_attention_heads=4, intermediate_size=1024,
                                     num_hidden_layers=2, max_position_embeddings=length, **common))
    else:
        raise SystemExit(f"unknown model {name}")
    model.config._attn_implementation = "sdpa"
    return model.eval(), torch.randint(0, 1000, (1, length))


def first(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state if hasattr(out, "last_hidden_state") else \
        out[0] if isinstance(out, (tuple, list)) else out


def quality(ref: torch.Tensor, got: torch.Tensor) -> dict:
    ref, got = ref.float().flatten(0, -2), got.float().flatten(0, -2)
    top1 = float((ref.argmax(-1) == got.argmax(-1)).float().mean())
    kl = float(torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                          reduction="batchmean"))
    return {"top1": round(top1, 4), "kl": round(kl, 5)}


class Wrapped(torch.nn.Module):
    """The model's first output from input ids alone (what torch.export needs)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return first(self.model(ids))


def make(config: str, model, ids, tmp: Path):
    if config == "eager":
        return lambda: model(ids)
    if config == "inductor":
        f = torch.compile(model)
        return lambda: f(ids)
    if config in VARIANTS:
        variant, options = VARIANTS[config]
        f = torch.compile(model, backend=attnrewrite.compile_backend(variant, **options))
        return lambda: f(ids)
    wrapped = Wrapped(model).eval()
    program = torch.export.export(wrapped, (ids,), strict=False)
    original = config.endswith("-original")
    if not original:
        program = attnrewrite.rewrite(program, "exact", example_inputs=(ids,), check=False).program
    path = tmp / f"{config}.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path)
    if config.startswith("pt2"):
        m = loaded.module()
        return lambda: m(ids)
    if config.startswith("aoti"):              # (the rewritten ops lowered to ATen first: attnrewrite.lower)
        pkg = torch._inductor.aoti_compile_and_package(loaded if original else attnrewrite.lower(loaded),
                                                       package_path=str(tmp / f"{config}.aoti.pt2"))
        runner = torch._inductor.aoti_load_package(pkg)
        return lambda: runner(ids)
    raise SystemExit(f"unknown config {config}")


def bench(name: str, length: int, configs: list[str], rounds: int) -> dict:
    model, ids = build(name, length)
    row = {"model": name, "L": length, "ratio": {}, "quality": {}, "compile_s": {}}
    calls, ref = {}, None
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        ref = first(model(ids))
        for c in configs:
            t = time.perf_counter()
            try:
                calls[c] = make(c, model, ids, Path(tmp))
                out = first(calls[c]())                        # warm-up (compiles)
            except Exception as e:                             # noqa: BLE001 - a config that fails is reported
                row["ratio"][c] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
                calls.pop(c, None)
                continue
            row["compile_s"][c] = round(time.perf_counter() - t, 1)
            if c in VARIANTS and c != "exact":
                row["quality"][c] = quality(ref, out)
            elif c in ("exact", "pt2", "aoti", "pt2-original", "aoti-original"):
                row["quality"][c] = {"max_abs_err": float((out.float() - ref.float()).abs().max())}
        times = {c: [] for c in calls}
        for _ in range(rounds):
            for c, f in calls.items():
                t = time.perf_counter()
                f()
                times[c].append(time.perf_counter() - t)
    med = {c: statistics.median(ts) for c, ts in times.items()}
    base = med.get("inductor")
    row["inductor_s"] = round(base, 4) if base else None
    for c, m in med.items():
        row["ratio"][c] = round(base / m, 3) if base else round(m, 4)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="gpt2,llama,bert")
    ap.add_argument("--lengths", default="1024,4096,8192")
    ap.add_argument("--configs", default="eager,inductor,exact,window,block,conv-basis,pt2,aoti")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # every config compiles the same forward code with its own backend: keep them all compiled
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096
    warnings.filterwarnings("ignore")
    configs = args.configs.split(",")
    rows = []
    print("| model | L | Inductor s | " + " | ".join(configs) + " | quality |")
    print("|---|---|---|" + "---|" * len(configs) + "---|")
    for name in args.models.split(","):
        for length in map(int, args.lengths.split(",")):
            row = bench(name, length, configs, args.rounds)
            rows.append(row)
            cells = [f"{row['ratio'][c]}×" if isinstance(row["ratio"].get(c), float) else str(row["ratio"].get(c, "-"))
                     for c in configs]
            q = "; ".join(f"{c} top1 {v['top1']}, KL {v['kl']}" for c, v in row["quality"].items() if "top1" in v)
            print(f"| {name} | {length} | {row['inductor_s']} | " + " | ".join(cells) + f" | {q} |", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
