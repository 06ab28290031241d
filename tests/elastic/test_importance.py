"""head_importance: shapes, the Taylor score is the true gate derivative, the activation
score is the true contribution norm, and the user's model comes back untouched."""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_batch, tiny_bert, tiny_gpt2, tiny_llama

from dynexec_compile.elastic import find_blocks, head_importance
from dynexec_compile.elastic.arch import in_dim


def test_shapes_for_every_arch_and_method(arch_model):
    name, model = arch_model
    blocks = find_blocks(model)
    batch = make_batch()
    loss_fn = (
        (lambda out, b: out.last_hidden_state.pow(2).mean(-1).sum()) if name == "bert" else None
    )
    for method in ("taylor", "activation"):
        imp = head_importance(model, [batch, batch], method=method, loss_fn=loss_fn, progress=False)
        assert imp.heads.shape == (len(blocks), blocks[0].num_heads)
        assert imp.neurons.shape == (len(blocks), blocks[0].num_neurons)
        assert imp.layers.shape == (len(blocks),)
        assert imp.num_examples == 6 and imp.method == method
        assert torch.isfinite(imp.heads).all() and (imp.heads > 0).all()
        assert (imp.neurons >= 0).all() and (imp.layers > 0).all()


def _next_token_loss(out, batch):
    """Next-token cross-entropy of a one-example batch, in the logits' dtype (float64 here)."""
    return F.cross_entropy(out.logits[0, :-1], batch["input_ids"][0, 1:])


def _loss(model, batch):
    with torch.no_grad():
        return _next_token_loss(model(**batch), batch).item()


def _finite_difference(model, batch, module, cols, eps=1e-3):
    """dL/dg for a gate scaling input features ``cols`` of ``module`` (central difference)."""
    w = module.weight.transpose(0, in_dim(module))  # [in, out] view of the weight
    orig = w.detach().clone()
    with torch.no_grad():
        w[cols] = orig[cols] * (1 + eps)
    plus = _loss(model, batch)
    with torch.no_grad():
        w[cols] = orig[cols] * (1 - eps)
    minus = _loss(model, batch)
    with torch.no_grad():
        w.copy_(orig)
    return (plus - minus) / (2 * eps)


def test_taylor_score_is_the_gate_derivative():
    model = tiny_gpt2().double()  # float64 end to end (LLaMA's RMSNorm computes in float32)
    batch = make_batch(batch=1, pad=False)
    imp = head_importance(model, [batch], method="taylor", loss_fn=_next_token_loss, progress=False)
    spec = find_blocks(model)[1]
    down = model.get_submodule(spec.neuron_out)
    for neuron in (0, 17, 95):
        fd = _finite_difference(model, batch, down, [neuron])
        assert imp.neurons[1, neuron].item() == pytest.approx(abs(fd), rel=1e-5)
    o_proj = model.get_submodule(spec.head_out)
    for head in (0, 5):
        cols = list(range(head * spec.head_dim, (head + 1) * spec.head_dim))
        fd = _finite_difference(model, batch, o_proj, cols)
        assert imp.heads[1, head].item() == pytest.approx(abs(fd), rel=1e-5)


def test_activation_score_is_the_head_contribution_norm():
    model = tiny_bert()
    batch = make_batch()
    spec = find_blocks(model)[0]
    dense = model.get_submodule(spec.head_out)
    seen = []
    handle = dense.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    imp = head_importance(model, [batch], method="activation", progress=False)
    handle.remove()
    ctx = seen[0]  # [B, S, H*d]
    mask = batch["attention_mask"].bool()  # [B, S]
    d = spec.head_dim
    for head in range(spec.num_heads):
        block = slice(head * d, (head + 1) * d)
        contrib = ctx[..., block] @ dense.weight[:, block].T  # [B, S, D]
        want = contrib.norm(dim=-1)[mask].mean()
        assert imp.heads[0, head].item() == pytest.approx(want.item(), rel=1e-4)


def test_without_labels_the_self_prediction_loss_gives_nonzero_scores():
    model = tiny_llama()
    imp = head_importance(model, [make_batch()], method="taylor", progress=False)
    assert (imp.heads > 0).all() and (imp.layers > 0).all()


def test_model_is_not_modified():
    model = tiny_llama().train()
    model.model.embed_tokens.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grad_flags = {k: p.requires_grad for k, p in model.named_parameters()}
    batch = make_batch()
    head_importance(model, [batch], method="taylor", progress=False)
    head_importance(model, [batch], method="activation", progress=False)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, p in model.named_parameters():
        assert p.requires_grad == grad_flags[k], k
        assert p.grad is None, k
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_bad_inputs_are_rejected():
    model = tiny_bert()
    with pytest.raises(ValueError, match="method"):
        head_importance(model, [make_batch()], method="magnitude", progress=False)
    with pytest.raises(ValueError, match="loss_fn"):
        head_importance(model, [make_batch()], method="taylor", progress=False)
    with pytest.raises(TypeError, match="calibration batch"):
        head_importance(model, [[1, 2, 3]], method="activation", progress=False)
    with pytest.raises(ValueError, match="no calibration batches"):
        head_importance(model, [], method="activation", progress=False)
    with pytest.raises(ValueError, match="no transformer block"):
        head_importance(torch.nn.Linear(3, 3), [make_batch()], progress=False)


def test_pairs_send_their_target_to_loss_fn_only():
    model = tiny_bert()
    probe = torch.nn.Linear(48, 2)
    labels = torch.tensor([0, 1, 1])

    def probe_loss(out, target):
        pooled = out.last_hidden_state.mean(1)  # [B, D]
        return F.cross_entropy(probe(pooled), target, reduction="sum")

    imp = head_importance(model, [(make_batch(), labels)], loss_fn=probe_loss, progress=False)
    assert imp.num_examples == 3 and (imp.heads > 0).all() and (imp.neurons > 0).any()
