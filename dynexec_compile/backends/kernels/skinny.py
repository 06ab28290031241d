"""``dynexec::skinny_linear``: a linear for the few rows of a decoding step, on AVX2 CPUs: fp32,
bf16, and int8 weight-only quantized weights.

Why: a decoding step at batch 1 multiplies 1 to ~16 rows (the step's tokens) by every weight
matrix of the model. Once the weights no longer fit in cache (SmolLM2-135M: 538 MB in fp32),
the step is bound by streaming them from memory, and ``T`` rows should cost about what 1 row
costs. On an AVX2-only AMD EPYC (1 thread, all 211 weight matrices of SmolLM2, one pass each;
a floor of 44 ms is ``w.sum()`` over the same weights) MKL's ``linear`` took 47 ms for 1 row,
83 for 2, 100 for 5 and 132 for 13: it re-packs the weight on every call with more than one
row. A prototype of this kernel (the same inner loop) streamed each weight once for all rows:
40 ms for 1 row, 42 for 2, 49 for 5, 69 for 8 and 107 for 13. In SmolLM2's engine (session 13,
``benchmarks/bench_verify_width.py --kernels packed,skinny``) a step of 5 tokens costs 1.10x a
1-token step, 8 tokens 1.32x, 13 1.57x and 16 1.80x, against 1.81x, 1.93x, 2.29x and 2.44x on
oneDNN's packed weights.
On that CPU oneDNN's pre-packed weights (:mod:`dynexec_compile.backends.packed`) were slower
than MKL for one row and 0.82-0.90x of it for 2-13.

bf16 and int8 weights are streamed narrow (half and a quarter of the fp32 bytes) and widened
in registers; sums are fp32 (a bf16 output is rounded once, as PyTorch's bf16 linear does; an
int8 weight is multiplied as its integer values and the caller applies torchao's per-row
scales after, as torchao does). On that CPU without a bf16 GEMM, one pass over SmolLM2's
weights (1 thread, ``benchmarks/bench_skinny_pass.py``, session 12) took, for 1 / 3 / 5 / 8
rows: bf16 49 / 62 / 95 / 115 ms against 54 / 124 / 175 / 296 for PyTorch's bf16 ``linear``;
int8 29 / 37 / 68 / 100 ms against 178 / 270 / 249 / 255 for torchao's widen-then-multiply
product; fp32 67 / 76 / 73 / 102 ms against MKL's 84 / 176 / 164 / 175 in the same run.

How: ``skinny_linear.cpp`` next to this file, compiled on first use with the C++ compiler
Inductor uses on the CPU (``$CXX``, else ``g++``) against this PyTorch's headers, into
``$DYNEXEC_CACHE/kernels`` (one file per source, flags and PyTorch version; ~15 s once), and
loaded as a PyTorch operator, so Inductor's generated code calls it directly (8 us per call,
like ``linear``; a Python custom op costs ~37 us, which over 211 calls a step eats the gain).
:func:`available` says whether it can be used here; where it cannot (no compiler, no AVX2, a
build error) callers keep the plain ``linear`` — the op is an optimisation, never a
requirement. Sums run in another order than MKL's: results equal ``linear`` up to fp32
rounding, like oneDNN's and Inductor's own kernels.

Where it is used: :func:`dynexec_compile.backends.packed.pack_linears` routes every fp32 or
bf16 linear of a decoding graph with a static count of at most :data:`MAX_ROWS` rows here, and
:class:`~dynexec_compile.backends.inductor_passes.WidenQuantizedWeights` every torchao int8
weight-only product of as few rows, on CPUs whose best instruction set PyTorch reports as AVX2
(:data:`PREFERRED`), where it was measured.
On AVX-512 CPUs the oneDNN packed weights were measured faster than MKL for every width and
stay in use; this kernel has not been measured there.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("skinny_linear.cpp")
# Rows per call up to which the kernel is used. One pass over SmolLM2's weights on the AVX2 CPU
# (session 13, fp32) took 45 / 47 / 45 / 61 / 62 / 89 / 113 ms for 1 / 3 / 5 / 8 / 12 / 16 / 20
# rows against MKL's 50 / 107 / 96 / 100 / 107 / 128 / 142; bf16 and int8 gain more. Past ~5
# rows it is bound by arithmetic (~65 GFLOP/s, 80% of MKL's peak on a large GEMM here), so a
# prefill of hundreds of rows stays with the GEMM libraries.
MAX_ROWS = 20
PREFERRED = torch.backends.cpu.get_cpu_capability() == "AVX2"


def _flags() -> list[str]:
    from torch.utils import cpp_extension

    torch_lib = str(Path(torch.__file__).parent / "lib")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    return ["-O3", "-mavx2", "-mfma", "-std=c++20", "-fPIC", "-shared", abi, *includes,
            f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}", "-ltorch_cpu", "-lc10"]


def _library_path(compiler: str, flags: list[str]) -> Path:
    from dynexec_compile.models import dynexec_cache_dir

    digest = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, *flags, torch.__version__]).encode()).hexdigest()[:16]
    return dynexec_cache_dir() / "kernels" / f"skinny_linear-{digest}.so"


def _build(compiler: str, flags: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([compiler, str(SOURCE), "-o", str(built), *flags], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {SOURCE.name}:\n{result.stderr[-2000:]}")
        os.replace(built, target)  # atomic: a concurrent loader sees the whole file or none


@functools.cache
def load() -> bool:
    """Build (once per machine) and load the operator; ``False``, with a warning in the log, if
    it cannot be built here. Raises nothing."""
    if not torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512")):
        log.info("dynexec::skinny_linear needs AVX2 and FMA; this CPU reports %s", torch.backends.cpu.get_cpu_capability())
        return False
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        log.warning("dynexec::skinny_linear not built: no C++ compiler %r on PATH (set CXX); decoding uses the plain linear", compiler)
        return False
    try:
        flags = _flags()
        path = _library_path(compiler, flags)
        if not path.exists():
            log.info("building dynexec::skinny_linear into %s (once, ~15 s)", path)
            _build(compiler, flags, path)
        torch.ops.load_library(str(path))
    except (RuntimeError, OSError) as err:
        log.warning("dynexec::skinny_linear not available, decoding uses the plain linear: %s", err)
        return False
    torch.library.register_fake("dynexec::skinny_linear")(_fake)
    return True


def _fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def available() -> bool:
    """The kernel is preferred on this CPU (:data:`PREFERRED`) and could be built and loaded."""
    return PREFERRED and load()


__all__ = ["MAX_ROWS", "PREFERRED", "available", "load"]
