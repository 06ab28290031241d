"""GPU paths: Inductor on CUDA (Triton) and TensorRT. Skipped without CUDA, with the reason."""

import pytest
import torch

import hf_models as H

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: no GPU on this machine")
pytestmark = [pytest.mark.gpu, needs_cuda]


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_inductor_cuda_staged_equals_stock(family):
    model = H.classifier(family).cuda()
    inputs = {k: v.cuda() for k, v in H.encoder_inputs(pad_last=2).items()}
    with torch.no_grad():
        ref = model(**inputs).logits
        out = torch.compile(model, backend="dynexec", options={"partition": "blocks", "strict": True})(**inputs).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)  # TF32/fused kernels round differently


def test_tensorrt_staged_equals_stock():
    pytest.importorskip("torch_tensorrt", reason="needs torch-tensorrt: pip install 'dynexec_compile[tensorrt]'")
    model = H.classifier("bert").cuda()
    inputs = {k: v.cuda() for k, v in H.encoder_inputs().items()}
    with torch.no_grad():
        ref = model(**inputs).logits
        out = torch.compile(model, backend="dynexec", options={"lowering": "tensorrt", "partition": "blocks", "strict": True})(**inputs).logits
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)  # TensorRT may pick fp16/TF32 tactics
