"""GPU-only checks (pytest -m gpu on a CUDA machine; CI has none and skips them)."""
import pytest
import torch

from lib import data, evaluate, models, prompts

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("quant,dtype", [("none", "float32"), ("nf4", "float32")])
def test_batched_equals_reference_on_gpu(quant, dtype):
    """On the GPU too, in fp32 compute (bf16 rounding differs with batch shape, see benchmarks/README)."""
    tok = models.load_tokenizer("tiny-llama")
    model = models.load_model("tiny-llama", quant, dtype, "cuda")
    recs = data.load_split("data/sample", "public_test")
    ps, outs = [prompts.build(r["instruction"]) for r in recs], [r["output"] for r in recs]
    ref = evaluate.reference_perplexities(model, tok, ps, outs)
    fast = evaluate.perplexities(model, tok, ps, outs, batch_size=8, progress=False)
    assert fast.ppl == pytest.approx(ref.ppl, rel=1e-4)
