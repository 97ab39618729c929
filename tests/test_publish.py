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
    assert publish.block(readme, folder) == publish.headline_markdown(folder)


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


@pytest.mark.parametrize("folder", PUBLISHED, ids=lambda p: p.name)
def test_headline_numbers_against_the_per_example_files(folder):
    """Independent of report.headline: recompute the fine-tuned and the zero-shot row from the raw tables."""
    h = report.headline(report.load_all(folder)).set_index(["method", "direction"])
    zs = pd.read_csv(folder / "02_zeroshot" / "per_example.csv")
    course = zs[zs.template == "course"]
    assert h.loc[("zero-shot", "all"), "mean_ppl"] == pytest.approx(course.ppl.mean())
    # bits per character by hand: total nats over total characters, in bits
    assert h.loc[("zero-shot", "all"), "bits_per_char"] == pytest.approx(
        course.nll.sum() / course.n_chars.sum() / math.log(2))
    curve = pd.read_csv(folder / "01_finetune" / "curve.csv")
    tuned = [m for m in h.index.get_level_values("method").unique() if m not in ("zero-shot", "few-shot")]
    assert len(tuned) == 1 and h.loc[(tuned[0], "all"), "mean_ppl"] == pytest.approx(curve.eval_ppl.min())


def test_each_published_folder_gets_its_own_readme_block_and_its_cards(tmp_path):
    """A second published study adds a block after the first instead of replacing it; the line above the
    table names the card of each notebook when they differ (here: 01 rerun on another card)."""
    import json
    import shutil

    folder = shutil.copytree(ROOT / "reports/course-H200", tmp_path / "course-X1")
    doc_path = folder / "01_finetune" / "results.json"
    doc = json.loads(doc_path.read_text())
    doc["provenance"]["hardware"]["gpu"] = "Card X"
    doc_path.write_text(json.dumps(doc))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- headline:course-H200:start -->\nold\n<!-- headline:course-H200:end -->\ntail\n")
    text = publish.write_readme(folder, readme)
    assert text.startswith("intro\n<!-- headline:course-H200:start -->\nold\n<!-- headline:course-H200:end -->\n\n"
                           "<!-- headline:course-X1:start -->\n") and text.endswith("<!-- headline:course-X1:end -->\ntail\n")
    assert ", 01 on Card X; 02, 03, 04 on NVIDIA H200 (" in publish.block(text, folder)
    assert publish.write_readme(folder, readme) == text  # filled again in place, not added twice
    empty = tmp_path / "empty.md"
    empty.write_text("no blocks\n")
    with pytest.raises(ValueError, match="no headline block"):
        publish.write_readme(folder, empty)


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

    folder = shutil.copytree(ROOT / "reports/course-H200", tmp_path / "study")
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


@pytest.mark.parametrize("folder", PUBLISHED, ids=lambda p: p.name)
def test_readme_sweep_table_is_the_committed_sweep(folder):
    """The README's recipe-sweep table of each published sweep is what the committed JSON says (printed by
    recipe_sweep --markdown)."""
    import json
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import recipe_sweep

    if not (folder / report.SWEEP).exists():
        pytest.skip("no recipe sweep published with this study")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start, end = f"<!-- sweep:{folder.name}:start -->", f"<!-- sweep:{folder.name}:end -->"
    assert start in readme and end in readme, f"README has no {start} block for the sweep published with {folder.name}"
    block = readme.split(start, 1)[1].split(end, 1)[0].strip()
    doc = json.loads((folder / report.SWEEP).read_text())
    assert block == recipe_sweep.markdown(doc)
    best = min((r for r in doc["rows"]), key=lambda r: r["best_ppl"])
    assert f"| {best['best_ppl']:.2f} ({best['best_step']}) |" in block


@pytest.mark.parametrize("folder", PUBLISHED, ids=lambda p: p.name)
def test_published_report_shows_its_recipe_sweep(folder):
    """A sweep published with the study is a section of its report: every variant's best mean ppl is there."""
    import json

    if not (folder / report.SWEEP).exists():
        pytest.skip("no recipe sweep published with this study")
    doc = json.loads((folder / report.SWEEP).read_text())
    table = next(t for t in pd.read_html(folder / "05_report.html") if "changes" in t.columns)
    assert table.best_ppl.tolist() == pytest.approx([r["best_ppl"] for r in doc["rows"]], abs=5e-4)


def test_a_full_finetuning_run_is_reported_with_its_kept_model_and_decoding(tmp_path):
    """01 with every weight trained and 4-beam decoding: the headline says full fine-tuning, that the best
    model (not an adapter) was kept, and the beams its chrF was measured with; a greedy LoRA run says
    neither."""
    import json
    import shutil

    folder = shutil.copytree(ROOT / "reports/course-H200", tmp_path / "study")
    tuned = report.headline(report.load_all(folder)).iloc[-1]
    assert (tuned.method, tuned.setting) == ("QLoRA", "best adapter (step 500)")
    doc_path = folder / "01_finetune" / "results.json"
    doc = json.loads(doc_path.read_text())
    doc["provenance"]["params"] |= {"quantization": "none", "full_finetune": True, "num_beams": 4}
    doc_path.write_text(json.dumps(doc))
    tuned = report.headline(report.load_all(folder)).iloc[-1]
    assert (tuned.method, tuned.setting) == ("full fine-tuning", "best model (step 500), 4 beams")
    doc["provenance"]["params"] |= {"num_beams": 8, "mbr_candidates": 8}
    doc_path.write_text(json.dumps(doc))
    tuned = report.headline(report.load_all(folder)).iloc[-1]
    assert tuned.setting == "best model (step 500), 8 beams, MBR of 8"


def test_the_discussion_says_when_the_ladder_is_not_01s_recipe():
    """A study whose 01 was rerun under another recipe (the reverse study: full fine-tuning, pairs both ways)
    says that 04's ladder trained under its own (QLoRA, 2 epochs), and that a curve ending flat under a
    decaying rate is the schedule's; the seed-recipe study says neither and names its overfitting."""
    from lib import discussion

    t = discussion.text(report.load_all(ROOT / "reports/course-H100-full-reverse"))
    assert "its own recipe (QLoRA, 2 epochs), not 01's (full fine-tuning, pairs both ways)" in t
    assert "its flat end is the rate decaying to zero" in t
    t = discussion.text(report.load_all(ROOT / "reports/course-H200"))
    assert "its own recipe" not in t and "decaying to zero" not in t and "overfits the training set" in t
