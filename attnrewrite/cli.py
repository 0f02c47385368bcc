"""The `attnrewrite` command: list attention sites, rewrite them, check, write.

    attnrewrite MODEL --list [--verbose] [--json]
    attnrewrite MODEL --variant exact [-o OUT] [--inputs FILE] [--sites SEL] [--json] ...
    attnrewrite                       # the built-in demo: pretrained all-MiniLM-L6-v2

stdout carries only the table (or only JSON with --json); progress and warnings go to
stderr. Exit codes: 0 done, 1 the check failed the tolerance, 2 bad input or usage,
3 an internal error (a bug: rerun with --verbose for the traceback).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

from .io import InputError, atomic_write, check_target, write_rules      # stdlib only: --help stays fast

# the built-in variant names, for --help without importing torch (a test keeps this equal to
# variants.BUILT_IN); other packages' variants come from their entry points (plugin_variants)
VARIANT_NAMES = ("conv-basis", "exact", "preconditioned", "sparse")
ENTRY_POINTS = "attnrewrite.variants"


def plugin_variants() -> tuple:
    """The names of the variants other packages register (`attnrewrite.variants` entry points),
    read from their metadata without importing them."""
    from importlib.metadata import entry_points
    return tuple(sorted(ep.name.replace("_", "-") for ep in entry_points(group=ENTRY_POINTS)))
INT64_MAX = (1 << 63) - 1


class UsageError(Exception):
    pass


class Terminated(BaseException):
    """SIGTERM, raised where the process is so that a write in progress removes its temporary file."""


def _terminate(signum, frame):
    raise Terminated()


class _Parser(argparse.ArgumentParser):
    def error(self, message):              # one line, exit 2
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="attnrewrite", description="Find every attention in a model and rewrite it.")
    p.add_argument("model", nargs="?", help=".pt2, .onnx, .pt/.pth, or pkg.module:factory; none = built-in demo")
    p.add_argument("--list", action="store_true", help="list detected sites, rewrite nothing")
    p.add_argument("--variant", metavar="VARIANT", help="one of " + ", ".join(VARIANT_NAMES))
    p.add_argument("-o", "--output", help="output file (default <stem>.<variant>.pt2 beside the input)")
    p.add_argument("--inputs", help="inputs file (torch.save of {'args','kwargs'}, a tuple, or a list of dicts; .npz for ONNX)")
    p.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="variant parameter, for every selected site")
    p.add_argument("--sites", help="site ids, names, globs or ranges (0-3), comma-separated")
    p.add_argument("--tolerance", type=float, help="end-to-end rel_err gate")
    p.add_argument("--calibrate", type=int, default=0, metavar="N",
                   help="fit a per-head output map per site on N calibration input sets (disjoint from the "
                        "check's: the first N of --inputs, else N synthesised)")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--plot", metavar="FILE", help="write a PNG of each site's cost before/after beside its error")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    p.add_argument("--no-check", action="store_true", help="skip the numeric check")
    p.add_argument("--force", action="store_true", help="write the output even if the check fails")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--trust", action="store_true", help="allow loading a pickled module (runs its code)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (a library registering custom ops or pytree types the model uses)")
    p.add_argument("--emit-kernels", metavar="DIR", help="write the generated Triton source each rewritten site runs with")
    p.add_argument("--target", choices=("sm_80", "sm_90"), help="with --emit-kernels: also write each kernel's PTX for this GPU")
    p.add_argument("--verbose", action="store_true", help="library logs, unmatched softmaxes, tracebacks")
    return p


def parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def check_number(what: str, value) -> None:
    """UsageError for a number no option can take: NaN, ±inf, an integer beyond int64."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{what}={value} is not a finite number")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
        raise UsageError(f"{what}={value} does not fit a 64-bit integer")


def check_environment() -> None:
    """A misconfigured environment is the user's to fix: one line, exit 2."""
    kernels = os.environ.get("ATTNREWRITE_KERNELS", "")
    if kernels and kernels.lower() != "interpret":
        raise UsageError(f"ATTNREWRITE_KERNELS={kernels} is not understood (the only value is 'interpret')")
    if kernels and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise UsageError("ATTNREWRITE_KERNELS=interpret needs TRITON_INTERPRET=1 in the environment too")


def parse_options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise UsageError(f"--set expects KEY=VALUE, got '{pair}'")
        out[key.strip()] = parse_value(value.strip())
        check_number(f"--set {key.strip()}", out[key.strip()])
    return out


