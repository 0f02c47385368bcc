"""The generator: a template specialised to one site's configuration becomes a module.

A `KernelConfig` names a template (a file beside this one) and every constant the kernels
are specialised on: head sizes, dtype, causal, mask kind, GQA group, soft-cap, the
variant's parameters, and the launch settings (tile sizes, warps, stages) chosen for the
target. `specialise(cfg)` writes the module's source — a header stating the configuration,
the constants as `tl.constexpr` globals, then the shared helpers (common.py) and the
template's body — so what a site runs can be read as one file. `load(cfg)` imports that
source (from a per-user cache directory, keyed by the configuration's hash) once per process;
Triton then compiles each kernel once per argument signature. `compile_aot(cfg, arch)`
compiles every kernel of a configuration for an NVIDIA target without a GPU and reads its
registers, spills and shared memory from the binary.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

HERE = Path(__file__).parent
BODY_MARK = "# --- template body ---"
MASK_KINDS = ("none", "key", "additive", "boolean")   # MASK constant: index in this tuple
TEMPLATES = ("exact", "window", "block_sparse", "preconditioned", "topk", "conv_basis")
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
    mask: str = "none"            # one of MASK_KINDS
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
        if self.template == "block_sparse":        # tiles divide the layout's blocks
            fit = lambda t, n: min(t, n & -n)        # noqa: E731 - the largest power of two dividing n, ≤ t
            fwd = (fit(fwd[0], params["SPARSE_M"]), fit(fwd[1], params["SPARSE_N"]), *fwd[2:])
            bwd = (fit(bwd[0], params["SPARSE_M"]), fit(bwd[1], params["SPARSE_N"]), *bwd[2:])
        keys = ("BLOCK_M", "BLOCK_N", "WARPS", "STAGES")
        return {**{f"FWD_{k}": v for k, v in zip(keys, fwd)}, **{f"BWD_{k}": v for k, v in zip(keys, bwd)}}

    def constants(self) -> dict:
        """The tl.constexpr globals the kernels read."""
        return {"HEAD_DIM": self.head_dim, "HEAD_DIM_V": self.head_dim_v,
                "D_PAD": max(_pow2(self.head_dim), 16), "DV_PAD": max(_pow2(self.head_dim_v), 16),
                "GROUP": self.group, "CAUSAL": self.causal, "MASK": MASK_KINDS.index(self.mask),
                "SOFTCAP": float(self.softcap),
                "DOT_PRECISION": self.dot_precision(),
                **dict(self.params)}

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
        """12 hex digits over the configuration, its launch settings and the template text (so an
        edited template never reuses an old module's name)."""
        text = json.dumps({**self.as_dict(), "settings": self.settings(),
                           "source": [_body("common"), _body(self.template)]}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        return f"{self.template}_{self.hash}"


@functools.lru_cache(maxsize=None)
def _body(template: str) -> str:
    text = (HERE / f"{template}.py").read_text()
    return text.split(BODY_MARK, 1)[1].strip("\n")


def specialise(cfg: KernelConfig) -> str:
    """The complete source of cfg's module."""
    if cfg.template not in TEMPLATES:
        raise ValueError(f"no template named {cfg.template!r}")
    consts = "\n".join(f"{k} = tl.constexpr({v!r})" for k, v in cfg.constants().items())
    launch = "\n".join(f"{k} = {v!r}" for k, v in cfg.settings().items())
    config = json.dumps(cfg.as_dict(), sort_keys=True)
    return (f'"""{cfg.name}: generated by attnrewrite.kernels from the `{cfg.template}` template.\n\n'
            f"configuration: {config}\n\nEdit the template, not this file.\n\"\"\"\n"
            "import torch\nimport triton\nimport triton.language as tl\n\n"
            f"# kernel constants\n{consts}\n\n# launch settings\n{launch}\n\n"
            f"# ---- shared helpers (common.py)\n{_body('common')}\n\n\n"
            f"# ---- the {cfg.template} template\n{_body(cfg.template)}\n")


def cache_dir() -> Path:
    """Where generated modules are written before import: $ATTNREWRITE_KERNEL_CACHE, else a
    per-user directory under the system temporary directory."""
    default = Path(tempfile.gettempdir()) / f"attnrewrite-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}"
    return Path(os.environ.get("ATTNREWRITE_KERNEL_CACHE") or default)


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


_MODULES: dict = {}


def load(cfg: KernelConfig):
    """cfg's module, imported once per process (interpreted when cfg.target is "interpret")."""
    key = cfg                                      # a frozen dataclass: the hash is computed once, on a miss
    if key not in _MODULES:
        path = write(cfg, cache_dir())
        name = f"attnrewrite_generated.{cfg.name}_{cfg.target}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        with knobs.runtime.scope():                # @triton.jit reads the interpreter switch when it runs
            knobs.runtime.interpret = cfg.target == "interpret"
            spec.loader.exec_module(module)
        _MODULES[key] = module
    return _MODULES[key]


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
    module = load(cfg)
    out = []
    dtype = TRITON_TYPES[cfg.dtype]
    mask_dtype = {"none": dtype, "key": "fp32", "additive": dtype, "boolean": "u8"}[cfg.mask]
    for kernel, pointers, constexprs, warps, stages in module.aot_kernels(dtype, mask_dtype):
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
