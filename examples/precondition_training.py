"""Does a diagonal preconditioner per head make attention better conditioned and training faster?

    .venv/bin/python examples/precondition_training.py            # full run (~10 min on 2 busy cores)
    .venv/bin/python examples/precondition_training.py --quick    # smoke run: a few steps, 1 seed, no files
    .venv/bin/python examples/precondition_training.py --quick --out /tmp/pt   # smoke run that writes /tmp/pt.csv/.png
    .venv/bin/python examples/precondition_training.py --replot examples/precondition_training.csv   # redraw only

Two small models are trained from scratch, with the same seeds, batches and steps, in four
settings, every one through the compile backend with `inner="eager"`:

  baseline                  `exact`: the model's own attention, rewritten into the exact op.
                            It computes what SDPA computes (round-off; checked at every κ
                            checkpoint below), and puts the same custom-op machinery (lowering,
                            op forward/backward references) in the path as the other settings,
                            so differences in loss come from the variant alone. (Seconds per
                            run are logged but are not a cost comparison on a shared machine.)
  output-norm               `preconditioned mode=output-norm`   (Cᵢᵢ = g/‖(AV)ᵢ‖, detached)
  row-equilibrate           `preconditioned mode=row-equilibrate` (Cᵢᵢ = g/‖Aᵢ‖₂)
  sparse                    `sparse mode=topk k=8` (ViT: 17 keys) or `sparse mode=window
                            window=16` (LM: 64 keys, plus the default 4 sink keys)

Task A (`vit`): a ViT on scikit-learn's 8×8 digits (2×2 patches → 16 tokens + a class token,
d 64, 2 layers, 4 heads, pre-LN); a fixed 1437/360 train/test split; test accuracy.
Task B (`lm`): `examples/char_gpt.py`'s CharGPT, 2 layers, d 64, 4 heads, context 64, on the
standard library's sources (its `splits`/`windows`); held-out bits/char on 128 windows.

The preconditioned variant calibrates a gain g per head when it rewrites a graph, so that the
mean output-row norm on Dynamo's example inputs is unchanged. Trained from scratch, those
inputs are the first training batch and the weights are the random initialisation: the gains
describe the untrained model's near-uniform attention and then stay fixed (a constant in the
graph, not a parameter). A recompile (e.g. a new batch shape or a call under `torch.no_grad()`:
both do recompile) would rewrite again and calibrate new gains from the current weights, i.e. change the
function mid-training. So this script compiles once, calls the compiled model first on the
first training batch (which is what calibrates), evaluates through that same compiled model
with the training batch shape and grad mode, and fails if the backend ever saw a second graph.

Conditioning: at steps 0, 25 %, 50 % and 100 % the last attention layer's q, k, v on a fixed
held-out batch (8 items) are captured by running the uncompiled module under a
TorchFunctionMode that intercepts `F.scaled_dot_product_attention` and replays each layer
with the variant's reference and the backend's calibrated per-site options (so layer 2 sees
what the trained function feeds it; the replayed logits are compared with the compiled
model's). `attnrewrite.variants.preconditioned.diagnostics` then gives κ(A) and κ(CA) per head
(exact SVD, float64) for each item: 4 heads × 8 items. κ(A) is the dense softmax matrix for
every setting (for sparse it is not the renormalised sparse matrix the model uses); κ(CA) is
reported for the preconditioned settings with their own C.

Outputs: <out>.csv (one row per task × setting × seed × logged step) and <out>.png (loss
curves, mean over seeds with a min–max band; κ panels); a summary table on stdout.
"""
from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import attnrewrite  # noqa: E402
from attnrewrite.variants import VARIANTS  # noqa: E402
from attnrewrite.variants import preconditioned  # noqa: E402
from examples import char_gpt  # noqa: E402

DEFAULT_OUT = Path(__file__).with_name("precondition_training")
KAPPA_ITEMS = 8                 # batch items of the fixed batch whose last-layer κ is measured
COLUMNS = ["task", "setting", "variant", "options", "seed", "step", "train_loss", "eval_loss", "metric",
           "eval_metric", "kappa_A_median", "kappa_A_max", "kappa_CA_median", "kappa_CA_max", "seconds"]


# --- task A: a small ViT on the 8×8 digits ----------------------------------------------------

class ViTBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v)                  # bidirectional, no mask
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class DigitViT(nn.Module):
    """Patches (B, 16, 4) → a class token + 16 patch tokens → 2 pre-LN blocks → 10 logits."""

    def __init__(self, patch_dim: int = 4, n_patches: int = 16, d: int = 64, heads: int = 4, layers: int = 2,
                 classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(patch_dim, d)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.zeros(1, n_patches + 1, d))
        self.blocks = nn.ModuleList(ViTBlock(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)
        for name, p in self.named_parameters():                # the same N(0, 0.02) init as CharGPT
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2 and "ln" not in name:
                nn.init.normal_(p, 0.0, 0.02)

    def forward(self, patches):
        x = self.embed(patches)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x[:, 0]))


def digits(split_seed: int = 0, n_test: int = 360):
    """(train patches, train labels, test patches, test labels): pixels / 16, 2×2 patches in raster order."""
    from sklearn.datasets import load_digits
    d = load_digits()
    img = torch.tensor(d.images, dtype=torch.float32) / 16.0                     # (N, 8, 8)
    patches = img.view(-1, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(-1, 16, 4)
    labels = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
    test, train = perm[:n_test], perm[n_test:]
    return patches[train], labels[train], patches[test], labels[test]


# --- the two tasks behind one small interface ------------------------------------------------

@dataclass
class Task:
    name: str
    steps: int
    batch: int
    lr: float
    log_every: int
    sparse: dict
    make_model: Callable[[], nn.Module]
    train_batch: Callable[[torch.Generator], tuple]                  # → (x, y) for one step
    eval_batches: list                                               # [(x, y, n_real)], training shape
    metric: str
    metric_of: Callable[[float, float], float]                       # (mean loss, accuracy) → metric
    causal: bool
    extra: dict = field(default_factory=dict)


def vit_task(steps: int) -> Task:
    xtr, ytr, xte, yte = digits()
    batch = 64
    evals = []
    for i in range(0, len(yte), batch):                 # pad the last batch to the training shape
        idx = torch.arange(i, i + batch) % len(yte)
        evals.append((xte[idx], yte[idx], min(batch, len(yte) - i)))

    def train_batch(g):
        idx = torch.randint(0, len(ytr), (batch,), generator=g)
        return xtr[idx], ytr[idx]

    return Task("vit", steps, batch, 2e-3, max(steps // 30, 1), {"mode": "topk", "k": 8}, DigitViT, train_batch,
                evals, "test_accuracy", lambda loss, acc: acc, causal=False,
                extra={"train": len(ytr), "test": len(yte)})


def lm_task(steps: int, context: int = 64, batch: int = 32, eval_windows: int = 128) -> Task:
    train_ids, val_ids = char_gpt.splits()
    cfg = char_gpt.Config(n_layers=2, d_model=64, n_heads=4, context=context)
    x, y = char_gpt.windows(val_ids, eval_windows, context, seed=1)
    evals = [(xb, yb, len(yb)) for xb, yb in zip(x.split(batch), y.split(batch))]

    def train_batch(g):
        starts = torch.randint(0, len(train_ids) - context - 1, (batch,), generator=g).tolist()
        return (torch.stack([train_ids[s:s + context] for s in starts]),
                torch.stack([train_ids[s + 1:s + context + 1] for s in starts]))

    return Task("lm", steps, batch, 3e-3, max(steps // 30, 1), {"mode": "window", "window": 16},
                lambda: char_gpt.CharGPT(cfg), train_batch, evals, "bits_per_char",
                lambda loss, acc: loss / math.log(2), causal=True, extra={"config": cfg})


@dataclass
class TaskName:
    """What the summary and the plot need of a task (for --replot)."""
    name: str
    metric: str


def settings(task: Task) -> list[tuple[str, str, dict]]:
    return [("baseline", "exact", {}),
            ("output-norm", "preconditioned", {"mode": "output-norm"}),
            ("row-equilibrate", "preconditioned", {"mode": "row-equilibrate"}),
            ("sparse", "sparse", dict(task.sparse))]


def loss_fn(logits, y):
    return F.cross_entropy(logits.flatten(0, -2), y.flatten())


# --- replaying the compiled function on the uncompiled module, to capture q/k/v ---------------

class Replay(TorchFunctionMode):
    """Runs each `F.scaled_dot_product_attention` call as the variant's reference with the
    backend's calibrated options for that layer (for `exact`: SDPA itself, so the replay error
    then measures the rewritten model against the original), and keeps the inputs of layer `keep`."""

    def __init__(self, variant: str, layer_options: list[dict], keep: int):
        super().__init__()
        self.mod, self.layer_options, self.keep = VARIANTS[variant], layer_options, keep
        self.calls, self.captured = 0, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        mask, causal = kwargs.get("attn_mask"), bool(kwargs.get("is_causal", False))
        scale = kwargs.get("scale") or q.shape[-1] ** -0.5
        i, self.calls = self.calls, self.calls + 1
        if i == self.keep:
            self.captured = (q, k, v, mask, scale, causal)
        if self.mod.NAME == "exact":                 # the model's own SDPA: checks exact against it
            return func(*args, **kwargs)
        opts = self.layer_options[i]
        return self.mod.reference(q, k, v, mask, scale, 0.0, causal, 0.0, *self.mod.op_args(None, opts))


def layer_options(backend) -> list[dict]:
    """Per-layer options of the (single) compiled graph, by the site's module name blocks.<i>."""
    sites = backend.reports[0]["sites"]
    if any(s["status"] != "rewritten" for s in sites):
        raise RuntimeError(f"not every site was rewritten: {[(s['name'], s['status']) for s in sites]}")
    by_layer = {int(s["name"].split(".")[-1]): s.get("options") or {} for s in sites}
    return [by_layer[i] for i in range(len(by_layer))]


def kappas(model, backend, variant: str, options: dict, x, compiled_logits) -> dict:
    """κ(A), κ(CA) of the last layer on the first KAPPA_ITEMS items of x, and the replay error."""
    opts = layer_options(backend)
    mode = Replay(variant, opts, keep=len(opts) - 1)
    with torch.no_grad(), mode:
        logits = model(x)
    if mode.calls != len(opts):
        raise RuntimeError(f"replay saw {mode.calls} attention calls for {len(opts)} rewritten sites")
    err = float((logits - compiled_logits).abs().max() / compiled_logits.abs().max().clamp_min(1e-30))
    q, k, v, mask, scale, causal = mode.captured
    diag_opts = ({"mode": options["mode"], "gain": opts[-1]["gain"]} if variant == "preconditioned"
                 else {"mode": "row-equilibrate", "gain": 1.0})          # only κ(A) is used then
    ka, kca = [], []
    for b in range(min(KAPPA_ITEMS, q.shape[0])):
        d = preconditioned.diagnostics(q[b:b + 1], k[b:b + 1], v[b:b + 1], mask, scale, 0.0, causal, diag_opts)
        ka += [float("inf") if a is None else a for a in d["kappa"]["A"]]
        kca += [float("inf") if a is None else a for a in d["kappa"]["CA"]]
    out = {"kappa_A_median": statistics.median(ka), "kappa_A_max": max(ka), "replay_err": err}
    if variant == "preconditioned":
        out |= {"kappa_CA_median": statistics.median(kca), "kappa_CA_max": max(kca)}
    return out


# --- one training run --------------------------------------------------------------------------

def evaluate(f, task: Task) -> tuple[float, float, torch.Tensor]:
    """(mean loss, accuracy, logits of the first eval batch) through the compiled model.

    Same batch shape and grad mode as training (outputs detached): anything else would
    recompile, and a recompile recalibrates the preconditioner's gains.
    """
    total, correct, n, first = 0.0, 0, 0, None
    for x, y, real in task.eval_batches:
        logits = f(x).detach()
        first = logits if first is None else first
        lo, yy = logits[:real], y[:real]
        total += float(F.cross_entropy(lo.flatten(0, -2), yy.flatten(), reduction="sum"))
        correct += int((lo.argmax(-1) == yy).sum())
        n += yy.numel()
    return total / n, correct / n, first


def run(task: Task, setting: str, variant: str, options: dict, seed: int, log) -> list[dict]:
    torch._dynamo.reset()                    # fresh caches: every run compiles (and calibrates) once
    torch.manual_seed(seed)
    model = task.make_model()
    backend = attnrewrite.compile_backend(variant, inner="eager", **options)
    f = torch.compile(model, backend=backend)
    opt = torch.optim.AdamW(model.parameters(), lr=task.lr, betas=(0.9, 0.95), weight_decay=0.05)
    warmup = max(task.steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / task.steps, 1.0)))))
    g = torch.Generator().manual_seed(seed)
    first = task.train_batch(torch.Generator().manual_seed(seed))      # = the batch of step 1
    f(first[0])                              # compile + calibrate on the first training batch, no update
    graphs = len(backend.reports)
    checkpoints = sorted({0, task.steps // 4, task.steps // 2, task.steps})
    opt_text = " ".join(f"{k}={v}" for k, v in options.items())
    base = {"task": task.name, "setting": setting, "variant": variant, "options": opt_text, "seed": seed,
            "metric": task.metric}
    rows, running, t0, replay = [], [], time.perf_counter(), []

    def checkpoint(step: int, row: dict):
        loss, acc, logits = evaluate(f, task)
        kap = kappas(model, backend, variant, options, task.eval_batches[0][0], logits)
        replay.append(kap.pop("replay_err"))
        row |= {"eval_loss": loss, "eval_metric": task.metric_of(loss, acc), **kap}

    for step in range(0, task.steps + 1):
        if step:
            x, y = task.train_batch(g)
            loss = loss_fn(f(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            running.append(loss.item())
        if step in checkpoints or step % task.log_every == 0:
            row = {**base, "step": step, "train_loss": sum(running) / len(running) if running else None}
            if step in checkpoints:
                checkpoint(step, row)
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            running = []
    if len(backend.reports) != graphs:
        raise RuntimeError(f"{task.name}/{setting}: the backend compiled {len(backend.reports) - graphs} more "
                           f"graph(s) during training: the gains would have been recalibrated")
    gains = layer_options(backend)[-1].get("gain")
    end = rows[-1]
    log(f"{task.name:4s} {setting:16s} seed {seed}  train {end['train_loss']:.3f}  {task.metric} "
        f"{end['eval_metric']:.4f}  κ(A) med {end['kappa_A_median']:.3g}"
        + (f"  κ(CA) med {end['kappa_CA_median']:.3g}" if "kappa_CA_median" in end else "")
        + f"  replay err {max(replay):.1e}  {end['seconds']:.0f} s"
        + (f"  gains(last layer) {', '.join(f'{x:.3g}' for x in gains)}" if gains else ""))
    if max(replay) > 1e-4:
        raise RuntimeError(f"{task.name}/{setting}: the replayed model differs from the compiled one "
                           f"(rel {max(replay):.2e}): the κ inputs would not be what the model computes")
    return rows


# --- outputs -----------------------------------------------------------------------------------

def write_csv(rows: list[dict], path: Path):
    def fmt(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.6g}"
        return str(v)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([fmt(r.get(c)) for c in COLUMNS])


def groups(rows, task):
    out = {}
    for r in rows:
        if r["task"] == task:
            out.setdefault(r["setting"], {}).setdefault(r["seed"], []).append(r)
    return out


def spread(values):
    return statistics.mean(values), min(values), max(values)


def geomean(values):
    """κ across seeds: the geometric mean (one seed's large κ would otherwise dominate)."""
    return statistics.geometric_mean(values)


def read_csv(path: Path) -> list[dict]:
    """The rows of a CSV this script wrote, with numbers as numbers and blanks as None."""
    rows = []
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            row = {}
            for k, v in r.items():
                if k in ("seed", "step"):
                    row[k] = int(v)
                elif k in ("task", "setting", "variant", "options", "metric"):
                    row[k] = v
                else:
                    row[k] = float(v) if v else None
            rows.append(row)
    return rows


def summary(rows: list[dict], tasks: list) -> str:
    """A markdown table: mean [min, max] over seeds; κ columns: geometric mean over seeds of each
    run's median per-head κ, at step 0 and at the last step."""
    lines = ["| task | setting | final train loss | final eval loss | final metric | κ(A) median, step 0 → end "
             "| κ(CA) median, step 0 → end | s / run |", "|---|---|---|---|---|---|---|---|"]
    for task in tasks:
        for setting, seeds in groups(rows, task.name).items():
            ends = [rs[-1] for rs in seeds.values()]
            starts = [next(r for r in rs if r["step"] == 0) for rs in seeds.values()]

            def pm(key, src=ends, digits=3):
                vals = [r[key] for r in src if r.get(key) is not None]
                if not vals:
                    return "—"
                m, lo, hi = spread(vals)
                return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"

            def kap(key):
                a = [r[key] for r in starts if r.get(key) is not None]
                b = [r[key] for r in ends if r.get(key) is not None]
                return f"{geomean(a):.3g} → {geomean(b):.3g}" if a and b else "—"

            lines.append(f"| {task.name} | {setting} | {pm('train_loss')} | {pm('eval_loss')} | "
                         f"{task.metric} {pm('eval_metric', digits=4 if task.name == 'vit' else 3)} | "
                         f"{kap('kappa_A_median')} | {kap('kappa_CA_median')} | "
                         f"{statistics.mean(r['seconds'] for r in ends):.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], tasks: list, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {"baseline": "k", "output-norm": "tab:red", "row-equilibrate": "tab:blue", "sparse": "tab:green"}
    fig, axes = plt.subplots(2, len(tasks), figsize=(6.2 * len(tasks), 8.4), squeeze=False)
    for col, task in enumerate(tasks):
        ax, kx = axes[0, col], axes[1, col]
        for setting, seeds in groups(rows, task.name).items():
            c = colors.get(setting, None)
            runs = list(seeds.values())
            steps = [r["step"] for r in runs[0] if r["train_loss"] is not None]
            curves = [[r["train_loss"] for r in rs if r["train_loss"] is not None] for rs in runs]
            mean = [statistics.mean(v) for v in zip(*curves)]
            finals = [rs[-1]["eval_metric"] for rs in runs]
            m, lo, hi = spread(finals)
            label = f"{setting}: {task.metric.replace('_', ' ')} {m:.3f} [{lo:.3f}, {hi:.3f}]"
            ax.plot(steps, mean, color=c, label=label)
            ax.fill_between(steps, [min(v) for v in zip(*curves)], [max(v) for v in zip(*curves)], color=c, alpha=0.2)
            ks = [r["step"] for r in runs[0] if r.get("kappa_A_median") is not None]
            for key, style, name in (("kappa_A_median", "-o", "κ(A)"), ("kappa_CA_median", "--x", "κ(CA)")):
                vals = [[r[key] for r in rs if r.get(key) is not None] for rs in runs]
                if not vals[0]:
                    continue
                kx.plot(ks, [geomean(v) for v in zip(*vals)], style, color=c, label=f"{setting} {name}")
                kx.fill_between(ks, [min(v) for v in zip(*vals)], [max(v) for v in zip(*vals)], color=c, alpha=0.12)
        ax.set_title(f"{task.name}: training loss (mean of {len(runs)} seeds, min–max band)")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats)")
        ax.legend(fontsize=8)
        kx.set_yscale("log")
        kx.set_title(f"{task.name}: median per-head κ, last layer (geo. mean of seeds, min–max)")
        kx.set_xlabel("step")
        kx.set_ylabel("κ (σmax/σmin)")
        kx.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: a few steps, seed 0 only, no files unless --out")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"output stem for .csv and .png (default {DEFAULT_OUT.relative_to(ROOT)}; none with --quick)")
    ap.add_argument("--tasks", default="vit,lm", help="comma-separated: vit, lm")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--vit-steps", type=int, default=240)
    ap.add_argument("--lm-steps", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--replot", type=Path, default=None, metavar="CSV",
                    help="no training: redraw <out>.png and reprint the summary from a CSV this script wrote")
    args = ap.parse_args(argv)
    if args.replot is not None:
        rows = read_csv(args.replot)
        tasks = [TaskName(n, next(r["metric"] for r in rows if r["task"] == n))
                 for n in dict.fromkeys(r["task"] for r in rows)]
        print(summary(rows, tasks))
        png = (args.out or args.replot).with_suffix(".png")
        plot(rows, tasks, png)
        print(f"wrote {png}")
        return
    torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds, args.vit_steps, args.lm_steps = 1, 8, 4
    out = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)
    t0 = time.perf_counter()
    tasks = []
    for name in args.tasks.split(","):
        tasks.append({"vit": lambda: vit_task(args.vit_steps), "lm": lambda: lm_task(args.lm_steps)}[name]())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); seeds 0..{args.seeds - 1}; "
          + "; ".join(f"{t.name}: {t.steps} steps × batch {t.batch}, lr {t.lr}" for t in tasks), flush=True)
    rows = []
    for task in tasks:
        for setting, variant, options in settings(task):
            for seed in range(args.seeds):
                rows += run(task, setting, variant, options, seed, lambda s: print(s, flush=True))
    print(summary(rows, tasks))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_csv(rows, out.with_suffix(".csv"))
        plot(rows, tasks, out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.csv')} ({len(rows)} rows) and {out.with_suffix('.png')}")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
