"""The backend is found by name through the entry point, in a fresh interpreter that never
imports dynexec_compile itself."""

import subprocess
import sys

SCRIPT = r"""
import sys
import torch, transformers as T
torch.manual_seed(0)
cfg = T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
model = T.BertForSequenceClassification(cfg).eval()
ids = torch.randint(0, 64, (2, 7))
assert "dynexec_compile" not in sys.modules
with torch.no_grad():
    ref = model(input_ids=ids).logits
    out = torch.compile(model, backend="dynexec", options={"lowering": "eager", "partition": "blocks", "strict": True})(input_ids=ids).logits
print("MAXDIFF", (out - ref).abs().max().item())
print("LOADED_BY_ENTRY_POINT", "dynexec_compile" in sys.modules)
"""


def test_compile_by_name_in_fresh_interpreter():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert float(lines["MAXDIFF"]) <= 1e-5
    assert lines["LOADED_BY_ENTRY_POINT"] == "True"


def test_backend_listed():
    import torch

    assert "dynexec" in torch._dynamo.list_backends(exclude_tags=())
