"""Linear layers on pre-packed oneDNN weights, for decoding on a CPU.

Why: on a CPU, a verification step over ``T`` tokens should cost about what a 1-token step
costs once the weights no longer fit in cache — the step streams every weight from memory
once, whatever ``T``. With the plain ``linear`` (MKL) it does not: measured on SmolLM2-135M's
211 weight matrices (538 MB, 1 thread, this 2-core CPU), one pass over all of them took 73 ms
for 1 row, 118 ms for 2, 115 ms for 5 and 150 ms for 13 — MKL packs each weight again on
every call with more than one row, which triples the memory traffic. The same weights
reordered once into oneDNN's blocked layout (``mkldnn._reorder_linear_weight``) took 59-63 ms
for 1 row, 72 ms for 2, 46-56 ms for 5 and 91-97 ms for 13 (``benchmarks/bench_verify_width.py``
has the engine-level figures). That is what makes multi-token strategies pay on this model:
guessing more tokens per step is nearly free.

How: a graph pass (:func:`pack_linears`) rewrites every ``linear(x, W, b)`` of a compiled
decoding graph into ``dynexec::packed_linear(x, W, b)``, a custom op that looks the packed
copy of ``W`` up in a registry keyed by the weight's storage and shape. The weight stays an
input of the graph, so regional compilation still serves every decoder layer with one graph,
and any family whose layers call ``nn.Linear`` is covered without a table of module names.
:class:`PackedWeights` fills the registry for one model; engines of the same model share the
packed copies (reference-counted), which are dropped with the last engine. A weight changed
in place after packing (its version counter moved) is packed again before use; a weight the
registry does not know runs through the plain ``linear`` — never a stale result.

Few rows on AVX2-only CPUs: there, packed weights measured slower than MKL for one row and
gained little for 2-13 (0.82-0.90x), so a linear whose graph has a static count of at most
``skinny.MAX_ROWS`` (20) rows (a decoding step) goes to ``dynexec::skinny_linear`` instead
(:mod:`dynexec_compile.backends.kernels.skinny`): a kernel that streams the plain weight once
for all rows, needs no packed copy and is called directly by Inductor's code. Graphs with more
rows or a dynamic count (the prefill) keep the packed weights. The kernel serves bf16 weights
too, which oneDNN cannot pack on those CPUs; their many-row products go to
:func:`widened_linear` (the fp32 GEMM on widened copies), faster there than PyTorch's own bf16
GEMM. torchao's int8 weight-only layers are rewritten after Inductor's decomposition
(:class:`~dynexec_compile.backends.inductor_passes.WidenQuantizedWeights`), and an int8 LM head
run eagerly goes through :func:`_int8_linear`.

What it costs: memory for one packed copy of every linear weight of the model (the model's
own weights are not modified), and the packing itself at engine construction (~1 s for
SmolLM2). oneDNN sums in another order than MKL: logits equal the plain ``linear``'s up to
fp32 rounding (1e-6 absolute on SmolLM2's layers), like Inductor's own kernels.
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from dynexec_compile.backends.kernels import skinny

# oneDNN chooses the packed layout for this many rows; measured on SmolLM2's weights, a layout
# chosen for 16 rows serves 1-row steps as well as one chosen for 1 row, and wide steps far better.
PACK_ROWS = 16
# One-row products (1-token decode steps at batch 1) through the packed copy only on CPUs with
# AVX-512. Measured on SmolLM2-135M, fp32, 1 thread (benchmarks/bench_verify_width.py): on an
# AVX-512 Intel CPU a 1-token step took 59-63 ms packed vs 73 ms plain; on an AVX2-only AMD EPYC
# 61.9 ms packed vs 51.4 ms plain, while 2-13-token steps were 0.82-0.90x of plain there too.
ONE_ROW_PACKED = torch.backends.cpu.get_cpu_capability().startswith("AVX512")


@dataclass
class _Entry:
    packed: torch.Tensor
    version: int
    refs: int


_REGISTRY: dict[tuple, _Entry] = {}


def _key(weight: torch.Tensor) -> tuple:
    return (weight.untyped_storage().data_ptr(), weight.storage_offset(), tuple(weight.shape), tuple(weight.stride()), weight.dtype)


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS)


def available() -> bool:
    """oneDNN's packed linear exists in this build of PyTorch."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def packable(weight: torch.Tensor) -> bool:
    """A plain 2-D fp32 CPU weight, or bf16 on a CPU where oneDNN has a bf16 path (AVX-512 or
    AVX-NE-CONVERT: :func:`_onednn_bf16`), that oneDNN can pack; anything else (a torchao
    quantized weight, bf16 on an AVX2-only CPU) keeps the plain ``linear`` and its own kernels."""
    if not _plain_cpu(weight) or weight.ndim != 2:
        return False
    return weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and _onednn_bf16())


def _plain_cpu(tensor: torch.Tensor) -> bool:
    """A CPU tensor that is not a tensor subclass (such as torchao's quantized weights)."""
    return tensor.device.type == "cpu" and not is_traceable_wrapper_subclass(tensor)


