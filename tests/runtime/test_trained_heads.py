"""Trained exit heads lowered like the stages: the traced graph equals the head, compiled once."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

import hf_models as H
from dynexec_compile import ExitHeads, attach_exit_heads
from dynexec_compile.backend import dynexec_backend
from dynexec_compile.backends import StageLowerer
from dynexec_compile.config import DynexecConfig
from dynexec_compile.runtime.stats import last_stats
from dynexec_compile.runtime.trained_heads import head_graph


def symbolic_batch(mode: FakeTensorMode, t: torch.Tensor) -> torch.Tensor:
    dims = [DimDynamic.DYNAMIC] + [DimDynamic.STATIC] * (t.dim() - 1)
    return mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))


@pytest.mark.parametrize("kind", ["cls_tanh", "mean_tanh", "last_token_rmsnorm"])
@pytest.mark.parametrize("with_mask", [True, False])
def test_head_graph_equals_the_head_at_every_batch_size(kind, with_mask):
    heads = ExitHeads([0, 1], hidden_size=32, num_labels=3, kind=kind).eval()
    mode = FakeTensorMode(shape_env=ShapeEnv())
    hidden = symbolic_batch(mode, torch.randn(5, 7, 32))
    mask = symbolic_batch(mode, torch.ones(5, 7, dtype=torch.long)) if with_mask else None
    gm, examples, params = head_graph(heads.head(1), hidden, mask)
    assert len(examples) == len(params) + 1 + with_mask
    for batch in (5, 3, 1):  # the batch stays symbolic: any size runs the same graph
        h = torch.randn(batch, 7, 32)
        m = torch.ones(batch, 7, dtype=torch.long)
        m[0, 4:] = 0
        out = gm(*params, h, *([m] if with_mask else []))[0]
        ref = heads.exit_logits(1, h, m if with_mask else None)
        assert out.shape == (batch, 3)
        assert (out - ref).abs().max().item() <= 1e-6


def test_all_heads_of_a_model_share_one_compile():
    heads = ExitHeads([0, 1, 2], hidden_size=32, num_labels=2, kind="mean_tanh").eval()
    mode = FakeTensorMode(shape_env=ShapeEnv())
    hidden = symbolic_batch(mode, torch.randn(4, 6, 32))
    mask = symbolic_batch(mode, torch.ones(4, 6, dtype=torch.long))
    lowerer = StageLowerer(DynexecConfig(lowering="eager"))
    for layer in heads.layers:
        gm, examples, _ = head_graph(heads.head(layer), hidden, mask)
        lowerer(gm, examples)
    assert (lowerer.compiled, lowerer.reused) == (1, 2)


@pytest.mark.slow
def test_inductor_lowered_heads_equal_eager_with_compaction_and_no_recompile():
    model = H.classifier("bert")
    heads = ExitHeads([0, 1], hidden_size=32, num_labels=2, kind="mean_tanh").eval()
    attach_exit_heads(model, heads)
    batches = [H.encoder_inputs(batch=b, seq=8, pad_last=2, seed=b) for b in (6, 4, 7)]
    with torch.no_grad():  # a threshold that splits the first batch at the first exit
        hidden = model(**batches[0], output_hidden_states=True).hidden_states[1]
        p = heads.exit_logits(0, hidden, batches[0]["attention_mask"]).softmax(-1)
        threshold = (-(p * p.log()).sum(-1)).median().item() + 1e-7
    options = {"strict": True, "early_exit": {"rule": "entropy", "threshold": threshold, "heads": "trained"}}
    results = {}
    for lowering in ("eager", "inductor"):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend(lambda gm, ex, lw=lowering: dynexec_backend(gm, ex, options={**options, "lowering": lw}))
        c = torch.compile(model, backend=counter)
        outs = []
        for b in batches:
            inputs = {k: v.clone() for k, v in b.items()}
            for v in inputs.values():
                torch._dynamo.mark_dynamic(v, 0)
            with torch.no_grad():
                outs.append((c(**inputs).logits, last_stats()["exit_layer"], last_stats()["compaction"]))
        assert counter.frame_count == 1  # shrinking and new batch sizes: one compile
        results[lowering] = outs
    exits = results["eager"][0][1]
    assert 0 < exits.count(0) < 6
    for (eager, e_exits, _), (ind, i_exits, compaction) in zip(results["eager"], results["inductor"]):
        assert compaction and i_exits == e_exits
        assert (ind - eager).abs().max().item() <= 1e-5