def _quiet(verbose: bool) -> None:
    if verbose:
        return
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("torch", "torch._dynamo", "torch.export", "torch._export", "transformers", "onnx",
                 "onnxscript", "onnxruntime", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def protected_paths(args, fe=None) -> set[Path]:
    """What no output may replace: the model file, its external weights, the inputs file."""
    paths = set()
    if args.model and os.path.isfile(args.model):
        paths.add(Path(args.model))
        if args.model.lower().endswith(".onnx"):
            from .frontends.onnx import external_files
            try:
                paths |= external_files(Path(args.model), getattr(fe, "program", None))
            except Exception:  # noqa: BLE001 - not loadable: the load reports it
                pass
    if args.inputs and os.path.isfile(args.inputs):
        paths.add(Path(args.inputs))
    return paths


def output_path(args, fe, variant: str | None) -> Path | None:
    """-o, else the front end's default beside the input (None: nothing to write)."""
    if variant is None:
        return None
    return Path(args.output) if args.output else fe.output_path(variant)


def check_outputs(args, output: Path | None) -> None:
    """Every path this run writes: not an input, not an existing file without --overwrite, writable,
    and no two the same. (Checked again, atomically, at the moment each is written.)"""
    paths = [] if output is None else [output]
    if output is not None and output.suffix.lower() == ".onnx":
        paths.append(output.with_name(output.name + ".data"))
    paths += [Path(p) for p in (args.report, args.plot) if p]
    seen = {}
    for path in paths:
        key = os.path.abspath(path)
        if key in seen:
            raise UsageError(f"{seen[key]} and {path} are the same file: give each output its own path")
        seen[key] = path
        check_target(path)
    if args.emit_kernels:
        d = Path(args.emit_kernels)
        if d.exists() and not d.is_dir():
            raise InputError(f"--emit-kernels {d}: it is a file, not a folder")
        if os.path.abspath(d) in seen:
            raise UsageError(f"--emit-kernels {d} is also another output's path")


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    known = VARIANT_NAMES + plugin_variants() if args.variant else VARIANT_NAMES
    if args.variant and args.variant.replace("_", "-") not in known:
        raise UsageError(f"argument --variant: invalid choice: '{args.variant}' "
                         f"(choose from {', '.join(sorted(known))})")
    variant = args.variant
    listing = args.list or variant is None
    options = parse_options(args.options)
    if listing and (options or args.output or args.calibrate):
        raise UsageError("--set, -o and --calibrate need --variant")
    if args.calibrate < 0:
        raise UsageError("--calibrate N needs N ≥ 0")
    if args.tolerance is not None and not (math.isfinite(args.tolerance) and args.tolerance >= 0):
        raise UsageError(f"--tolerance {args.tolerance} must be a finite number ≥ 0")
    if (args.emit_kernels or args.target) and listing:
        raise UsageError("--emit-kernels and --target need --variant")
    if args.target and not args.emit_kernels:
        raise UsageError("--target needs --emit-kernels DIR")
    if args.target and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise UsageError("--target compiles for a GPU: run it without TRITON_INTERPRET=1")
    check_environment()
    with write_rules(overwrite=args.overwrite, protected=protected_paths(args)):
        check_outputs(args, Path(args.output) if args.output and not listing else None)

    from rich.console import Console      # the heavy imports, now that the command is known
    from . import pipeline
    from .frontends.export import import_modules, read_inputs
    _quiet(args.verbose)                   # after torch's import, which sets its loggers' levels
    if variant:
        variant = pipeline.variant_module(variant)      # the name, resolved once: the object from here on
        pipeline.validate_options(variant, options, args.tolerance)

    err = Console(stderr=True)
    out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
    import_modules(args.imports)
    t0 = time.perf_counter()
    with err.status("loading the model…"):
        is_onnx = bool(args.model) and args.model.lower().endswith(".onnx")
        inputs = args.inputs if is_onnx else (read_inputs(args.inputs) if args.inputs else None)
        fe = pipeline.open_model(args.model, inputs, trust=args.trust)
    timings = {"load_s": time.perf_counter() - t0}

    with write_rules(overwrite=args.overwrite, protected=protected_paths(args, fe)):
        if listing:
            check_outputs(args, None)
            report, unmatched = pipeline.listing(fe, timings=timings)
            return finish_listing(report, unmatched, args, out, err)
        output = output_path(args, fe, variant.key)
        check_outputs(args, output)
        return rewrite(fe, variant, options, output, timings, args, out, err)


def rewrite(fe, variant, options, output, timings, args, out, err) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from . import pipeline
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task(f"rewriting into {variant.name}", total=None)

        def progress(stage: str, done: int, total: int | None) -> None:
            bar.update(task, description=f"{variant.name}: {stage}", completed=done, total=total)

        result = pipeline.rewrite(fe, variant, options, sites=args.sites, check=not args.no_check,
                                  tolerance=args.tolerance, timings=timings, calibrate=args.calibrate,
                                  progress=progress)
    if args.emit_kernels:
        arch = int(args.target[3:]) if args.target else None
        written = emit_kernels(Path(args.emit_kernels), result.report["sites"], arch)
        err.print(f"wrote {len(written)} kernel file(s) to {args.emit_kernels}")
    return finish_rewrite(result.report, output, lambda path: fe.save(result.program, path), args, out, err)


def emit_kernels(directory: Path, sites: list, arch: int | None) -> list[Path]:
    """kernels.emit into a temporary folder, then each file moved under the write rules
    (none replaces an existing file without --overwrite; all are checked before any is moved)."""
    from . import kernels
    try:
        directory.mkdir(parents=True, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".kernels.", dir=directory)
    except OSError as e:
        raise InputError(f"cannot write kernels to {directory}: {e.strerror or e}") from None
    try:
        made = kernels.emit(staging, sites, arch)
        for f in made:
            check_target(directory / Path(f).name)
        for f in made:
            atomic_write(directory / Path(f).name, lambda tmp, f=f: shutil.copyfile(f, tmp))
        return [directory / Path(f).name for f in made]
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def finish_rewrite(report: dict, output, save, args, out, err) -> int:
    """Write the output (unless the check failed and no --force), print and write the report; exit code."""
    passed = report.get("check", {}).get("passed")
    write = output is not None and (passed is not False or args.force)
    if write:
        save(output)
        report["output"] = str(output)
    _emit(report, args, out)
    _write_extras(report, args)
    if passed is False:
        err.print("check failed: " + ("written anyway (--force)" if write else "nothing written (--force writes it)"))
        return 1
    if write:
        err.print(f"wrote {output}")
    return 0


def finish_listing(report: dict, unmatched: list, args, out, err) -> int:
    """Print (and write) a --list report; with --verbose, why each other softmax is not attention."""
    if args.verbose:
        report["unmatched"] = [{"node": n, "reason": r} for n, r in unmatched]
    _emit(report, args, out)
    if args.verbose and not args.json:
        from rich.markup import escape        # a reason quotes shapes ("[2, 16, 16]"), not markup
        for n, r in unmatched:
            out.print(f"  not attention: {escape(n)}: {escape(r)}")
    if not args.list:
        err.print("hint: pass --variant {exact,…} to rewrite these sites")
    _write_extras(report, args)
    return 0


def _write_extras(report: dict, args) -> None:
    """--report and --plot, under the same write rules as the output."""
    if args.report:
        atomic_write(Path(args.report), lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    if args.plot:
        from .report import plot
        atomic_write(Path(args.plot), lambda tmp: plot(report, tmp))


def _emit(report, args, out):
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        from .report import render_table
        render_table(report, out)


def _signals() -> dict:
    """SIGTERM raises Terminated (a write in progress cleans up); SIGXFSZ is ignored so that a
    file size limit makes the write fail with EFBIG instead of killing the process."""
    saved = {}
    for sig, handler in ((signal.SIGTERM, _terminate), (getattr(signal, "SIGXFSZ", None), signal.SIG_IGN)):
        if sig is None:
            continue
        try:
            saved[sig] = signal.signal(sig, handler)
        except ValueError:                 # not the main thread: leave the signals alone
            pass
    return saved


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verbose = "--verbose" in argv
    saved = _signals()
    try:
        return run(argv)
    except UsageError as e:
        print(f"attnrewrite: usage error: {e} (see attnrewrite --help)", file=sys.stderr)
        return 2
    except BrokenPipeError:                # stdout closed early (| head): not an error
        return 0
    except KeyboardInterrupt:
        print("attnrewrite: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("attnrewrite: terminated", file=sys.stderr)
        return 143
    except InputError as e:
        print(f"attnrewrite: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one line, never a traceback
        if verbose:
            traceback.print_exc()
        first = (str(e).splitlines() or [""])[0]
        print(f"attnrewrite: internal error: {type(e).__name__}: {first} (rerun with --verbose for details)",
              file=sys.stderr)
        return 3
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
