"""Bad files, bad params and kills, as a new user meets them: each gets one clear line, nothing is lost.

One test per row of the reliability issue (its numbers in the names)."""
import dataclasses
import json
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lib import data, evaluate, finetune, paramfile, params, prompts, runs
from tests.tiny_model import TINY

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(model=TINY, micro_batch_size=4, grad_accum=1, max_steps=4, eval_steps=2, save_steps=2,
            logging_steps=1, eval_limit=4, learning_rate=1e-2)


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, **kw)


def records():
    return data.load_split("data/sample", "train", limit=16), data.load_split("data/sample", "public_test", limit=4)


def test_02_kill_mid_save_resumes_from_the_last_complete_checkpoint(tmp_path, monkeypatch, capsys):
    """The save of checkpoint-4 fails after its first file (the adapter): the resume skips it."""
    from transformers import Trainer

    tr, ev = records()
    p = params.FinetuneParams(**BASE)
    full = finetune.finetune(p, tr, ev, tmp_path / "full").curve
    real = Trainer._save_optimizer_and_scheduler

    def dies_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise KeyboardInterrupt("killed mid-save")
        return real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        finetune.finetune(p, tr, ev, tmp_path / "cut")
    ckpt = tmp_path / "cut" / "checkpoints" / "checkpoint-4"
    assert (ckpt / "adapter_model.safetensors").exists() and not (ckpt / "complete").exists()
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", real)
    cut = finetune.finetune(p, tr, ev, tmp_path / "cut").curve
    assert "not completely written" in capsys.readouterr().out
    assert cut.step.tolist() == full.step.tolist() == [0, 2, 4]
    assert cut.eval_ppl.to_numpy() == pytest.approx(full.eval_ppl.to_numpy(), rel=1e-4)


