"""GPU-only checks (pytest -m gpu on a CUDA machine; CI has none and skips them)."""
import pytest
import torch

from lib import data, evaluate, models, prompts
from tests.tiny_model import TINY

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("quant,dtype", [("none", "float32"), ("nf4", "float32")])
def test_batched_equals_reference_on_gpu(quant, dtype):
    """On the GPU too, in fp32 compute (bf16 rounding differs with batch shape, see benchmarks/README)."""
    tok = models.load_tokenizer(TINY)
    model = models.load_model(TINY, quant, dtype, "cuda")
    recs = data.load_split("data/sample", "public_test")
    ps, outs = [prompts.build(r["instruction"]) for r in recs], [r["output"] for r in recs]
    ref = evaluate.reference_perplexities(model, tok, ps, outs)
    fast = evaluate.perplexities(model, tok, ps, outs, batch_size=8, progress=False)
    assert fast.ppl == pytest.approx(ref.ppl, rel=1e-4)


@pytest.mark.parametrize("rows", [7, 2048])  # bitsandbytes' fused kernel (few rows) and its dequantize path
def test_nf4_linear_on_gpu(rows):
    """A 7B-sized layer on CUDA: NF4Linear's weight equals bitsandbytes' exactly (eager: its kernels;
    compiled: inductor's fused lookup); eager outputs and input gradients are bitsandbytes' to the bit,
    compiled ones too for many rows (its dequantize path) and to bf16 rounding for few (its fused kernel)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    from lib import nf4

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(4096, 11008, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(11008, 4096) * 0.02, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True).cuda()
    lean = nf4.NF4Linear(layer)
    ref = dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
    assert torch.equal(lean.weight_dequantized(), ref)
    assert torch.equal(torch.compile(lambda: lean.weight_dequantized())(), ref)
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out0 = layer(x)
    g0, = torch.autograd.grad(out0.float().square().sum(), x)
    for fn in (lean, torch.compile(lean)):
        out1 = fn(x)
        g1, = torch.autograd.grad(out1.float().square().sum(), x)
        torch.testing.assert_close(out1, out0, rtol=2e-2, atol=1e-3)
        torch.testing.assert_close(g1, g0, rtol=2e-2, atol=1e-2)
        if fn is lean or rows > 1536:
            assert torch.equal(out1, out0) and torch.equal(g1, g0)


@pytest.mark.parametrize("cap", [None, 30.0])
def test_cce_head_loss_equals_the_chunked_one_on_gpu(cap):
    """cut-cross-entropy against the hand-written chunked loss (the reference), a Llama-sized vocabulary in
    bf16: per-token losses to bf16 rounding, the gradient w.r.t. the hidden states in direction and size."""
    pytest.importorskip("cut_cross_entropy")
    from lib import chunked_loss

    g = torch.Generator(device="cuda").manual_seed(0)
    weight = (torch.randn(32000, 512, device="cuda", generator=g) * 0.05).bfloat16()
    h = torch.randn(700, 512, device="cuda", generator=g).bfloat16()
    targets = torch.randint(0, 32000, (700,), device="cuda", generator=g)
    upstream = torch.rand(700, device="cuda", generator=g)
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    ref, cce = chunked_loss.head_nll(h1, weight, targets, cap), chunked_loss.cce_nll(h2, weight, targets, cap)
    (ref * upstream).sum().backward()
    (cce * upstream).sum().backward()
    torch.testing.assert_close(cce, ref, rtol=2e-2, atol=2e-2)
    g1, g2 = h1.grad.float().flatten(), h2.grad.float().flatten()
    assert torch.nn.functional.cosine_similarity(g1, g2, dim=0) > 0.999
    assert (g2.norm() / g1.norm()).item() == pytest.approx(1, rel=1e-2)


def test_attention_backward_is_finite_where_cudnn_gave_nan():
    """pytorch/pytorch#196678, met on an H100 as NaN gradients in 01 (packed rows 448 wide): with a mask,
    a length of 64 mod 128 and logits far below zero (Qwen2.5's massive-activation heads), cuDNN's SDPA
    backward gives NaN in grad_q. After the trainer's switch the same backward is finite and equals the
    math kernel's."""
    import math

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lib.trainer import no_cudnn_attention

    def grads():
        torch.manual_seed(0)
        L, D = 448, 64
        q = torch.randn(1, 1, L, D, device="cuda", dtype=torch.bfloat16) * 0.1
        k = torch.randn(1, 1, L, D, device="cuda", dtype=torch.bfloat16) * 0.1
        v = torch.randn(1, 1, L, D, device="cuda", dtype=torch.bfloat16)
        q[..., 0], k[..., 0] = 1.0, -120 * math.sqrt(D)  # every logit about -120
        q.requires_grad_()
        mask = torch.ones(L, L, dtype=torch.bool, device="cuda").tril()[None, None]
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask).backward(torch.ones(1, 1, L, D, device="cuda",
                                                                                    dtype=torch.bfloat16))
        return q.grad.float()

    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        no_cudnn_attention()
        got = grads()
        with sdpa_kernel(SDPBackend.MATH):
            ref = grads()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
    assert torch.isfinite(got).all() and torch.isfinite(ref).all()
    # Feature 0 is left out: there every key is -120*sqrt(D), so its exact gradient, -120*sqrt(D)*scale*
    # sum_j dS_ij, is zero (a softmax's dS sums to zero) and each kernel returns only its own rounding times
    # 960 (on an H100: 0.12 against 5e-6). The other 63 features are the gradient proper.
    got, ref = got[..., 1:], ref[..., 1:]
    assert (got - ref).norm() / ref.norm() < 0.05  # bf16 kernels: the same gradient, not the same rounding


