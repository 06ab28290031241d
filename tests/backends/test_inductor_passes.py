"""The joint-graph pass that makes frozen matmul weights row-major."""

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from dynexec_compile.backends.inductor_passes import ContiguousWeightsForFreezing

aten = torch.ops.aten


def layer(x, h, w_o, w_q, w_k, bias):
    o = torch.mm(x, w_o.t())  # alone: gets a contiguous copy
    q = torch.mm(h, w_q.t())  # q and k share h: left for concat_linear
    k = torch.addmm(bias, h, w_k.permute(1, 0))
    return o, q, k


def test_only_lone_transposed_weights_get_a_contiguous_copy():
    args = (torch.randn(1, 8), torch.randn(1, 8), torch.randn(4, 8), torch.randn(4, 8), torch.randn(6, 8), torch.randn(6))
    gm = make_fx(layer)(*args)
    expected = gm(*args)
    ContiguousWeightsForFreezing()(gm.graph)
    gm.recompile()
    clones = [n for n in gm.graph.nodes if n.target is aten.clone.default]
    assert len(clones) == 1
    assert clones[0].kwargs["memory_format"] == torch.contiguous_format
    (matmul,) = clones[0].users
    assert matmul.target is aten.mm.default and matmul.args[0].name == "x_1"
    for got, want in zip(gm(*args), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)  # another GEMV kernel, another rounding


def test_uuid_is_stable():
    assert ContiguousWeightsForFreezing().uuid() == ContiguousWeightsForFreezing().uuid()
