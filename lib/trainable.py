"""The trainable model of a fine-tuning run: the base model loaded (4-bit), LoRA added (or every weight
trainable), speed settings on."""
from transformers import set_seed

from . import fused_projections, models, nf4, speedups


def make_trainable(model, p):
    """The loaded base model made trainable as p says: LoRA adapters (add_lora) or, with p.full_finetune,
    every weight (full_weights); then the speed settings that apply to both."""
    model = full_weights(model, p) if p.full_finetune else add_lora(model, p)
    if p.fuse_projections:  # params refuse it for full fine-tuning
        fused_projections.fuse_projections(model)
    if p.checkpointed_layers:  # params refuse it without gradient_checkpointing
        speedups.checkpoint_only(model, p.checkpointed_layers)
    if p.cuda_graphs:
        speedups.compile_decoder(model)
    elif p.compile:
        speedups.compile_layers(model, p.compile_mode, p.cpp_wrapper, p.compiled_recompute)
    return model


def add_lora(model, p):
    """Wrap a (4-bit) model with LoRA adapters on p.target_modules; the base stays frozen."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if p.quantization == "nf4" and not p.keep_frozen_dtype:  # frozen weights to fp32, input grads for checkpointing
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=p.gradient_checkpointing)
    else:
        model = speedups.prepare_frozen(model, p.gradient_checkpointing)
    missing = [m for m in p.target_modules if not any(n.endswith(m) for n, _ in model.named_modules())]
    if missing:
        raise ValueError(f"target_modules {missing} not found in {p.model}")
    cfg = LoraConfig(r=p.lora_r, lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout, bias="none",
                     target_modules=list(p.target_modules), task_type="CAUSAL_LM", use_dora=p.use_dora)
    model = get_peft_model(model, cfg)
    if p.cache_dequantized:
        speedups.cache_dequantized(model)
    if p.lean_nf4:
        nf4.replace_4bit(model)
    return model


def full_weights(model, p):
    """Every weight trainable, held in fp32: bf16 weights would lose most updates of a small learning rate
    to rounding, so they are the master copy and autocast computes in p.compute_dtype, as for LoRA."""
    model = model.float().requires_grad_(True)
    if p.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def build(p):
    """(model with LoRA, tokenizer) for p.model under p's quantization, dtype and speed settings."""
    tok = models.load_tokenizer(p.model)
    set_seed(p.seed)  # LoRA's A matrices are drawn at wrap time, before the Trainer seeds anything
    return make_trainable(models.load_model(p.model, p.quantization, p.compute_dtype, p.device), p), tok


def trainable_params(model) -> tuple[int, int]:
    """(trainable, total) parameter counts (4-bit weights count as stored elements)."""
    trainable = sum(x.numel() for x in model.parameters() if x.requires_grad)
    return trainable, sum(x.numel() for x in model.parameters())


def tokens_per_char(tok, records) -> float:
    """Answer tokens per answer character: how finely a tokenizer cuts this task's text."""
    n_tok = sum(len(tok(r["output"], add_special_tokens=False)["input_ids"]) for r in records)
    return n_tok / sum(len(r["output"]) for r in records)


def load_adapted(p, adapter_dir):
    """(model, tokenizer): p.model loaded as for training (no speed settings) with a saved adapter; a full
    fine-tuning's folder holds the whole model (in fp32, as it trained)."""
    from peft import PeftModel

    if p.full_finetune:
        return models.load_model(str(adapter_dir), "none", "float32", p.device).eval(), models.load_tokenizer(p.model)
    base = models.load_model(p.model, p.quantization, p.compute_dtype, p.device)
    return PeftModel.from_pretrained(base, adapter_dir).eval(), models.load_tokenizer(p.model)