def test_02b_a_corrupt_checkpoint_is_named(tmp_path):
    tr, ev = records()
    p = params.FinetuneParams(**{**BASE, "max_steps": 2})
    finetune.finetune(p, tr, ev, tmp_path)
    (tmp_path / "summary.json").unlink()  # not finished: it would resume
    (tmp_path / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2, "log')
    with pytest.raises(runs.RunError, match=r"checkpoint-2/trainer_state.json: unreadable .* damaged"):
        finetune.finetune(p, tr, ev, tmp_path)


def test_03_resuming_another_runs_folder_is_an_error(tmp_path):
    tr, ev = records()
    finetune.finetune(params.FinetuneParams(**BASE), tr, ev, tmp_path)
    with pytest.raises(runs.RunError, match=r"holds another run \(differs in max_steps, data:train\)"):
        finetune.finetune(params.FinetuneParams(**{**BASE, "max_steps": 2}), tr[:8], ev, tmp_path)


def test_03b_a_finished_run_is_read_back_not_trained(tmp_path, capsys):
    tr, ev = records()
    p = params.FinetuneParams(**BASE)
    first = finetune.finetune(p, tr, ev, tmp_path)
    again = finetune.finetune(p, tr, ev, tmp_path)
    assert "reusing the finished run" in capsys.readouterr().out and again.model is None
    assert again.curve.eval_ppl.tolist() == pytest.approx(first.curve.eval_ppl.tolist())
    # how the same work is launched is not the recipe: still read back; how it is computed is
    lean = finetune.finetune(dataclasses.replace(p, ddp_lean=not p.ddp_lean), tr, ev, tmp_path)
    assert lean.model is None and lean.curve.eval_ppl.tolist() == pytest.approx(first.curve.eval_ppl.tolist())
    def same(base=p, **kw):
        return runs.describe(dataclasses.replace(base, **kw), tr, ev) == runs.describe(base, tr, ev)

    assert same(ddp_lean=not p.ddp_lean, logging_steps=3) and same(dataclasses.replace(p, compile=True), cpp_wrapper=True)
    assert not same(compile=not p.compile) and not same(ddp_bf16_grads=True)  # bf16-rounded sums: another curve


def test_04_a_record_without_answer_room(tmp_path, tiny):
    _, _, tok = tiny
    recs = data.load_split("data/sample", "public_test", limit=3)
    long = [dict(recs[0], instruction=recs[0]["instruction"] * 60)] + recs[1:]
    with pytest.raises(ValueError, match=f"no answer token within max_length=512 .* first: {recs[0]['id']}"):
        evaluate.score_records(tiny[0], tok, long, [prompts.build(r["instruction"]) for r in long], 4, 512)
    from lib import collate

    feats, _, skipped = collate.encode_examples(tok, long, "course", 512)
    assert skipped == [recs[0]["id"]] and len(feats) == 2


def test_05_truncated_model_file_names_the_folder(tmp_path):
    import shutil

    from lib import models

    shutil.copytree(TINY, tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{")
    with pytest.raises(models.ModelError, match=str(tmp_path / "m")):
        models.load_model(str(tmp_path / "m"), "none")


@pytest.mark.parametrize("text,msg", [
    ("train:\n  train_limit: -2\n", "'train_limit' must be >= 0"),  # 07
    ("03_fewshot_sweep:\n  quality_limit: -1\n", "'quality_limit' must be >= 0"),
    ("01_finetune:\n  gen_batch_size: 0\n", "'gen_batch_size' must be > 0"),  # 08
    ("01_finetune:\n  max_new_tokens: -1\n", "'max_new_tokens' must be > 0"),
    ("", "the params file is empty"),  # 09
    ("train:\n  learning_rate: 1e-4\n  lora_dropout: 1.5\n", "'lora_dropout' must be in"),  # 12: 1e-4 is read
])
def test_07_08_09_12_bad_params_fail_before_any_work(tmp_path, text, msg):
    f = tmp_path / "p.yaml"
    f.write_text(text)
    with pytest.raises(params.ParamsError, match=msg):
        paramfile.load(f)


def test_10_resumed_summary_and_curve_columns(tmp_path):
    tr, ev = records()
    p = params.FinetuneParams(**BASE)
    full = finetune.finetune(p, tr, ev, tmp_path / "full")
    finetune.finetune(params.FinetuneParams(**{**BASE, "max_steps": 4}), tr, ev, tmp_path / "cut")
    (tmp_path / "cut" / "summary.json").unlink()  # as if killed after checkpoint-4 ... resume from 2:
    import shutil

    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "checkpoint-4")
    cut = finetune.finetune(p, tr, ev, tmp_path / "cut")
    assert list(pd.read_csv(tmp_path / "cut" / "curve.csv").columns) == list(pd.read_csv(tmp_path / "full" / "curve.csv").columns)
    # seconds per step of the resumed part: 2 steps ran, not 4 (was: the part's time over all steps)
    assert cut.summary["train_s_per_step"] > 0.3 * full.summary["train_s_per_step"]


def test_11_random_k_larger_than_the_pool():
    from lib import fewshot

    tr, ev = records()
    with pytest.raises(ValueError, match="k=20 random examples asked, but the pool has 16"):
        fewshot.Selector(tr).examples("random", ev[0], 20)


def test_13_ctrl_c_prints_one_line_on_how_to_resume(tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"common": {"model": TINY, "eval_limit": 4}, "train": {
        "micro_batch_size": 4, "grad_accum": 2, "max_steps": 40, "eval_steps": 2, "save_steps": 2,
        "learning_rate": 0.01}}))
    # a shell that starts jobs in the background hands them SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: give the child the default disposition, as a terminal would
    proc = subprocess.Popen([sys.executable, "-u", "-m", "lib.train", str(cfg), "--out", str(tmp_path / "o")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:
        if "step 4: eval" in line:
            proc.send_signal(signal.SIGINT)
            break
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "interrupted; run the same command again to resume" in rest and "Traceback" not in rest


def test_14_params_and_data_errors_through_lib_train_are_one_line(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("train:\n  lora_rr: 8\n")
    r = cli("lib.train", str(f), "--out", str(tmp_path / "o"))
    assert r.returncode == 1 and r.stderr.startswith("error:") and "lora_rr" in r.stderr
    assert "Traceback" not in r.stderr
    f.write_text(f"common:\n  data_dir: {tmp_path}\n")
    r = cli("lib.train", str(f), "--out", str(tmp_path / "o"))
    assert r.returncode == 1 and "train.json: file not found" in r.stderr and "Traceback" not in r.stderr


def test_15_json_cut_inside_a_character(tmp_path):
    text = json.dumps([{"id": "a", "instruction": "翻譯成現代文：子曰", "output": "孔子說"}], ensure_ascii=False)
    raw = text.encode()
    (tmp_path / "train.json").write_bytes(raw[:raw.index("說".encode()) + 1])  # 1 of the character's 3 bytes
    with pytest.raises(data.DataError, match="ends in the middle of a character .* truncated"):
        data.load_records(tmp_path / "train.json")


def test_a_run_recorded_before_a_new_option_existed_is_still_reused(tmp_path, capsys):
    """run.json written by older code lacks a field added since (at its default): still the same run."""
    tr, ev = records()
    p = params.FinetuneParams(**BASE)
    finetune.finetune(p, tr, ev, tmp_path)
    doc = json.loads((tmp_path / "run.json").read_text())
    del doc["recipe"]["neftune_noise_alpha"]
    (tmp_path / "run.json").write_text(json.dumps(doc))
    assert finetune.finetune(p, tr, ev, tmp_path).model is None  # read back
    assert "reusing the finished run" in capsys.readouterr().out
    with pytest.raises(runs.RunError, match="differs in neftune_noise_alpha"):
        finetune.finetune(params.FinetuneParams(**BASE, neftune_noise_alpha=5.0), tr, ev, tmp_path)


def test_concurrent_writers_of_one_file_never_fail(tmp_path):
    """Under DDP every process records its run in the same run.json (the same text). With one shared
    temporary name a writer could rename the file another had just renamed: 'No such file or directory'
    failed a 2-process CI run. Eight threads writing one file 100 times each: no error, the file holds
    one writer's text whole, no temporary file left behind."""
    import threading

    from lib.results import atomic_write

    path, errors = tmp_path / "run.json", []

    def write(i):
        try:
            for _ in range(100):
                atomic_write(path, f"writer {i} " * 50)
        except OSError as e:
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert path.read_text() in {f"writer {i} " * 50 for i in range(8)}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_a_stated_commit_wins_over_the_trees_git(monkeypatch):
    """On a lent GPU the tree's copy may carry an older .git: CCT_GIT_COMMIT, when set, is what a result
    records; without it, the repository's own HEAD."""
    import subprocess

    from lib import results

    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=results.ROOT).stdout.strip()
    monkeypatch.delenv("CCT_GIT_COMMIT", raising=False)
    monkeypatch.delenv("CCT_GIT_TREE", raising=False)
    assert results.git_state()["commit"] == head
    monkeypatch.setenv("CCT_GIT_COMMIT", "0" * 40)
    assert results.git_state() == {"commit": "0" * 40, "dirty": False}
    monkeypatch.setenv("CCT_GIT_DIRTY", "1")
    assert results.git_state()["dirty"] is True


def test_a_copy_whose_files_are_not_its_commits_is_dirty(tmp_path, monkeypatch):
    """A tree copied to a lent GPU has no git: the bundle lists its commit's files (.stD/tree.txt) and a
    result is "dirty" when a file there differs, is gone, or a link points elsewhere - what git status
    says of the same changes in the repository itself (the oracle here)."""
    import os
    import subprocess

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bundle

    from lib import results

    repo = tmp_path / "repo"
    (repo / "lib").mkdir(parents=True)
    (repo / "lib" / "trainer.py").write_text("x = 1\n")
    (repo / "odd name\twith tab é.txt").write_bytes(b"\x00\x01")
    os.symlink("lib/trainer.py", repo / "link")

    def git(*a):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=repo,
                              capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "c")
    bundle.scripts(repo, "0" * 64, 1, [], git("rev-parse", "HEAD").strip(), False)
    manifest = repo / ".stD" / "tree.txt"
    assert "CCT_GIT_TREE=$PWD/.stD/tree.txt" in (repo / ".stD" / "env.sh").read_text()

    def both():
        return results.tree_changed(manifest, repo), bool(git("status", "--porcelain", "--untracked-files=no"))

    assert both() == (False, False)
    for change, undo in [
        (lambda: (repo / "lib" / "trainer.py").write_text("x = 2\n"), lambda: git("checkout", "-q", "--", "lib")),
        (lambda: (repo / "lib" / "trainer.py").unlink(), lambda: git("checkout", "-q", "--", "lib")),
        (lambda: (repo / "odd name\twith tab é.txt").write_bytes(b"\x00"), lambda: git("checkout", "-q", "--", ".")),
        (lambda: ((repo / "link").unlink(), os.symlink("elsewhere", repo / "link")), lambda: git("checkout", "-q", "--", "link")),
    ]:
        change()
        assert both() == (True, True)
        undo()
        assert both() == (False, False)
    monkeypatch.setattr(results, "ROOT", repo)
    monkeypatch.setenv("CCT_GIT_COMMIT", "1" * 40)
    monkeypatch.delenv("CCT_GIT_DIRTY", raising=False)
    monkeypatch.setenv("CCT_GIT_TREE", str(manifest))
    assert results.git_state() == {"commit": "1" * 40, "dirty": False}
    (repo / "lib" / "trainer.py").write_text("x = 3\n")
    assert results.git_state()["dirty"] is True
    monkeypatch.setenv("CCT_GIT_TREE", str(tmp_path / "none.txt"))  # a bundle made before the list: unknown
    assert results.git_state()["dirty"] is False
