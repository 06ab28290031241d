"""The TensorRT lowering, through torch-tensorrt's dynamo backend (optional extra).

torch-tensorrt converts static FX graphs; dynexec hands it one stage at a time, which is why
the decisions live between stages and not in ``torch.cond`` (which it does not convert).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx

INSTALL_HINT = (
    "install it with `pip install 'dynexec_compile[tensorrt]'` (torch-tensorrt matching your "
    "torch and CUDA versions) on a machine with an NVIDIA GPU, or use lowering='inductor'"
)


def tensorrt_available() -> tuple[bool, str]:
    """Whether TensorRT lowering can run here, and if not, why."""
    try:
        import torch_tensorrt  # noqa: F401
    except ImportError:
        return False, f"lowering='tensorrt' needs the torch-tensorrt package, which is not installed: {INSTALL_HINT}"
    if not torch.cuda.is_available():
        return False, f"lowering='tensorrt' needs CUDA, which is not available on this machine: {INSTALL_HINT}"
    return True, ""


def check_tensorrt() -> None:
    ok, why = tensorrt_available()
    if not ok:
        raise RuntimeError(f"dynexec: {why}")


def lower_tensorrt(gm: fx.GraphModule, example_inputs: Sequence):
    check_tensorrt()
    import torch_tensorrt  # noqa: F401  (registers the "torch_tensorrt" dynamo backend)

    backend = torch._dynamo.lookup_backend("torch_tensorrt")
    return backend(gm, list(example_inputs))
