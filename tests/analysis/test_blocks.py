"""Block analysis on the Dynamo graphs of every supported family."""

import copy
import functools

import pytest
import torch

import hf_models as H
from dynexec_compile.analysis.blocks import analyze_blocks, to_networkx


def dynamo_graph(model, **inputs):
    graphs = []

    def grab(gm, example_inputs, **kwargs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=grab, fullgraph=True)(**inputs)
    assert len(graphs) == 1
    return graphs[0]


@functools.cache
def encoder_graph(family):
    """Traced once per family (tracing costs seconds); tests must not edit the result."""
    return dynamo_graph(H.classifier(family), **H.encoder_inputs(pad_last=2))


@functools.cache
def decoder_graph(family):
    return dynamo_graph(H.causal_lm(family), input_ids=torch.randint(3, H.VOCAB, (2, 6)), use_cache=True)


CLASS_OF = {
    "bert": "BertLayer", "roberta": "RobertaLayer", "albert": "AlbertLayerGroup", "distilbert": "TransformerBlock",
    "llama": "LlamaDecoderLayer", "gpt2": "GPT2Block", "qwen2": "Qwen2DecoderLayer",
}


@pytest.mark.parametrize("family", H.ENCODERS + H.DECODERS)
def test_blocks_found_from_module_stack(family):
    gm = encoder_graph(family) if family in H.ENCODERS else decoder_graph(family)
    a = analyze_blocks(gm)
    assert a.method == "nn_module_stack"
    assert a.num_blocks == 3
    assert {b.module_class for b in a.blocks} == {CLASS_OF[family]}
    # every boundary passes exactly one hidden state [B, S, D] from block i to block i + 1
    for boundary in a.boundaries:
        (hidden,) = boundary.of_kind("hidden_state")
        assert hidden.shape[0] == 2 and hidden.shape[-1] == 32
        assert a.stage_of[hidden.node] == boundary.after_block + 1
    # stages only ever read earlier stages
    for node, stage in a.stage_of.items():
        assert all(a.stage_of.get(i, 0) <= stage for i in node.all_input_nodes)


def test_albert_shared_layer_is_three_calls_of_one_module():
    a = analyze_blocks(encoder_graph("albert"))
    paths = [b.module_path for b in a.blocks]
    assert paths == ["albert.encoder.albert_layer_groups.0", "albert.encoder.albert_layer_groups.0@1", "albert.encoder.albert_layer_groups.0@2"]


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_encoder_boundaries_carry_the_attention_mask(family):
    a = analyze_blocks(encoder_graph(family))
    for boundary in a.boundaries[:-1]:
        assert boundary.of_kind("attention_mask"), [v.describe() for v in boundary.live_values]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rotary_and_kv_cross_boundaries(family):
    a = analyze_blocks(decoder_graph(family))
    first, last = a.boundaries[0], a.boundaries[-1]
    assert len(first.of_kind("rotary")) == 2  # cos and sin, computed once in the prefix
    assert all(a.stage_of[v.node] == 0 for v in first.of_kind("rotary"))
    # each block returns its keys and values: after block i, 2 * (i + 1) KV tensors are live
    assert len(first.of_kind("kv_cache")) == 2
    assert len(last.of_kind("kv_cache")) == 2 * a.num_blocks
    assert first.of_kind("kv_cache")[0].shape == (2, 2, 6, 8)  # grouped-query: 2 KV heads


def test_gpt2_kv_without_rotary():
    a = analyze_blocks(decoder_graph("gpt2"))
    assert not a.boundaries[0].of_kind("rotary")
    assert len(a.boundaries[-1].of_kind("kv_cache")) == 2 * a.num_blocks


@pytest.mark.parametrize("family", ["bert", "albert", "llama", "gpt2"])
def test_structural_fallback_agrees_with_module_stack(family):
    gm = copy.deepcopy(encoder_graph(family) if family in H.ENCODERS else decoder_graph(family))
    by_stack = analyze_blocks(gm, "nn_module_stack")
    for node in gm.graph.nodes:
        node.meta.pop("nn_module_stack", None)
    assert analyze_blocks(gm, "nn_module_stack").method == "none"
    structural = analyze_blocks(gm)  # auto falls back
    assert structural.method == "structural"
    assert structural.num_blocks == by_stack.num_blocks
    for s, m in zip(structural.boundaries, by_stack.boundaries):
        assert [v.name for v in s.of_kind("hidden_state")] == [v.name for v in m.of_kind("hidden_state")]


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = torch.nn.ModuleList([torch.nn.Conv2d(3, 3, 3, padding=1) for _ in range(3)])
        self.head = torch.nn.Linear(3, 2)

    def forward(self, x):
        for conv in self.convs:
            x = torch.relu(conv(x))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("model, x", [
    (torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)), torch.randn(2, 8)),
    (SmallCNN(), torch.randn(2, 3, 8, 8)),
])
def test_models_without_blocks_are_reported_as_such(model, x):
    graphs = []
    torch.compile(model, backend=lambda gm, ex: graphs.append(gm) or gm.forward)(x)
    a = analyze_blocks(graphs[0])
    assert a.method == "none" and a.blocks == [] and a.boundaries == []


def test_networkx_view_has_every_node_and_edge():
    gm = decoder_graph("llama")
    g = to_networkx(gm)
    assert g.number_of_nodes() == len(gm.graph.nodes)
    assert g.number_of_edges() == sum(len(n.all_input_nodes) for n in gm.graph.nodes)
