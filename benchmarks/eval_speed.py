"""Course-metric evaluation: the project's batched evaluator vs the course's batch-size-1 loop.

Same model, same records, one run: prints both scores (must agree to 1e-4) and the speed ratio.

    python benchmarks/eval_speed.py --model gemma-3-270m --data-dir data/raw --limit 250
    python benchmarks/eval_speed.py --config path/to/config.json --tokenizer path/   # random weights
"""
import argparse
import json
import time

import torch

from lib import data, evaluate, models, prompts


def build_model(a):
    """A named/embedded model, or random weights from a config (speed does not depend on the values)."""
    if not a.config:
        return models.load_model(a.model, a.quantization, a.dtype, "auto"), models.load_tokenizer(a.model)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(a.config)
    m = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, a.dtype)).to(models.device_for("auto")).eval()
    return m, AutoTokenizer.from_pretrained(a.tokenizer)


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--config", help="config.json: random weights of this architecture")
    ap.add_argument("--tokenizer", help="tokenizer folder (with --config)")
    ap.add_argument("--data-dir", default="data/sample")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--quantization", default="none")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-sizes", default="8,16,32")
    a = ap.parse_args()
    model, tok = build_model(a)
    recs = data.load_split(a.data_dir, "public_test", limit=a.limit)
    ps, outs = [prompts.build(r["instruction"]) for r in recs], [r["output"] for r in recs]
    evaluate.perplexities(model, tok, ps[:4], outs[:4], progress=False)  # warm-up (kernels, allocator)
    ref, t_ref = timed(lambda: evaluate.reference_perplexities(model, tok, ps, outs))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    rows = [{"method": "reference bs=1", "s": round(t_ref, 2), "mean_ppl": ref.mean_ppl, "ratio": 1.0}]
    for bs in map(int, a.batch_sizes.split(",")):
        got, t = timed(lambda: evaluate.perplexities(model, tok, ps, outs, batch_size=bs, progress=False))
        rel = max(abs(x - y) / x for x, y in zip(ref.ppl, got.ppl))
        rows.append({"method": f"batched bs={bs}", "s": round(t, 2), "mean_ppl": got.mean_ppl,
                     "ratio": round(t_ref / t, 2), "max_rel_diff": rel})
    print(json.dumps({"device": device, "model": a.config or a.model, "quantization": a.quantization,
                      "dtype": a.dtype, "records": len(recs), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
