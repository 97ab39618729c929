"""The whole notebook pipeline through papermill on tiny models: numbers, files and failure modes."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests import tiny_model
from tests.tiny_model import TINY

ROOT = Path(__file__).resolve().parents[1]
CFG = {
    "common": {"run": "ci", "model": TINY, "eval_limit": 6},
    "train": {"max_steps": 6, "eval_steps": 3, "save_steps": 3, "learning_rate": 0.01},
    "01_finetune": {"predict_limit": 3, "max_new_tokens": 8, "quality_limit": 4},
    "03_fewshot_sweep": {"shots": [0, 1, 2], "random_seeds": [0, 1], "quality_limit": 4, "max_new_tokens": 8},
}


def pipeline(cfg, run_dir, *only):
    cmd = [sys.executable, "-m", "lib.pipeline", str(cfg), "--run-dir", str(run_dir)]
    if only:
        cmd += ["--only", *only]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def write_cfg(tmp_path, overrides=None):
    cfg = json.loads(json.dumps(CFG))
    for k, v in (overrides or {}).items():
        cfg.setdefault(k, {}).update(v)
    f = tmp_path / "tiny.yaml"
    f.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return f


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    second = tiny_model.path(seed=1, hidden=128)  # a second "PLM" for 04
    cfg = write_cfg(tmp, {"04_plm_compare": {"models": [TINY, str(second)]}})
    r = pipeline(cfg, tmp / "out")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp / "out", r


def load(run, name):
    doc = json.loads((run / name / "results.json").read_text())
    return doc, {t: pd.read_csv(run / name / f"{t}.csv") for t in doc["tables"]}


def test_every_notebook_executed_and_exported(full_run):
    run, r = full_run
    for nb in ("01_finetune", "02_zeroshot", "03_fewshot_sweep", "04_plm_compare", "05_report"):
        assert (run / f"{nb}.ipynb").exists() and (run / f"{nb}.html").exists()
    assert f"report: {run / '05_report.html'}" in r.stdout
    assert "[3/5] 03_fewshot_sweep" in r.stdout  # progress names the notebook
    # the console of a whole run: no kernel warnings (ipykernel's TCP one, tqdm's missing-ipywidgets one,
    # each once a notebook before), and no warning lines at all from the five kernels
    console = r.stdout + r.stderr
    assert "without encryption" not in console and "IProgress" not in console
    assert [line for line in console.splitlines() if "warn" in line.lower()] == []


def test_finetune_numbers(full_run):
    run, _ = full_run
    doc, t = load(run, "01_finetune")
    s, curve = doc["summary"], t["curve"]
    assert curve.step.tolist() == [0, 3, 6]
    assert s["best_ppl"] == pytest.approx(curve.eval_ppl.min()) and s["best_ppl"] < 0.97 * s["zero_shot_ppl"]
    assert (curve.eval_ppl_classical.notna() & curve.eval_ppl_modern.notna()).all()
    preds = json.loads((run / "01_finetune" / "predictions.json").read_text())
    assert len(preds) == 3 and set(preds[0]) == {"id", "output"}
    pv = doc["provenance"]
    assert pv["params"]["max_steps"] == 6 and pv["versions"]["transformers"] and pv["git"]["commit"]
    assert pv["models"][0]["sha256"]  # the tiny model's weights are hashed


def test_zeroshot_numbers(full_run):
    run, _ = full_run
    doc, t = load(run, "02_zeroshot")
    per, summ = t["per_example"], t["summary"]
    assert sorted(summ.template) == ["course", "instructive"] and (summ.n == 6).all()
    for row in summ.itertuples():  # the summary is the mean of the per-example values
        assert row.mean_ppl == pytest.approx(per[per.template == row.template].ppl.mean())
    # zero-shot with the course template is the finetune curve's step 0 (same model, same records)
    curve = load(run, "01_finetune")[1]["curve"]
    assert doc["summary"]["mean_ppl"]["course"] == pytest.approx(curve.eval_ppl[0], rel=1e-5)


def test_fewshot_numbers(full_run):
    run, _ = full_run
    doc, t = load(run, "03_fewshot_sweep")
    table = t["table"]
    assert len(table) == 9  # 3 strategies x k in {0,1,2}
    assert (table[table.strategy == "random"].seeds == 2).all()
    # k=0 scored by the sweep equals the course template scored by 02, record by record (two code paths)
    per = t["per_example"]
    zero = per[(per.k == 0) & (per.strategy == "fixed")].set_index("id").ppl
    zs = load(run, "02_zeroshot")[1]["per_example"]
    course = zs[zs.template == "course"].set_index("id").ppl
    assert zero.sort_index().to_numpy() == pytest.approx(course.sort_index().to_numpy(), rel=1e-5)
    best = doc["summary"]["best"]
    assert best["mean_ppl"] == pytest.approx(table.mean_ppl.min())
    q = t["quality"]
    assert list(q.setting.unique()) == ["zero-shot", f"few-shot ({best['strategy']}, k={best['k']})"]
    assert set(q.direction) >= {"all"} and q.chrF.between(0, 100).all()


def test_plm_numbers(full_run):
    run, _ = full_run
    _, t = load(run, "04_plm_compare")
    s = t["summary"]
    assert len(s) == 2 and s.trainable_params.iloc[0] < s.trainable_params.iloc[1]  # hidden 64 vs 128
    assert (s.tokens_per_char == 1.0).all()  # character tokenizers
    assert set(t["curves"].model) == set(s.model)
    # the first model's run is 01's (same recipe and data): read back, not trained again
    assert f"reusing the finished run in {run / '01_finetune'}" in full_run[1].stdout
    first = t["curves"][t["curves"].model == TINY].eval_ppl.to_numpy()
    assert first == pytest.approx(load(run, "01_finetune")[1]["curve"].eval_ppl.to_numpy())


def test_a_second_04_run_trains_nothing_and_gives_the_same_table(full_run, tmp_path):
    run, _ = full_run
    before = load(run, "04_plm_compare")[1]["summary"]
    cfg = write_cfg(tmp_path, {"04_plm_compare": {"models": [TINY, tiny_model.path(seed=1, hidden=128)]}})
    r = pipeline(cfg, run, "04_plm_compare")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("reusing the finished run") == 2 and "step 2: eval" not in r.stdout
    pd.testing.assert_frame_equal(load(run, "04_plm_compare")[1]["summary"], before)


def test_report_html_has_the_numbers(full_run):
    run, _ = full_run
    tables = pd.read_html(run / "05_report.html")
    assert len(tables) >= 9
    best = load(run, "01_finetune")[0]["summary"]["best_ppl"]
    head = next(x for x in tables if "method" in x.columns)
    assert head.method.unique().tolist() == ["zero-shot", "few-shot", "QLoRA"]
    tuned = head[(head.method == "QLoRA") & (head.direction == "all")]
    assert tuned.mean_ppl.iloc[0] == pytest.approx(best, abs=1e-3)
    assert "seed's ordering" in (run / "05_report.html").read_text()  # the discussion is written
    assert "No recipe sweep in" in (run / "05_report.html").read_text()  # none ran beside this study
    html = (run / "05_report.html").read_text()
    assert "Missing result" not in html and html.count("data:image/png;base64") >= 4  # self-contained
    assert "def " not in html  # --no-input: code hidden


def test_report_says_what_is_missing(tmp_path):
    r = pipeline(write_cfg(tmp_path), tmp_path / "out", "05_report")
    assert r.returncode == 0, r.stderr[-2000:]
    html = (tmp_path / "out" / "05_report.html").read_text()
    assert "Missing result" in html and "notebooks/01_finetune.ipynb" in html


def test_failure_stops_and_keeps_earlier_results(tmp_path):
    cfg = write_cfg(tmp_path, {"03_fewshot_sweep": {"strategies": ["random"], "shots": [50]}})
    r = pipeline(cfg, tmp_path / "out", "02_zeroshot", "03_fewshot_sweep", "05_report")
    assert r.returncode == 1
    assert "03_fewshot_sweep failed" in r.stderr and "k=50 random examples" in r.stderr
    assert (tmp_path / "out" / "02_zeroshot" / "results.json").exists()  # earlier results intact
    assert (tmp_path / "out" / "03_fewshot_sweep.ipynb").exists()  # the failed notebook, for inspection
    assert not (tmp_path / "out" / "05_report.ipynb").exists()  # nothing after the failure ran


def test_bad_params_fail_before_running(tmp_path):
    cfg = write_cfg(tmp_path, {"02_zeroshot": {"templats": ["course"]}})
    r = pipeline(cfg, tmp_path / "out")
    assert r.returncode == 1 and "templats" in r.stderr
    assert not (tmp_path / "out").exists()


def test_runs_are_kept(monkeypatch, tmp_path):
    from lib import pipeline as pl

    monkeypatch.setattr(pl, "resolve", lambda p: tmp_path / p)
    a, b = pl.new_run_dir("x"), pl.new_run_dir("x")
    assert a != b and a.exists() and b.exists()
    assert (tmp_path / "reports" / "x" / "latest").resolve() == b  # `latest` follows the newest run
