"""Loading models: an embedded name (lib.embedded), a local folder or a hub id, in 4-bit NF4 or not."""
import difflib
import os
from functools import lru_cache

from . import embedded, resolve
from .embedded import EMBEDDED, ModelError

QUANTIZATIONS = ("nf4", "none")
DTYPES = ("float32", "bfloat16", "float16")


def _unknown_name(model: str):
    """A bare name close to an embedded one is a typo, not a hub id: say so before any network wait."""
    close = difflib.get_close_matches(model, EMBEDDED, n=1, cutoff=0.8)
    if close and "/" not in model:
        raise ModelError(f"unknown model {model!r}: no such embedded model or local folder. Did you mean "
                         f"{close[0]!r}? Embedded: {sorted(EMBEDDED)}")


def model_path(model: str) -> str:
    """What from_pretrained gets: the converted folder for an embedded name, else the id/path as given."""
    if model in EMBEDDED:
        path = embedded.convert_gguf(model)
        _verified(str(path))
        return str(path)
    local = resolve(model)
    if local.exists():
        return str(local)
    if model.startswith(("/", "./", "../", "~")) or model.count("/") > 1:
        raise ModelError(f"model folder {local} does not exist (and {model!r} is no hub id)")
    _unknown_name(model)
    return model  # a hub id ("org/name"), for users with the hub


@lru_cache(maxsize=None)
def _verified(folder: str) -> tuple:
    """Weight hashes of a converted folder, checked once per process (hashing 3 GB takes seconds)."""
    from pathlib import Path

    return tuple(sorted(embedded.verify(Path(folder)).items()))


def model_identity(model: str) -> dict:
    """Provenance of a model: the hashes of the files loaded (embedded or local), else the hub id."""
    if model in EMBEDDED:  # hashes of the converted files where they are here; a run read back needs none
        spec, folder = EMBEDDED[model], embedded.converted(model)
        return {"model": model, "sha256": dict(_verified(str(folder))) if folder else None,
                "gguf_sha256": spec.sha256, "source": list(spec.packages), "licence": spec.licence}
    path = resolve(model)
    weights = embedded.weight_hashes(path) if path.is_dir() else {}
    return {"model": model, "sha256": weights or None, "source": str(path) if path.exists() else model}


def device_for(device: str) -> str:
    """'auto' -> cuda when available, else cpu."""
    import torch

    if device == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        # under accelerate launch each process owns the GPU of its local rank
        return f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    return device


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    path = model_path(model)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer of {model!r} from {path}: {e}") from e
    if tok.pad_token_id is None:  # Llama-2 has none; padding is masked anyway
        tok.pad_token = tok.eos_token
    return tok


def load_model(model: str, quantization: str = "nf4", compute_dtype: str = "float32", device: str = "auto"):
    """A causal LM in eval mode: 4-bit NF4 with double quant (QLoRA's recipe) or unquantized.

    compute_dtype is the matmul dtype under NF4 and the weight dtype when unquantized.
    """
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if compute_dtype not in DTYPES:
        raise ValueError(f"compute_dtype must be one of {DTYPES}, got {compute_dtype!r}")
    dtype = getattr(torch, compute_dtype)
    kwargs = {"dtype": dtype, "device_map": {"": device_for(device)}}
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    path = model_path(model)
    try:
        m = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:  # safetensors, JSON and OS errors alike: name the folder and what to do
        raise ModelError(f"cannot load model {model!r} from {path}: {type(e).__name__}: {e}. If it is a "
                         "local folder, check or re-save its files; an embedded model's cache can be "
                         "deleted and is rebuilt on next use") from e
    no_cpu_repack(m)
    return m.eval()


def no_cpu_repack(model) -> None:
    """Keep bitsandbytes from repacking 4-bit weights for its AVX512-BF16 CPU kernel.

    On such CPUs a Linear4bit forward in eval mode repacks its weight, and from then on every forward,
    training ones too, runs that kernel, which has no backward: in a model that trains, the gradient
    through the frozen weight to the layer's input is silently dropped after the first learning-curve
    evaluation (LoRA gradients of all earlier layers wrong). Saving an adapter happens to unpack it again,
    which is why one process trained right and the second process of a data-parallel run, which does not
    save, did not. Its rounding also differs from the dequantize-and-matmul that training and GPUs use
    (1e-4 on the tiny model's perplexity), so every model, evaluated or trained, keeps the one kernel.
    """
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
