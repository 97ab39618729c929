"""soup_seeds: the average of several full fine-tuning runs' best models (lib/soup.py, lib/finetune.py)."""
import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from lib import data, evaluate, finetune, paramfile, params, prompts, soup, trainable
from tests.test_train import tiny_params
from tests.tiny_model import TINY


def _model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)


def test_average_of_two_models_is_their_mean_weight_by_weight():
    """Hand-made: b = a + d, so the soup is a + d/2 in every parameter; a weight shared by two modules
    (tied embeddings) is averaged once, buffers stay; models with other parameters are refused."""
    a, b = _model(), _model()
    torch.manual_seed(0)
    deltas = {n: torch.randn_like(w) for n, w in b.named_parameters()}
    with torch.no_grad():
        for n, w in b.named_parameters():
            w.add_(deltas[n])
    expected = {n: w.detach().clone() + deltas[n] / 2 for n, w in a.named_parameters()}
    buffers = {n: x.clone() for n, x in a.named_buffers()}
    soup.average_into(a, [b])
    for n, w in a.named_parameters():
        assert torch.allclose(w, expected[n], atol=1e-6), n
    for n, x in a.named_buffers():
        assert torch.equal(x, buffers[n]), n
    c = _model()
    c.extra = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="differ in their parameters"):
        soup.average_into(_model(), [c])


def test_soup_of_two_seeds_is_read_back_and_scored_like_its_members(tmp_path, capsys):
    """01 with soup_seeds 2: two plain runs (seed 0 and 1, the second the same as a run of seed 1 on its
    own), their best models averaged into best_adapter/ (the mean of the two saved models, tensor by
    tensor), each member scored again as its curve scored it in training, the soup scored as its saved
    model scores; a second call reads it all back."""
    p = tiny_params(max_steps=4, eval_steps=2, save_steps=0, quantization="none", full_finetune=True,
                    learning_rate=1e-3, soup_seeds=2)
    tr = data.load_split(p.data_dir, "train")
    ev = data.load_split(p.data_dir, "public_test", limit=6)
    out = tmp_path / "soup"
    r = finetune.finetune(p, tr, ev, out)
    alone = finetune.finetune(replace(p, seed=1, soup_seeds=1), tr, ev, tmp_path / "seed1-alone")
    members = r.summary["soup"]["members"]
    assert [m["seed"] for m in members] == [0, 1] and r.summary["soup"]["seeds"] == [0, 1]
    seed1 = r.curve[r.curve.run == "seed 1"].eval_ppl.tolist()
    assert seed1 == pytest.approx(alone.curve.eval_ppl.tolist(), rel=1e-6)
    assert seed1 != pytest.approx(r.curve[r.curve.run == "seed 0"].eval_ppl.tolist(), rel=1e-4)  # another order
    weights = [load_file(out / d / "best_adapter" / "model.safetensors") for d in ("seed-0", "seed-1", ".")]
    for k, w in weights[2].items():
        assert torch.allclose(w, (weights[0][k] + weights[1][k]) / 2, atol=1e-6), k
    for m in members:
        best = finetune.runs._read(out / f"seed-{m['seed']}" / "summary.json")["best_ppl"]
        assert m["eval_ppl"] == pytest.approx(best, rel=1e-6)
    model, tok = trainable.load_adapted(p, out / "best_adapter")
    df = evaluate.score_records(model, tok, ev, [prompts.build(x["instruction"]) for x in ev], 4, p.max_length)
    assert df.ppl.mean() == pytest.approx(r.summary["best_ppl"], rel=1e-6)
    soup_row = r.curve[r.curve.run == "soup"]
    assert len(soup_row) == 1 and soup_row.eval_ppl.iloc[0] == r.summary["best_ppl"]
    assert soup_row.step.iloc[0] == r.summary["best_step"] == max(m["best_step"] for m in members)
    capsys.readouterr()
    again = finetune.finetune(p, tr, ev, out)
    assert "reusing the finished soup" in capsys.readouterr().out and again.model is None
    assert again.curve.eval_ppl.tolist() == pytest.approx(r.curve.eval_ppl.tolist())
    assert again.curve.model.tolist() == r.curve.model.tolist()  # the runs' names, not the model's alone


