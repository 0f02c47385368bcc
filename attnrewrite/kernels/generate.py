"""A site's configuration, and the kernels it names: loaded, written out, compiled ahead of time.

The templates (exact.py, window.py, block_sparse.py, preconditioned.py, topk.py, conv_basis.py)
are ordinary modules of `@triton.jit` kernels, with helpers imported from common.py, and host
functions that take a configuration first. A `KernelConfig` names a template and every value
its kernels are specialised on: head sizes, dtype, causal, mask kind, GQA group, soft-cap, the
variant's parameters, and the launch settings (tile sizes, warps, stages) chosen for the target.
`cfg.launch(kernel)` fills in the `tl.constexpr` arguments a kernel declares from them, so Triton
compiles each kernel once per configuration and compiles away every branch it does not take.
`load(cfg)` is the template's host functions with cfg bound; `specialise(cfg)` the source a site
runs with as one file (`write`, `emit`); `compile_aot(cfg, arch)` compiles every kernel of a
configuration for an NVIDIA target without a GPU and reads its registers, spills and shared
memory from the binary.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import subprocess
import tempfile
import textwrap
from pathlib import Path

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import block_sparse, conv_basis, exact, preconditioned, topk, window

HERE = Path(__file__).parent
TEMPLATES = {"exact": exact, "window": window, "block_sparse": block_sparse, "preconditioned": preconditioned,
             "topk": topk, "conv_basis": conv_basis}
SHARED_LIMIT = {80: 166912, 90: 232448}               # bytes of shared memory one block may use
TRITON_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "uint8": "u8", "int32": "i32"}


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Everything one generated module is specialised on (hashable; the hash names it)."""
    template: str                 # one of TEMPLATES
    head_dim: int
    head_dim_v: int
    dtype: str                    # q's dtype: float16 | bfloat16 | float32
    causal: bool = False
    mask: str = "none"            # none | key | additive | boolean
    group: int = 1                # query heads per kv head
    softcap: float = 0.0
    params: tuple = ()            # ((NAME, value), ...): the template's own constants
    target: str = "cuda"          # cuda | interpret (the Triton interpreter on CPU tensors)

    def settings(self) -> dict:
        """Launch settings: tiles, warps and pipeline stages for the forward and the backward."""
        if self.target == "interpret":            # tiny tiles (16 = the GPU's tl.dot minimum)
            return {"FWD_BLOCK_M": 16, "FWD_BLOCK_N": 16, "FWD_WARPS": 1, "FWD_STAGES": 1,
                    "BWD_BLOCK_M": 16, "BWD_BLOCK_N": 16, "BWD_WARPS": 1, "BWD_STAGES": 1}
        if self.template == "conv_basis":          # a row against a tile, no tl.dot: tiles of ≤ 2048
            d = max(_pow2(self.head_dim), _pow2(self.head_dim_v), 16)   # values, 8 per thread of 8 warps
            rows = max(8, min(64, 2048 // d))      # (16 per thread of 4 warps spilled 8 bytes on sm_80 for
            return {f"{p}_{k}": v for p in ("FWD", "BWD")    # bf16, d 128, causal + key bias, float64 work)
                    for k, v in (("BLOCK_M", rows), ("BLOCK_N", rows), ("WARPS", 8), ("STAGES", 1))}
        d = max(_pow2(self.head_dim), _pow2(self.head_dim_v), 16)
        # (BLOCK_M, BLOCK_N, warps, stages), chosen so that no kernel spills on sm_80 or sm_90
        # (tests/test_kernels_aot.py, benchmarks/KERNELS.md): ≤ 16 scores per thread, fewer
        # when a full mask tile or a d=128 accumulator takes registers too
        full_mask = self.mask in ("additive", "boolean")
        if self.dtype == "float32":               # three-pass TF32 products take more registers
            fwd, bwd = ((32, 32, 8, 2), (32, 32, 4, 1)) if d <= 64 else ((16, 32, 8, 2), (16, 16, 4, 1))
        elif d <= 64:
            fwd, bwd = ((64, 32, 8, 3) if full_mask else (64, 64, 8, 3)), (32, 64, 4, 1)
        elif d <= 128:
            fwd = {"none": (64, 64, 8, 2), "key": (32, 64, 4, 2)}.get(self.mask, (64, 32, 8, 2))
            bwd = (32, 64, 8, 1)
        else:
            fwd, bwd = (64, 32, 8, 2), (16, 32, 8, 1)
        params = dict(self.params)
        if self.template == "topk":                # one query row a program: BLOCK_N kept keys at a time
            fwd = (*fwd[:2], 4, 1)
        if self.template == "block_sparse":        # tiles divide the layout's blocks
            fit = lambda t, n: min(t, n & -n)        # noqa: E731 - the largest power of two dividing n, ≤ t
            fwd = (fit(fwd[0], params["SPARSE_M"]), fit(fwd[1], params["SPARSE_N"]), *fwd[2:])
            bwd = (fit(bwd[0], params["SPARSE_M"]), fit(bwd[1], params["SPARSE_N"]), *bwd[2:])
        keys = ("BLOCK_M", "BLOCK_N", "WARPS", "STAGES")
        return {**{f"FWD_{k}": v for k, v in zip(keys, fwd)}, **{f"BWD_{k}": v for k, v in zip(keys, bwd)}}

    def constants(self) -> dict:
        """The values of the kernels' tl.constexpr arguments (common.py says what each means)."""
        return {"HEAD_DIM": self.head_dim, "HEAD_DIM_V": self.head_dim_v,
                "D_PAD": max(_pow2(self.head_dim), 16), "DV_PAD": max(_pow2(self.head_dim_v), 16),
                "GROUP": self.group, "CAUSAL": self.causal, "MASK": self.mask, "SOFTCAP": float(self.softcap),
                "DOT_PRECISION": self.dot_precision(), **dict(self.params)}

    def constexprs(self, kernel, phase: str = "FWD") -> dict:
        """The tl.constexpr arguments `kernel` declares, filled in: constants(), and BLOCK_M and
        BLOCK_N from the phase's ("FWD" or "BWD") launch settings."""
        s = self.settings()
        known = {**self.constants(), "BLOCK_M": s[f"{phase}_BLOCK_M"], "BLOCK_N": s[f"{phase}_BLOCK_N"]}
        return {name: known[name] for name in kernel.arg_names if name in known}

    def launch(self, kernel, phase: str = "FWD") -> dict:
        """The keywords of `kernel[grid](...)`: its constexprs(), and the phase's warps and stages."""
        s = self.settings()
        return {**self.constexprs(kernel, phase), "num_warps": s[f"{phase}_WARPS"], "num_stages": s[f"{phase}_STAGES"]}

    def dot_precision(self) -> str:
        """fp32 sites: three-pass TF32 on the GPU's tensor cores (about fp32's accuracy), plain
        fp32 products in the interpreter; half sites ignore it."""
        if self.dtype != "float32":
            return "tf32"
        return "ieee" if self.target == "interpret" else "tf32x3"

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "params": dict(self.params)}

    @classmethod
    def from_dict(cls, d: dict) -> "KernelConfig":
        return cls(**{**d, "params": tuple(sorted(d.get("params", {}).items()))})

    @property
    def hash(self) -> str:
        """12 hex digits over the configuration, its launch settings and the template's source and
        common.py's (so an edited template never reuses an old name)."""
        text = json.dumps({**self.as_dict(), "settings": self.settings(),
                           "source": [_source("common"), _source(self.template)]}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        return f"{self.template}_{self.hash}"


@functools.lru_cache(maxsize=None)
def _source(name: str) -> str:
    return (HERE / f"{name}.py").read_text()


class Bound:
    """A template's host functions with one configuration bound, as `load` returns them:
    `load(cfg).forward(q, ...)` is `<template>.forward(cfg, q, ...)`."""

    def __init__(self, cfg: KernelConfig):
        if cfg.template not in TEMPLATES:
            raise ValueError(f"no template named {cfg.template!r}")
        self.config, self.template = cfg, TEMPLATES[cfg.template]

    def __getattr__(self, name: str):
        return functools.partial(getattr(self.template, name), self.config)


def load(cfg: KernelConfig) -> Bound:
    """cfg's kernels, ready to run: its template's host functions with cfg bound (Triton compiles
    each kernel on its first launch with cfg's constexprs, or interprets it under TRITON_INTERPRET=1)."""
    return Bound(cfg)


def specialise(cfg: KernelConfig) -> str:
    """What a site runs with, as one file: a header stating cfg — the tl.constexpr values and the
    launch settings its kernels are launched with — over the template module's source (its
    helpers imported from attnrewrite.kernels.common)."""
    if cfg.template not in TEMPLATES:
        raise ValueError(f"no template named {cfg.template!r}")
    config = json.dumps(cfg.as_dict(), sort_keys=True)
    constexprs = textwrap.fill(", ".join(f"{k}={v!r}" for k, v in cfg.constants().items()), 100,
                               initial_indent="  ", subsequent_indent="  ")
    settings = textwrap.fill(", ".join(f"{k}={v!r}" for k, v in cfg.settings().items()), 100,
                             initial_indent="  ", subsequent_indent="  ")
    source = _source(cfg.template).replace("from .common import", "from attnrewrite.kernels.common import")
    return (f'"""{cfg.name}: generated by attnrewrite.kernels from the `{cfg.template}` template.\n\n'
            f"configuration: {config}\n\n"
            f"Its kernels take these tl.constexpr arguments (each those it declares):\n{constexprs}\n"
            f"and these launch settings:\n{settings}\n\n"
            f"attnrewrite.kernels.load(KernelConfig.from_dict(configuration)) runs them. Edit the template\n"
            f"(attnrewrite/kernels/{cfg.template}.py), not this file.\n\"\"\"\n{source}")


def write(cfg: KernelConfig, directory) -> Path:
    """Write cfg's source to directory/<name>.py (atomically; unchanged files are left alone)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{cfg.name}.py"
    text = specialise(cfg)
    if not path.exists() or path.read_text() != text:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- ahead-of-time compilation

def _resources(cubin: bytes) -> dict:
    """Registers and local-memory bytes per thread (spills: Triton kernels keep no local arrays)
    and static shared memory, read from the binary with the cuobjdump bundled with Triton."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        text = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"\b(REG|LOCAL|SHARED|STACK):(\d+)", text.split("Function", 1)[1]))
    return {"registers": int(usage["REG"]), "spill_bytes": int(usage["LOCAL"]) + int(usage["STACK"]),
            "static_shared": int(usage["SHARED"])}


def compile_aot(cfg: KernelConfig, arch: int) -> list[dict]:
    """Compile every kernel of cfg for sm_<arch> (no GPU needed): per kernel its name, the
    registers, spill bytes and shared memory it needs, and the PTX."""
    cfg = dataclasses.replace(cfg, target="cuda")
    out = []
    dtype = TRITON_TYPES[cfg.dtype]
    mask_dtype = {"none": dtype, "key": "fp32", "additive": dtype, "boolean": "u8"}[cfg.mask]
    for kernel, pointers, launch in load(cfg).aot_kernels(dtype, mask_dtype):
        constexprs = {k: v for k, v in launch.items() if k not in ("num_warps", "num_stages")}
        warps, stages = launch["num_warps"], launch["num_stages"]
        # pointers 16-byte aligned, as Triton specialises them at run time for torch's allocations
        aligned = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in pointers}
        src = ASTSource(fn=kernel, signature=signature(kernel, pointers, constexprs), constexprs=constexprs,
                        attrs=aligned)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": warps, "num_stages": stages})
        use = _resources(compiled.asm["cubin"])
        out.append({"kernel": kernel.__name__, "arch": f"sm_{arch}", "warps": warps, "stages": stages,
                    "registers": use["registers"], "spill_bytes": use["spill_bytes"],
                    "shared": int(compiled.metadata.shared) + use["static_shared"],
                    "shared_limit": SHARED_LIMIT[arch], "ptx": compiled.asm["ptx"]})
    return out


def emit(directory, sites: list[dict], arch: int | None = None) -> list[Path]:
    """Write the source of every kernel the report's `sites` run with into `directory` (one file per
    configuration, <name>.py), with `arch` also each kernel's PTX for sm_<arch>
    (<name>.<kernel>.sm_<arch>.ptx), and index.json: site name -> kernel name, or null and why."""
    if arch and knobs.runtime.interpret:
        raise RuntimeError("PTX for a GPU target cannot be produced under TRITON_INTERPRET=1; run without it")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written, index, done = [], {}, set()
    for site in sites:
        kernel = site.get("kernel")
        index[site["name"]] = kernel["name"] if kernel else {"kernel": None, "reason": site.get("kernel_reason", "")}
        if not kernel or kernel["name"] in done:
            continue
        done.add(kernel["name"])
        cfg = KernelConfig.from_dict(kernel["config"])
        written.append(write(cfg, directory))
        if arch and cfg.target != "cuda":           # the GPU's own configuration (its tiles) for the PTX
            cfg = dataclasses.replace(cfg, target="cuda")
            written.append(write(cfg, directory))
        for r in compile_aot(cfg, arch) if arch else ():
            path = directory / f"{cfg.name}.{r['kernel']}.sm_{arch}.ptx"
            path.write_text(r["ptx"])
            written.append(path)
    path = directory / "index.json"
    path.write_text(json.dumps(index, indent=1) + "\n")
    return [*written, path]


def signature(kernel, pointers: dict, constexprs: dict) -> dict:
    """Triton's signature for `kernel`: pointer arguments typed from `pointers` ({name: "*fp16"}),
    constexprs marked, `sm_scale`/`gain`-like floats from the name (FLOATS), the rest int32."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


FLOATS = ("sm_scale", "reliable")