@pytest.mark.parametrize("compile_", [False, True])
def test_fused_projections_step_on_gpu(compile_):
    """fuse_projections on CUDA with the 7B recipe's path (lean NF4, bf16 autocast, checkpointing or
    compiled layers): one step's loss and LoRA gradients equal peft's per-projection ones to bf16 rounding."""
    from lib import collate, params
    from tests.test_fused_projections import same_step

    tok = models.load_tokenizer(TINY)
    feats = collate.encode_examples(tok, data.load_split("data/sample", "train", limit=4), "course", 2048)[0]
    p = params.TrainParams(model=TINY, compute_dtype="bfloat16", lean_nf4=True, keep_frozen_dtype=True,
                           compile=compile_, gradient_checkpointing=not compile_)
    same_step(p, feats, tok, rtol=1e-2, device="cuda")


@pytest.mark.parametrize("window", [None, 64])
def test_varlen_flash_equals_the_masked_path_on_gpu(window):
    """torch's flash varlen kernel (bf16, 12 query heads over 2 key/value heads of 128, as qwen2.5-1.5B;
    a sliding window too): output and q/k/v gradients equal the masked path's in fp32 to bf16 rounding."""
    from lib import varlen_attention as va

    torch.manual_seed(0)
    lengths = [200, 37, 512, 90, 1, 300]
    t = sum(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    q, k, v = (torch.randn(1, h, t, 128, device="cuda") for h in (12, 2, 2))
    dout = torch.randn(1, t, 12, 128, device="cuda")

    def run(dtype):
        xs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        out, _ = va.attention(None, *xs, None, scaling=0.09, sliding_window=window, seq_bounds=cu, seq_max=512)
        (out.float() * dout).sum().backward()
        return [out.float()] + [x.grad.float() for x in xs]

    assert va._flash_ok(q.to(torch.bfloat16)) and not va._flash_ok(q)
    for got, ref in zip(run(torch.bfloat16), run(torch.float32)):
        torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.parametrize("speed", [{}, {"compile": True},
                                   {"compile": True, "compiled_recompute": 2, "cpp_wrapper": True}])
def test_varlen_training_step_on_gpu(tmp_path, speed):
    """The Trainer's bf16 step with varlen_attention (the flash kernel; checkpointed layers, compiled or
    not, the recompute inside the compiled code too) gives the masked packing step's loss and LoRA
    gradients to bf16 rounding."""
    from lib import params
    from tests.test_varlen_attention import varlen_same_step

    base = params.TrainParams(model=TINY, quantization="none", compute_dtype="bfloat16", packing=True,
                              eval_steps=1000, save_steps=0, **speed)
    calls, _, _ = varlen_same_step(base, models.load_tokenizer(TINY), tmp_path, kernel="_flash", rel=1e-2,
                                   rtol=5e-2, atol=2e-2)
    assert calls == 4 if not speed else calls > 0  # 2 layers, forward and recompute; compiled: when traced


def _trained_deltas(p, tmp_path, steps=4):
    """LoRA weights' change over `steps` optimizer steps of the Trainer (bf16, 2 micro-batches of 2
    records a step) and the logged losses."""
    from lib import collate, trainable
    from lib.trainer import make_trainer

    tok = models.load_tokenizer(TINY)
    feats = collate.encode_examples(tok, data.load_split("data/sample", "train", limit=4 * steps), "course", 2048)[0]
    torch.manual_seed(0)
    model = trainable.make_trainable(models.load_model(TINY, "none", "bfloat16", "cuda"), p)
    w0 = {n: w.detach().float().clone() for n, w in model.named_parameters() if w.requires_grad}
    trainer = make_trainer(model, tok, feats, data.load_split("data/sample", "public_test", limit=2), p, tmp_path,
                           collate.collator(p, tok))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {n: w.detach().float() - w0[n] for n, w in model.named_parameters() if w.requires_grad}, losses


def _apart(a, b) -> float:
    """How far two sets of weight changes are: the mean absolute difference over the mean absolute change."""
    return (sum((a[k] - b[k]).abs().sum() for k in a) / sum(b[k].abs().sum() for k in b)).item()


@pytest.mark.parametrize("flat", [False, True], ids=["cuda_graphs", "flat_params"])
def test_cuda_graphs_train_as_the_plain_step(tmp_path, monkeypatch, flat):
    """cuda_graphs (the whole decoder one compiled graph, replayed as CUDA graphs; rows padded) trains four
    steps of two accumulated micro-batches as the uncompiled varlen step does, and the graphs were replayed,
    not skipped; so does flat_params (the weights views of one flat parameter, which the graphs read).
    Without copying the first micro-batch's gradients out of the graphs' memory the second replay writes
    over them: torch raises, or the weights go elsewhere (the test can fail)."""
    from torch._dynamo.utils import counters

    from lib import params
    from lib.graph_grads import GraphGrads

    kw = dict(model=TINY, quantization="none", compute_dtype="bfloat16", packing=True, varlen_attention=True,
              gradient_checkpointing=False, micro_batch_size=2, grad_accum=2, max_steps=4, logging_steps=1,
              eval_steps=1000, save_steps=0, learning_rate=1e-3, lr_scheduler="constant")
    plain, plain_losses = _trained_deltas(params.TrainParams(**kw), tmp_path / "plain")
    with torch._dynamo.config.patch(specialize_float=False):  # compile_decoder's process-wide setting, undone
        counters.clear()
        graphed = params.TrainParams(**kw, compile=True, cuda_graphs=True, flat_params=flat)
        torch._dynamo.reset()
        graphs, losses = _trained_deltas(graphed, tmp_path / "graphs")
        assert counters["inductor"]["cudagraph_skips"] == 0
        assert losses == pytest.approx(plain_losses, rel=1e-2)
        assert _apart(graphs, plain) < 0.1
        monkeypatch.setattr(GraphGrads, "take", lambda self: None)
        torch._dynamo.reset()
        try:
            broken, _ = _trained_deltas(graphed, tmp_path / "broken")
        except RuntimeError as e:
            assert "overwritten" in str(e)
        else:
            assert _apart(broken, plain) > 0.3


def test_varlen_answer_loss_never_waits_for_the_gpu():
    """With varlen_attention and the collator's answer positions, a training micro-batch's forward and
    backward (bf16 LoRA, eager) make no host-GPU sync, so the host can queue the backward while the GPU
    still runs the forward; the boolean-mask loss syncs (the test can fail)."""
    from lib import collate, params, trainable
    from lib import varlen_attention as va
    from lib.trainer import answer_loss

    tok = models.load_tokenizer(TINY)
    feats = collate.encode_examples(tok, data.load_split("data/sample", "train", limit=4), "course", 2048)[0]
    p = params.TrainParams(model=TINY, quantization="none", compute_dtype="bfloat16", packing=True,
                           varlen_attention=True, gradient_checkpointing=False)
    model = trainable.make_trainable(models.load_model(TINY, "none", "bfloat16", "cuda"), p).train()
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in collate.collator(p, tok)(feats).items()}

    def step(b):
        with va.training(model, True):
            answer_loss(model, **b, bf16=True).backward()

    step(batch)  # first calls may set things up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(batch)
        with pytest.raises(RuntimeError, match="synchroniz"):
            step({k: v for k, v in batch.items() if k != "answer_index"})
    finally:
        torch.cuda.set_sync_debug_mode(0)
