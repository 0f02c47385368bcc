"""Every template's kernels compile ahead of time for sm_80 and sm_90 on this GPU-less machine.

`compile_aot` runs `triton.compile(..., target=GPUTarget("cuda", arch, 32))` down to a cubin with
the ptxas bundled in the pip triton, and reads the binary's registers and local memory (spills)
with the bundled cuobjdump and its shared memory from Triton's metadata. A kernel that passes the
interpreter can still fail here (tiles under 16, layouts the GPU backend rejects) or spill — so
this test fails on a compile error, on any spill byte and on shared memory over the target's
per-block limit. The full table over more configurations: benchmarks/kernel_resources.py →
benchmarks/KERNELS.md.
"""
import pytest

from attnrewrite import kernels
from attnrewrite.kernels import KernelConfig

CONFIGS = [
    KernelConfig("exact", 64, 64, "float16", causal=True, mask="key", group=2),
    KernelConfig("exact", 128, 128, "bfloat16", causal=False, mask="boolean", softcap=30.0),
    KernelConfig("window", 128, 128, "bfloat16", causal=True, mask="none",
                 params=(("AFTER", 0), ("BEFORE", 255), ("SINKS", 4))),
    KernelConfig("block_sparse", 64, 64, "bfloat16", causal=False, mask="none",
                 params=(("SPARSE_M", 128), ("SPARSE_N", 128))),
    KernelConfig("block_sparse", 128, 128, "float16", causal=True, mask="key", group=2, softcap=30.0,
                 params=(("SPARSE_M", 64), ("SPARSE_N", 64))),
    KernelConfig("block_sparse", 64, 64, "float32", causal=True, mask="key",
                 params=(("SPARSE_M", 64), ("SPARSE_N", 64))),
    KernelConfig("preconditioned", 64, 64, "float16", causal=False, mask="additive",
                 params=(("EQUILIBRATE", True),)),
    KernelConfig("topk", 128, 128, "bfloat16", causal=True, mask="boolean"),
    KernelConfig("conv_basis", 128, 128, "bfloat16", causal=True, mask="key", group=4, softcap=30.0,
                 params=(("WORK_F64", False),)),
    KernelConfig("conv_basis", 64, 64, "float16", causal=False, mask="none", params=(("WORK_F64", True),)),
    KernelConfig("conv_basis", 256, 256, "float32", causal=False, mask="key", softcap=30.0,
                 params=(("WORK_F64", True),)),
]


@pytest.fixture(autouse=True)
def _compiled_mode():
    if kernels.dispatch.INTERPRETER_ON_AT_IMPORT:
        pytest.skip("this process runs the Triton interpreter (TRITON_INTERPRET=1): nothing to compile")


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.template}-{c.dtype}-d{c.head_dim}-{c.mask}")
def test_compiles_without_spills_within_shared_memory(cfg, arch):
    rows = kernels.compile_aot(cfg, arch)
    assert rows, "no kernel compiled"
    for r in rows:
        assert r.pop("ptx").lstrip().startswith("//")
        assert 0 < r["registers"] <= 255, r
        assert r["spill_bytes"] == 0, f"{cfg.name} {r['kernel']} spills on sm_{arch}: {r}"
        assert r["shared"] <= r["shared_limit"], f"{cfg.name} {r['kernel']} needs {r['shared']} B shared"
