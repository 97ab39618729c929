"""A tiny random-init Llama with a character tokenizer, built from a config into a temporary folder and
passed to the code as a local model path, like any user's model."""
import atexit
import json
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def _charset() -> list[str]:
    """Every character of the sample data and the prompts, so tests see few unknown tokens."""
    from lib import prompts

    text = "".join((ROOT / "data" / "sample" / f).read_text(encoding="utf-8") for f in ("train.json", "public_test.json"))
    text += "".join(prompts.TEMPLATES.values()) + prompts.FEWSHOT_INTRO
    text += "".join(e["instruction"] + e["output"] for e in prompts.SEED_EXAMPLES) + "答案：\n "
    return sorted(set(text) - set('"{}[],'))  # JSON syntax chars aren't content


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + _charset())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per char
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def build(out: Path, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """Write a tiny Llama (all 7 LoRA target projections present) and its tokenizer to out."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (Path(out) / "provenance.json").write_text(json.dumps({"name": "tiny-llama", "seed": seed}))
    return Path(out)


@lru_cache(maxsize=None)
def path(seed: int = 0, hidden: int = 64) -> str:
    """The tiny model's folder, built once per test process and removed when it exits."""
    folder = Path(tempfile.mkdtemp(prefix="cct-tiny-"))
    atexit.register(shutil.rmtree, folder, True)
    return str(build(folder, seed=seed, hidden=hidden))


TINY = path()  # the tiny test model's folder: tests pass it as a local model, like any user's
