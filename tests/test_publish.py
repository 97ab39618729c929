"""The published study: the README's headline table is what the committed results say."""
import math
from pathlib import Path

import pandas as pd
import pytest

from lib import publish, report

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = sorted((ROOT / "reports").glob("course-*/"))


@pytest.mark.parametrize("folder", PUBLISHED, ids=lambda p: p.name)
def test_readme_headline_matches_the_committed_results(folder):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split(publish.START, 1)[1].split(publish.END, 1)[0].strip()
    assert block == publish.headline_markdown(folder)


@pytest.mark.parametrize("folder", PUBLISHED, ids=lambda p: p.name)
def test_published_study_is_whole_and_small(folder):
    files = [f for f in folder.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < publish.MAX_BYTES
    assert not [f for f in files if f.suffix in (".safetensors", ".pt", ".bin", ".gguf")]
    for nb in ("01_finetune", "02_zeroshot", "03_fewshot_sweep", "04_plm_compare", "05_report"):
        assert (folder / f"{nb}.html").exists()
    res = report.load_all(folder)
    assert not [n for n, v in res.items() if isinstance(v, report.Missing)]
    preds = pd.read_json(folder / "01_finetune" / "predictions.json")
    assert list(preds.columns) == ["id", "output"] and len(preds) == 250  # the whole private test


def test_headline_numbers_against_the_per_example_files():
    """Independent of report.headline: recompute QLoRA's and zero-shot's row from the raw tables."""
    if not PUBLISHED:
        pytest.skip("no published study")
    folder = PUBLISHED[0]
    h = report.headline(report.load_all(folder)).set_index(["method", "direction"])
    zs = pd.read_csv(folder / "02_zeroshot" / "per_example.csv")
    course = zs[zs.template == "course"]
    assert h.loc[("zero-shot", "all"), "mean_ppl"] == pytest.approx(course.ppl.mean())
    # bits per character by hand: total nats over total characters, in bits
    assert h.loc[("zero-shot", "all"), "bits_per_char"] == pytest.approx(
        course.nll.sum() / course.n_chars.sum() / math.log(2))
    curve = pd.read_csv(folder / "01_finetune" / "curve.csv")
    assert h.loc[("QLoRA", "all"), "mean_ppl"] == pytest.approx(curve.eval_ppl.min())


def test_seed_bits_per_char_conversion():
    """CONVENTIONS.md: log2(mean ppl) x 1.86 tokens per character: 5.454 -> 4.55, 3.324 -> 3.22."""
    assert report.seed_bits_per_char(5.454) == pytest.approx(4.55, abs=0.005)
    assert report.seed_bits_per_char(3.324) == pytest.approx(3.22, abs=0.005)


def test_a_lora_run_is_reported_as_lora(tmp_path):
    """01 run on a 16-bit base (quantization: none) is LoRA, not QLoRA, in the headline, the examples and the
    discussion, and is still set beside the seed's fine-tuned 7B number (3.324)."""
    import json
    import shutil

    from lib import discussion

    if not PUBLISHED:
        pytest.skip("no published study")
    folder = shutil.copytree(PUBLISHED[0], tmp_path / "study")
    before = report.headline(report.load_all(folder))
    assert before.method.unique().tolist() == ["zero-shot", "few-shot", "QLoRA"]  # the published run: NF4
    doc_path = folder / "01_finetune" / "results.json"
    doc = json.loads(doc_path.read_text())
    doc["provenance"]["params"]["quantization"] = "none"
    doc_path.write_text(json.dumps(doc))
    res = report.load_all(folder)
    h = report.headline(res)
    assert h.method.unique().tolist() == ["zero-shot", "few-shot", "LoRA"]
    row = h[(h.method == "LoRA") & (h.direction == "all")].iloc[0]
    assert row.seed_7b_mean_ppl == 3.324
    assert row.mean_ppl == pytest.approx(pd.read_csv(folder / "01_finetune" / "curve.csv").eval_ppl.min())
    assert row.chrF == pytest.approx(pd.read_csv(folder / "01_finetune" / "quality.csv").set_index("direction").chrF["all"])
    assert "LoRA" in report.examples(res).columns
    assert "**Zero-shot > few-shot > LoRA?**" in discussion.text(res)


def test_readme_sweep_table_is_the_committed_sweep():
    """The README's recipe-sweep table is what the committed JSON says (printed by recipe_sweep --markdown)."""
    import json
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import recipe_sweep

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- sweep:start -->", 1)[1].split("<!-- sweep:end -->", 1)[0].strip()
    doc = json.loads((ROOT / "reports/course-H200/recipe_sweep/recipe_sweep.json").read_text())
    assert block == recipe_sweep.markdown(doc)
    best = min((r for r in doc["rows"]), key=lambda r: r["best_ppl"])
    assert f"| {best['best_ppl']:.2f} ({best['best_step']}) |" in block and best["changes"]["lora_alpha"] == 64


@pytest.mark.parametrize("folder", PUBLISHED, ids=lambda p: p.name)
def test_published_report_shows_its_recipe_sweep(folder):
    """A sweep published with the study is a section of its report: every variant's best mean ppl is there."""
    import json

    if not (folder / report.SWEEP).exists():
        pytest.skip("no recipe sweep published with this study")
    doc = json.loads((folder / report.SWEEP).read_text())
    table = next(t for t in pd.read_html(folder / "05_report.html") if "changes" in t.columns)
    assert table.best_ppl.tolist() == pytest.approx([r["best_ppl"] for r in doc["rows"]], abs=5e-4)