@functools.cache
def _onednn_bf16() -> bool:
    """oneDNN has a bf16 path on this CPU (AVX-512 or AVX-NE-CONVERT)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _few_rows(x: torch.Tensor) -> bool:
    """``x`` multiplies at most :data:`~dynexec_compile.backends.kernels.skinny.MAX_ROWS` rows."""
    return x.numel() <= skinny.MAX_ROWS * x.shape[-1]


class PackedWeights:
    """Packed copies of every ``nn.Linear`` weight of ``model`` in the registry, for as long as
    this object lives. The model is not modified.

    Attributes:
        count: linear weights packed (or shared with another engine's packing).
        nbytes: bytes of packed copies this object holds a reference to.
    """

    def __init__(self, model: nn.Module):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        ok = isinstance(head, nn.Linear) and (packable(head.weight) or _skinny(head.weight) or _weight_only_int8(head.weight))
        self._head = head if ok else None
        if not available():
            raise RuntimeError("packed linear weights need PyTorch built with oneDNN (torch.backends.mkldnn)")
        keys: list[tuple] = []
        seen: set[tuple] = set()
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if not isinstance(module, nn.Linear) or weight is None or not packable(weight):
                continue
            key = _key(weight)
            if key in seen:  # tied weights: one packed copy
                continue
            seen.add(key)
            entry = _REGISTRY.get(key)
            if entry is None:
                _REGISTRY[key] = entry = _Entry(_pack(weight), weight._version, 0)
            entry.refs += 1
            keys.append(key)
        self.count = len(keys)
        self.nbytes = sum(_REGISTRY[k].packed.numel() * _REGISTRY[k].packed.element_size() for k in keys)
        weakref.finalize(self, _release, keys)

    @contextlib.contextmanager
    def head_installed(self) -> Iterator[None]:
        """For the block, calls of the model's LM head go through :func:`packed_linear`: for
        steps whose code around the compiled layers runs eagerly (regional compilation), where
        no graph pass sees the head. The module is restored after."""
        head = self._head
        if head is None:
            yield
            return
        saved = head._compiled_call_impl
        if _weight_only_int8(head.weight):
            head._compiled_call_impl = lambda x: _int8_linear(x, head.weight, head.bias)
        else:
            head._compiled_call_impl = lambda x: packed_linear(x, head.weight, head.bias)
        try:
            yield
        finally:
            head._compiled_call_impl = saved


def _release(keys: list[tuple]) -> None:
    for key in keys:
        entry = _REGISTRY.get(key)
        if entry is not None:
            entry.refs -= 1
            if entry.refs <= 0:
                del _REGISTRY[key]


@torch.library.custom_op("dynexec::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: through ``dynexec::skinny_linear`` for few rows where
    :func:`_skinny` says so (the eagerly run LM head of :meth:`PackedWeights.head_installed`),
    else through the packed copy of ``weight`` when the registry has one (packed again first if
    ``weight`` changed in place), else the plain ``linear``."""
    if x.dtype == weight.dtype and _few_rows(x) and _skinny(weight):
        return torch.ops.dynexec.skinny_linear.default(x, weight, bias)
    entry = _REGISTRY.get(_key(weight)) if x.dtype == weight.dtype else None
    if entry is None:
        return widened_linear(x, weight, bias) if x.dtype == weight.dtype and _widens(weight) else F.linear(x, weight, bias)
    if entry.version != weight._version:
        entry.packed, entry.version = _pack(weight), weight._version
    rows = x.reshape(-1, x.shape[-1])  # [N, in]
    out = torch.ops.mkldnn._linear_pointwise(rows.contiguous(), entry.packed, bias, "none", [], "")  # [N, out]
    return out.reshape(*x.shape[:-1], weight.shape[0])


@packed_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


_LINEARS = (torch._C._nn.linear, F.linear)
_MATMULS = (torch.matmul, torch.Tensor.matmul, torch.bmm)


def pack_linears(gm: torch.fx.GraphModule) -> int:
    """Rewrite every ``linear`` of a Dynamo graph whose weight is :func:`packable` into
    ``dynexec::skinny_linear`` (static row count of at most
    :data:`~dynexec_compile.backends.kernels.skinny.MAX_ROWS`, where :func:`_skinny` says so) or
    ``dynexec::packed_linear`` (not one-row linears where :data:`ONE_ROW_PACKED` is false: the
    custom op's call would only add overhead); returns how many. Edits ``gm`` in place."""
    count = 0
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method") and node.target in (*_MATMULS, "matmul", "bmm"):
            count += _widen_matmul(node)
            continue
        if node.op != "call_function" or node.target not in _LINEARS:
            continue
        args = list(node.args) + [None] * (3 - len(node.args))
        x, weight, bias = args[0], node.kwargs.get("weight", args[1]), node.kwargs.get("bias", args[2])
        value = weight.meta.get("example_value") if isinstance(weight, torch.fx.Node) else None
        if value is None:
            continue
        rows = _static_rows(x)
        if _skinny(value) and rows is not None and rows <= skinny.MAX_ROWS:
            node.target = torch.ops.dynexec.skinny_linear.default
        elif _widens(value):
            node.target = widened_linear
        elif not packable(value) or (rows == 1 and not ONE_ROW_PACKED):
            continue
        else:
            node.target = torch.ops.dynexec.packed_linear.default
        node.args, node.kwargs = (x, weight, bias), {}
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def _static_rows(x: object) -> int | None:
    """The number of rows ``x`` multiplies (the product of its leading dimensions), or ``None``
    when a dimension is symbolic (a dynamic-shape prefill graph) or unknown."""
    value = x.meta.get("example_value") if isinstance(x, torch.fx.Node) else None
    if value is None or value.ndim == 0 or not all(isinstance(d, int) for d in value.shape[:-1]):
        return None
    return math.prod(value.shape[:-1])


def _skinny(weight: torch.Tensor) -> bool:
    """Products with ``weight`` of at most :data:`~dynexec_compile.backends.kernels.skinny.MAX_ROWS`
    rows go to ``dynexec::skinny_linear``: a contiguous fp32 or bf16 CPU weight (not a tensor
    subclass such as torchao's) on a CPU where that kernel is preferred and could be built."""
    return (
        weight.dtype in (torch.float32, torch.bfloat16)
        and _plain_cpu(weight)
        and weight.ndim == 2
        and weight.is_contiguous()
        and skinny.available()
    )


def widened_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` of bf16 tensors as PyTorch defines it on the CPU (fp32 sums, each output
    rounded to bf16 once), computed by the fp32 GEMM on widened copies. Where oneDNN has no bf16
    path (AVX2-only CPUs), PyTorch's own bf16 linear measured 3.4-6.7x slower than this for
    16-256 rows of a 576 x 1536 weight (1 thread, an AVX2 AMD EPYC): the prefill's linears."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


def widened_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.matmul`` of bf16 tensors as PyTorch defines it on the CPU (fp32 sums, rounded to
    bf16 once), on the fp32 kernels: attention's products over the prompt, which PyTorch's own
    bf16 matmul computes several times slower where oneDNN has no bf16 path (AVX2)."""
    return torch.matmul(a.float(), b.float()).to(a.dtype)


def _widen_matmul(node: torch.fx.Node) -> int:
    """Send a ``matmul`` / ``bmm`` node of two bf16 CPU tensors to :func:`widened_matmul` where
    oneDNN has no bf16 path; 1 if rewritten."""
    values = [a.meta.get("example_value") if isinstance(a, torch.fx.Node) else None for a in node.args[:2]]
    if len(values) != 2 or node.kwargs or not all(isinstance(v, torch.Tensor) and _widens(v) for v in values):
        return 0
    node.op, node.target = "call_function", widened_matmul
    return 1


def _widens(tensor: torch.Tensor) -> bool:
    """A plain bf16 CPU tensor on a CPU where oneDNN has no bf16 path (AVX2-only): its products
    go through :func:`widened_linear` / :func:`widened_matmul` (beyond the skinny kernel's rows)."""
    return tensor.dtype == torch.bfloat16 and _plain_cpu(tensor) and not _onednn_bf16()


def _weight_only_int8(weight: torch.Tensor) -> bool:
    """A torchao int8 weight-only weight (``Int8Tensor``, no activation quantization, one scale
    per row or one for all) whose int8 data ``dynexec::skinny_linear`` can stream."""
    qdata = getattr(weight, "qdata", None)
    return (
        type(weight).__name__ == "Int8Tensor"
        and getattr(weight, "act_quant_kwargs", None) is None
        and getattr(weight, "act_pre_scale", None) is None
        and isinstance(qdata, torch.Tensor)
        and qdata.dtype == torch.int8
        and qdata.ndim == 2
        and qdata.is_contiguous()
        and qdata.device.type == "cpu"
        and list(getattr(weight, "block_size", ()))[-1:] == [qdata.shape[-1]]
        and skinny.available()
    )


def _int8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """torchao's int8 weight-only linear, ``(x @ q.T) * scale (+ bias)``, its product on
    ``dynexec::skinny_linear`` for at most ``skinny.MAX_ROWS`` rows (torchao's own path beyond)."""
    if not _few_rows(x) or x.dtype not in (torch.float32, torch.bfloat16):
        return F.linear(x, weight, bias)
    y = torch.ops.dynexec.skinny_linear.default(x, weight.qdata, None)
    y = y * weight.scale.to(y.dtype).flatten()
    return y if bias is None else y + bias


def packing_backend(backend):  # noqa: ANN001, ANN201 - a torch.compile backend in, one out
    """``backend`` (a callable ``(gm, example_inputs) -> fn``) behind :func:`pack_linears`."""

    def compile_packed(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        pack_linears(gm)
        return backend(gm, example_inputs)

    return compile_packed


__all__ = [
    "PACK_ROWS", "PackedWeights", "available", "pack_linears", "packable", "packed_linear", "packing_backend",
    "widened_linear", "widened_matmul",
]