def test_soup_needs_full_finetuning_and_says_what_it_keeps(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")  # inside accelerate launch
    with pytest.raises(ValueError, match="a soup is made by one process"):
        finetune.finetune(tiny_params(soup_seeds=2, quantization="none", full_finetune=True), [], [], tmp_path)
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(params.ParamsError, match="soup_seeds > 1 averages whole models"):
        tiny_params(soup_seeds=2, quantization="none")
    with pytest.raises(params.ParamsError, match="soup_seeds"):
        tiny_params(soup_seeds=0)
    assert params.kept(True, 1250, 4, 1, 2) == "soup of 2 seeds' best models (step 1250), 4 beams"
    assert params.kept(True, 1250, 4) == "best model (step 1250), 4 beams"


def test_the_report_takes_a_soups_own_row(tmp_path):
    """A soup's curve holds its members' curves and the soup's row at the same best step: the headline's
    fine-tuned numbers are the soup row's, and its setting says it is a soup."""
    import json
    import shutil

    import pandas as pd

    from lib import report
    from tests.test_publish import ROOT

    folder = shutil.copytree(ROOT / "reports/course-H200", tmp_path / "study")
    ft = folder / "01_finetune"
    doc = json.loads((ft / "results.json").read_text())
    doc["provenance"]["params"] |= {"quantization": "none", "full_finetune": True, "num_beams": 4, "soup_seeds": 2}
    member = doc["summary"]["best_ppl"]
    doc["summary"]["soup"] = {"seeds": [0, 1], "soup": {"eval_ppl": 7.0, "eval_bits_per_char": 2.4}, "members": [
        {"seed": 0, "best_step": doc["summary"]["best_step"], "eval_ppl": member, "eval_bits_per_char": 2.7},
        {"seed": 1, "best_step": doc["summary"]["best_step"], "eval_ppl": member * 1.1, "eval_bits_per_char": 2.8}]}
    doc["summary"] |= {"best_ppl": 7.0, "best_bits_per_char": 2.4}
    (ft / "results.json").write_text(json.dumps(doc))
    curve = pd.read_csv(ft / "curve.csv")
    best = doc["summary"]["best_step"]
    values = {"eval_ppl": 7.0, "eval_ppl_classical": 6.5, "eval_ppl_modern": 7.5, "eval_bits_per_char": 2.4,
              "eval_bits_per_char_classical": 2.3, "eval_bits_per_char_modern": 2.5}
    soup_row = pd.DataFrame([{"step": best, "run": "soup", **values}])
    pd.concat([curve.assign(run="seed 0"), curve.assign(run="seed 1", eval_ppl=curve.eval_ppl * 1.1), soup_row],
              ignore_index=True).to_csv(ft / "curve.csv", index=False)
    h = report.headline(report.load_all(folder))
    tuned = h[h.method == "full fine-tuning"].set_index("direction")
    assert tuned.setting.iloc[0] == f"soup of 2 seeds' best models (step {best}), 4 beams"
    assert tuned.mean_ppl.to_dict() == {"all": 7.0, "classical": 6.5, "modern": 7.5}
    assert tuned.bits_per_char.to_dict() == {"all": 2.4, "classical": 2.3, "modern": 2.5}
    from lib import discussion

    said = discussion.text(report.load_all(folder))
    assert f"best public-test perplexity of the first run, {member:.2f}, comes at step {doc['summary']['best_step']}" in said
    assert f"(seed 0: {member:.2f} / 2.700; seed 1: {member * 1.1:.2f} / 2.800): better than the best run " \
           f"({7.0 / member - 1:+.1%} mean perplexity)" in said


def test_soup_runs_train_side_by_side_from_the_command_line_and_are_read_back(tmp_path, capsys):
    """`python -m lib.train P --out D --soup-member K` trains the K-th run alone into D/seed-<seed>; two
    started at once, the soup's 01 then reads both back instead of training them; a K out of range is
    a one-line error."""
    import subprocess
    import sys

    import yaml

    from lib import ROOT

    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump({"common": {"model": TINY, "eval_limit": 6, "quantization": "none"}, "train": {
        "full_finetune": True, "soup_seeds": 2, "max_steps": 4, "eval_steps": 2, "save_steps": 0, "micro_batch_size": 4,
        "grad_accum": 1, "learning_rate": 1e-3}}))
    out = tmp_path / "01_finetune"
    cmd = [sys.executable, "-m", "lib.train", str(f), "--out", str(out), "--soup-member"]
    procs = [subprocess.Popen(cmd + [k], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in "01"]
    assert [p.wait() for p in procs] == [0, 0]
    for k in (0, 1):  # run K is the recipe with seed + K, a plain run
        recipe = json.loads((out / f"seed-{k}" / "run.json").read_text())["recipe"]
        assert (recipe["seed"], recipe["soup_seeds"]) == (k, 1)
    p = paramfile.load(f)["01_finetune"]
    r = finetune.finetune(p, data.load_split(p.data_dir, "train"), data.load_split(p.data_dir, "public_test", limit=6), out)
    said = capsys.readouterr().out
    assert said.count("reusing the finished run") == 2 and "resuming" not in said
    assert r.summary["soup"]["seeds"] == [0, 1]
    import shutil

    shutil.rmtree(out / "seed-1" / "best_adapter")  # results carried without the weights
    (out / "summary.json").unlink()
    with pytest.raises(finetune.runs.RunError, match=r"seed-1/best_adapter is missing"):
        finetune.finetune(p, data.load_split(p.data_dir, "train"), data.load_split(p.data_dir, "public_test", limit=6), out)
    bad = subprocess.run(cmd + ["2"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 1 and "the soup has runs 0..1" in bad.stderr and "Traceback" not in bad.stderr
