"""The benchmark scripts run, and their diagnostics compute what they claim (no timing asserted)."""
import dataclasses
import gzip
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import memtrace  # noqa: E402
import stacks  # noqa: E402
import train_speed  # noqa: E402
from lib import paramfile, params  # noqa: E402
from lib.paramcheck import ParamsError  # noqa: E402
from tests.tiny_model import TINY


def test_decode_sweep_on_the_tiny_model(tmp_path, monkeypatch):
    """decode_sweep: 01's own decoding first, then each setting; the setting reaches generate() (a 2-token
    limit gives answers of at most 2 characters: one token a character here); a bad key stops it early."""
    import decode_sweep
    import yaml

    from lib import data, finetune, paramfile

    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"common": {"model": TINY, "eval_limit": 4}, "train": {
        "micro_batch_size": 4, "grad_accum": 1, "max_steps": 2, "eval_steps": 2, "save_steps": 2, "logging_steps": 1},
        "01_finetune": {"max_new_tokens": 8, "gen_batch_size": 4}}))
    p = paramfile.load(cfg)["01_finetune"]
    finetune.finetune(p, data.load_split(p.data_dir, "train", limit=8), data.load_split(p.data_dir, p.eval_split, limit=4),
                      tmp_path / "run")
    out = tmp_path / "s.json"
    decode_sweep.main([str(cfg), "--run", str(tmp_path / "run"), "--limit", "4", "max_new_tokens=2 num_beams=2",
                       "--json", str(out)])
    doc = json.loads(out.read_text())
    assert [r["setting"] for r in doc["rows"] if r["direction"] == "all"] == ["01's own", "max_new_tokens=2 num_beams=2"]
    assert all(0 <= r["chrF"] <= 100 and r["n"] > 0 for r in doc["rows"])
    assert all(len(x) <= 2 for x in doc["answers"]["max_new_tokens=2 num_beams=2"])
    assert any(len(x) > 2 for x in doc["answers"]["01's own"])  # 8 new tokens
    with pytest.raises(ParamsError, match="not key=value of a GenerateParams field"):
        decode_sweep.main([str(cfg), "--run", str(tmp_path / "run"), "learning_rate=1"])

    # A run cut during its second setting keeps the first's rows (the cut: generate() fails on its 2nd call).
    calls = []
    real = decode_sweep.generate.translate

    def cut_at_second(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(decode_sweep.generate, "translate", cut_at_second)
    with pytest.raises(KeyboardInterrupt):
        decode_sweep.main([str(cfg), "--run", str(tmp_path / "run"), "--limit", "4", "num_beams=2",
                           "--json", str(tmp_path / "cut.json")])
    cut = json.loads((tmp_path / "cut.json").read_text())
    assert [r["setting"] for r in cut["rows"] if r["direction"] == "all"] == ["01's own"]


def test_recipe_sweep_on_the_tiny_model(tmp_path, capsys):
    """recipe_sweep: the baseline and three variants, each in its own process, two at once. The baseline's
    curve is the one finetune() gives in this process; a variant changing only how evaluation is batched
    has the same curve, one changing the learning rate another; a variant that fails loses nothing of the
    others (their rows are saved, the failure is named); a rerun reads every finished run back; chrF is
    measured once; a key that is no recipe field stops it before anything trains."""
    import recipe_sweep
    import yaml

    from lib import data, finetune, paramfile

    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"common": {"model": TINY, "eval_limit": 4, "eval_batch_size": 4}, "train": {
        "micro_batch_size": 4, "grad_accum": 1, "max_steps": 2, "eval_steps": 1, "save_steps": 2, "logging_steps": 1},
        "01_finetune": {"max_new_tokens": 4, "gen_batch_size": 4, "quality_limit": 3}}))
    out = tmp_path / "sweep"
    args = [str(cfg), "--out", str(out), "--parallel", "2", "--quality", "--report-s", "0", "+train_limit=8",
            "eval_batch_size=1", "learning_rate=0.05", "target_modules=[no_such_proj]"]
    with pytest.raises(SystemExit, match=r"not finished: \['target_modules=-no_such_proj-'\]"):
        recipe_sweep.main(args)
    assert "  baseline: " in capsys.readouterr().out  # progress lines while runs train
    doc = json.loads((out / "recipe_sweep.json").read_text())
    base, same, lr, bad = doc["rows"]
    assert [r["variant"] for r in doc["rows"]] == ["baseline", "eval_batch_size=1", "learning_rate=0.05",
                                                  "target_modules=-no_such_proj-"]
    assert doc["exit_codes"] == {"baseline": 0, "eval_batch_size=1": 0, "learning_rate=0.05": 0,
                                 "target_modules=-no_such_proj-": 1}
    assert "error" in bad and "not found" in (out / bad["variant"] / "train.log").read_text()

    p = paramfile.load(cfg)["01_finetune"]
    direct = finetune.finetune(p, data.load_split(p.data_dir, "train", limit=8),
                               data.load_split(p.data_dir, p.eval_split, limit=4), tmp_path / "direct").curve
    ppl = lambda r: [c["eval_ppl"] for c in r["curve"]]  # noqa: E731
    assert ppl(base) == pytest.approx(direct.eval_ppl.tolist(), rel=1e-5)
    assert ppl(same) == pytest.approx(ppl(base), rel=1e-4)
    assert ppl(lr)[0] == pytest.approx(ppl(base)[0], rel=1e-4)  # step 0: the same base model
    assert abs(ppl(lr)[-1] / ppl(base)[-1] - 1) > 1e-3
    assert len(base["quality"]) >= 2 and all(0 <= q["chrF"] <= 100 and q["n"] > 0 for q in base["quality"])
    assert base["quality"][0]["n"] == 3  # quality_limit, as 01

    finished = lambda: {f: f.stat().st_mtime_ns for f in out.glob("*/*.json") if bad["variant"] not in str(f)}  # noqa: E731
    stamps = finished()
    with pytest.raises(SystemExit):
        recipe_sweep.main(args)  # the finished runs read back: none trains, no chrF generated again
    assert finished() == stamps and len(stamps) >= 9
    assert "reusing the finished run" in (out / "baseline" / "train.log").read_text()
    with pytest.raises(ParamsError, match="not key=value of a TrainParams field"):
        recipe_sweep.main([str(cfg), "--out", str(out), "num_beams=2"])


def test_last_eval_is_a_runs_latest_evaluation(tmp_path):
    import recipe_sweep

    log = tmp_path / "train.log"
    assert recipe_sweep.last_eval(log) == ""
    log.write_text("note: x\rstep 1: eval ppl 12.5\n10%|# | 1/10\n\rstep 2: eval ppl 11.25\nsaving\n")
    assert recipe_sweep.last_eval(log) == "step 2: eval ppl 11.25"


def tiny_params_by_hand() -> int:
    """The tiny Llama's parameters counted by hand: embeddings + LM head 2 x V x 64, per layer (2) 4
    attention (q, o 64x64; k, v 64x32), 3 MLP 64x128, 2 norms; final norm."""
    v = json.loads((Path(TINY) / "config.json").read_text())["vocab_size"]
    return 2 * v * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64


def test_ddp_compare_on_cpu(tmp_path, monkeypatch, capsys):
    """ddp_compare: 1 and 2 processes (gloo) of the same recipe, both curves kept, equal, and a ratio of
    the typical step times."""
    import ddp_compare
    import yaml

    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"common": {"model": TINY, "eval_limit": 5}, "train": {
        "micro_batch_size": 2, "grad_accum": 2, "max_steps": 4, "eval_steps": 2, "save_steps": 4, "logging_steps": 1}}))
    monkeypatch.setattr(sys, "argv", ["ddp_compare.py", str(cfg), "--out", str(tmp_path / "o"), "+learning_rate=0.01"])

    def not_here():
        raise AssertionError("ddp_compare.py timed the GPU in its own process: it would hold a CUDA context on "
                             "GPU 0 while its runs train")

    import gpu_meter

    from lib import results

    monkeypatch.setattr(gpu_meter, "matmul_rate", not_here)
    monkeypatch.setattr(ddp_compare, "matmul_rate", not_here, raising=False)
    monkeypatch.setattr(results, "hardware", not_here)  # its device name query starts CUDA too
    ddp_compare.main()
    doc = json.loads((tmp_path / "o" / "ddp_compare.json").read_text())
    assert doc["matmul_flops_per_s"] > 0 and doc["hardware"]["cpus"] > 0  # measured all the same, by children
    one, two = (r["curve"] for r in doc["runs"])
    assert [r["step"] for r in one] == [r["step"] for r in two] == [0, 2, 4]
    assert doc["max_rel_diff_eval_ppl"] < 1e-5 and one[-1]["eval_ppl"] < one[0]["eval_ppl"]
    s1, s2 = (r["summary"] for r in doc["runs"])
    assert doc["speedup"] == pytest.approx(s1["median_s_per_step"] / s2["median_s_per_step"])
    assert doc["speedup_steady"] == pytest.approx(s1["steady_s_per_step"] / s2["steady_s_per_step"])
    assert (tmp_path / "o" / "ddp_curves.png").exists()
    # each process's median step and fetch, as its run's summary has them
    x = s2["per_process"][1]
    assert f"1: {x['median_s_per_step']:.4f} s, {x['median_fetch_s']:.4f} s fetching" in capsys.readouterr().out
    # tokens/s and MFU of each run: its real tokens a step over its typical step, per process against the
    # matmul rate measured in the run. Tokens a step counted by hand: BOS + prompt + answer + EOS of every
    # training record, on average, times the effective batch (2 x 2)
    from lib import data, models, prompts

    tok = models.load_tokenizer(TINY)
    n = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    recs = data.load_split("data/sample", "train")
    by_hand = sum(2 + n(prompts.build(r["instruction"])) + n(r["output"]) for r in recs) / len(recs) * 4
    assert s1["tokens_per_step"] == s2["tokens_per_step"] == pytest.approx(by_hand, abs=0.05)
    for r, s in zip(doc["runs"], (s1, s2)):
        assert r["tokens_per_s"] == round(s["tokens_per_step"] / s["median_s_per_step"])
        assert r["tokens_per_s_steady"] == round(s["tokens_per_step"] / s["steady_s_per_step"])
        assert r["mfu"] * doc["matmul_flops_per_s"] * r["processes"] == pytest.approx(
            s["tokens_per_step"] / s["median_s_per_step"] * 6 * tiny_params_by_hand(), rel=1e-6)


def test_train_speed_folds_a_batchs_ids_into_a_proxy_vocabulary():
    """--vocab 10: the records' ids (14 -> 4) and the pads the collator adds (50 -> 0) land inside the model's
    vocabulary, labels alike but for the ignored -100; the tokens counted are the records'. Without it, as is."""
    from lib import collate

    feats = [{"input_ids": [3, 14, 5], "labels": [-100, 14, 5]}, {"input_ids": [27], "labels": [27]}]
    c = train_speed.Counting(collate.PadCollator(50), vocab=10)
    batch = c(feats)
    assert batch["input_ids"].tolist() == [[3, 4, 5], [7, 0, 0]] and c.tokens == 4
    assert batch["labels"].tolist() == [[-100, 4, 5], [7, -100, -100]]
    assert train_speed.Counting(collate.PadCollator(50))(feats)["input_ids"].tolist() == [[3, 14, 5], [27, 50, 50]]


def _train_speed(tmp_path, monkeypatch, modes, *more):
    """train_speed.py on the tiny model, 16 sample records, 3 steps on CPU; returns its JSON's path."""
    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", [
        "train_speed.py", "--model", TINY, "--data-dir", "data/sample", "--records", "16", "--micro-batch", "4",
        "--steps", "3", "--warmup", "1", "--device", "cpu", "--params", "params/default.yaml",
        "--work", str(tmp_path / "w"), "--json", str(out), "--modes", modes, *more])
    train_speed.main()
    return out


def test_train_speed_over_processes(tmp_path, monkeypatch):
    """--processes 1,2: each count in its own accelerate launch (CPU, gloo) at the same effective batch
    (4 x 2 on one process, 4 x 1 on each of two): the same losses."""
    out = _train_speed(tmp_path, monkeypatch, "project", "--grad-accum", "2", "--processes", "1,2")
    runs = json.loads(out.read_text())["runs"]
    one, two = runs["1"]["rows"][0], runs["2"]["rows"][0]
    assert (one["processes"], two["processes"]) == (1, 2)
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5) and len(one["losses"]) == 3
    assert two["over_1"] == pytest.approx(two["tokens_per_s"] / one["tokens_per_s"], abs=1e-3)  # 2 over 1, not 1 over 2


def test_train_speed_modes_on_the_tiny_model(tmp_path, monkeypatch, capsys):
    """Baseline and project (seed settings but the answer-only loss) see the same batches: same losses;
    each mode says where it is (a call cut short shows where it stopped)."""
    out = _train_speed(tmp_path, monkeypatch, "baseline,project+lean_nf4=true")
    printed = capsys.readouterr().out
    assert "project+lean_nf4=true: building the model" in printed and "project+lean_nf4=true: step 3/3 (" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["baseline", "project+lean_nf4=true"]
    assert rows[0]["settings"] == train_speed.BASELINE and rows[1]["settings"]["lean_nf4"] is True
    assert all(r["tokens_per_s"] > 0 and len(r["losses"]) == 3 for r in rows)
    assert all(0 < r["fetch_s_per_step"] < r["s_per_step"] for r in rows)  # the timed steps' fetches, within them
    # MFU = tokens/s x FLOPs per token / the matmul rate measured in the run
    doc = json.loads(out.read_text())
    n = tiny_params_by_hand()
    for r in rows:
        per_token = 2 * n * (3 if r["settings"]["gradient_checkpointing"] else 2)
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * per_token / doc["matmul_flops_per_s"], rel=0.05)
    assert rows[1]["losses"] == pytest.approx(rows[0]["losses"], rel=1e-4)


def test_step_losses_read_at_the_end_are_the_ones_the_trainer_logs(tmp_path, monkeypatch):
    """The losses kept on the device and read after training equal what the Trainer logs when it logs
    every step (its own sum over the 2 micro-batches of a step); by default it logs once, at the end:
    the mean of the same steps."""
    out = _train_speed(tmp_path, monkeypatch, "project+logging_steps=1,project", "--grad-accum", "2")
    every, once = json.loads(out.read_text())["rows"]
    assert len(every["logged_losses"]) == 3 and every["losses"] == pytest.approx(every["logged_losses"], abs=1e-4)
    assert once["losses"] == pytest.approx(every["losses"], rel=1e-5)
    assert once["logged_losses"] == pytest.approx([sum(every["logged_losses"]) / 3], rel=1e-3)


def test_mfu_counts_the_recomputed_share_of_layers(tmp_path, monkeypatch):
    """project+checkpointed_layers=1 on the 2-layer tiny model: half the layers run their forward again,
    so a token costs 2 x params x (2 + 1/2) FLOPs; the MFU is also given against the higher of the matmul
    rates measured before and after the runs."""
    rates = iter([3e11, 5e11])  # before and after the runs: the MFU is also given against the higher one
    monkeypatch.setattr(train_speed, "matmul_rate", lambda: next(rates))
    out = _train_speed(tmp_path, monkeypatch, "project+checkpointed_layers=1")
    doc = json.loads(out.read_text())
    r = doc["rows"][0]
    assert r["settings"]["checkpointed_layers"] == 1 and r["settings"]["gradient_checkpointing"]
    flops = r["tokens_per_s"] * 2 * tiny_params_by_hand() * 2.5
    assert (doc["matmul_flops_per_s"], doc["matmul_flops_per_s_after"]) == (3e11, 5e11)
    assert r["mfu"] == pytest.approx(flops / 3e11, rel=0.05)
    assert r["mfu_at_best_rate"] == pytest.approx(flops / 5e11, rel=0.05)


def test_profile_window_reports_the_hosts_time(tmp_path, monkeypatch, capsys):
    """--profile: after the timed steps, the profiled ones are summarized, the host's side included (a
    data-parallel rank waiting for the other shows up there, not in the GPU's kernels); --trace keeps the
    window's chrome trace and summary per process."""
    out = _train_speed(tmp_path, monkeypatch, "project", "--profile", "2", "--trace", str(tmp_path / "tr"))
    pr = json.loads(out.read_text())["rows"][0]["profile"]
    trace = json.loads(gzip.decompress((tmp_path / "tr" / "project.n1.rank0.trace.json.gz").read_bytes()))
    assert any(e.get("name") == "Optimizer.step#AdamW.step" for e in trace["traceEvents"])  # 2 profiled steps
    assert json.loads((tmp_path / "tr" / "project.n1.rank0.profile.json").read_text()) == pr
    gaps = pr["host_gaps"]  # the main thread's Python between ops: some, and within its span
    assert 0 < gaps["outside_ops_ms_per_step"] < gaps["span_ms_per_step"] and gaps["by_pair"]
    assert pr["wall_ms_per_step"] > 0 and pr["host_total_ms"] and pr["host_self_ms"]
    for ranked in (pr["host_total_ms"], pr["host_self_ms"]):  # (name, ms a step, calls a step), longest first
        assert [k[1] for k in ranked] == sorted((k[1] for k in ranked), reverse=True) and ranked[0][1] > 0
    assert any(k[0].startswith("aten::") for k in pr["host_total_ms"])  # ops, not only the step's wrappers
    # each event's time with callees is at least its own: the two lists are the same events, ranked twice
    total = {k[0]: k[1] for k in pr["host_total_ms"]}
    assert all(v <= total[k] + 1e-6 for k, v, _ in pr["host_self_ms"] if k in total)
    assert "host, by time with callees:" in capsys.readouterr().out


def test_profile_stacks_name_the_python_that_waits(tmp_path, monkeypatch):
    """--profile-stacks: the host's waits come with the Python frames that made them. Logging every step
    (logging_steps 1), the Trainer reads the loss and gradient norm with .item(): an aten::item whose stack
    names the Trainer's log, at least twice a step. By default the benchmark logs once, after the
    profiled steps, and reads its per-step losses at the end: no such wait in the steps."""
    out = _train_speed(tmp_path, monkeypatch, "project+logging_steps=1,project", "--profile", "2", "--profile-stacks")
    rows = json.loads(out.read_text())["rows"]

    def logged(row):
        return sum(w["per_step"] for w in row["profile"]["waits"]
                   if w["op"] == "aten::item" and any("trainer.py" in f and "_maybe_log_save_evaluate" in f
                                                      for f in w["stack"]))

    assert logged(rows[0]) >= 2 and logged(rows[1]) == 0
    # the profiler now records every Python call too: the host's ranking keeps ops only
    host = rows[0]["profile"]["host_total_ms"]
    assert host and not any(".py(" in k[0] or k[0].startswith("<built-in") for k in host)
    with pytest.raises(SystemExit, match="needs --profile"):
        _train_speed(tmp_path, monkeypatch, "project", "--profile-stacks")


def test_project_mode_takes_every_speed_setting_of_the_params_file():
    """`project` = the params file's speed settings, all of them: the 7B file's lean_nf4 (which the mode
    once dropped, running bitsandbytes' layers instead) and the DDP and checkpointing choices."""
    fp = paramfile.load("params/taiwan-llama-7b.yaml")["01_finetune"]
    assert fp.lean_nf4  # the file says so; the mode must too
    project = train_speed.project_settings(dataclasses.replace(fp, checkpointed_layers=3, balance_ranks=True))
    assert project["lean_nf4"] is True and project["checkpointed_layers"] == 3 and project["balance_ranks"] is True
    assert project["compute_dtype"] == "bfloat16" and project["optim"] == "adamw_torch_fused"
    assert "num_processes" not in project  # --processes decides
    assert project["quantization"] == "nf4"
    assert train_speed.project_settings(paramfile.load("params/study-lora.yaml")["01_finetune"])["quantization"] == "none"
    assert train_speed.mode_settings("baseline", project)["compute_dtype"] == "float32"


def test_mode_settings_reject_unknown_keys():
    with pytest.raises(ParamsError, match="not key=value of a TrainParams field"):
        train_speed.mode_settings("project+nope=1", {})
    assert train_speed.mode_settings("baseline+compile=true", {})["compile"] is True
    with pytest.raises(SystemExit, match="must start with one of baseline, project, liger, unsloth"):
        train_speed.mode_settings("plain", {})


def test_other_trainers_start_from_their_own_settings():
    """liger: the project's settings with the model's own loss (Liger fuses it); unsloth: bf16, its
    checkpointing, padded batches; --modes is read before transformers is imported (unsloth must come first)."""
    project = {**train_speed.BASELINE, "compute_dtype": "bfloat16", "answer_loss": True, "packing": True}
    liger = train_speed.mode_settings("liger", project)
    assert liger == {**project, "answer_loss": False, "compile": False, "compile_mode": "default", "cpp_wrapper": False,
                     "compiled_recompute": 0, "cuda_graphs": False}  # its Triton kernels break compile; so no setting of compile's
    fp = paramfile.load("params/taiwan-llama-7b.yaml")["01_finetune"]  # cpp_wrapper, compiled_recompute: 32
    for mode in ("liger", "project", "baseline", "unsloth"):
        params.TrainParams(model=TINY, **train_speed.mode_settings(mode, train_speed.project_settings(fp))).check()
    uns = train_speed.mode_settings("unsloth+packing=true", project)
    assert (uns["compute_dtype"], uns["gradient_checkpointing"], uns["answer_loss"], uns["packing"]) == (
        "bfloat16", True, False, True)
    assert train_speed.modes_arg(["x.py", "--modes", "unsloth"]) == "unsloth"
    assert train_speed.modes_arg(["x.py", "--modes=liger,project", "--steps", "3"]) == "liger,project"
    assert train_speed.modes_arg(["x.py"]) == ""


def test_liger_mode_patches_the_base_model_and_trains_with_its_own_loss(tmp_path, monkeypatch):
    """Liger-Kernel needs a GPU (Triton), so a stand-in module records what it is given: the 4-bit base
    model before LoRA wraps it, once; with the kernels left out, the model's own loss is the project's
    answer-only loss on the same batches."""
    import types

    patched = []
    fake = types.ModuleType("liger_kernel.transformers")
    fake._apply_liger_kernel_to_instance = lambda model: patched.append(type(model).__name__)
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    out = _train_speed(tmp_path, monkeypatch, "project,liger")
    rows = json.loads(out.read_text())["rows"]
    assert patched == ["LlamaForCausalLM"]  # the base, not peft's wrapper; only in the liger mode
    assert rows[1]["settings"]["answer_loss"] is False and rows[0]["settings"]["answer_loss"] is True
    assert rows[1]["losses"] == pytest.approx(rows[0]["losses"], rel=1e-4)


def test_unsloth_runs_in_an_invocation_of_its_own_and_liger_last(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train_speed.py", "--modes", "project,unsloth"])
    with pytest.raises(SystemExit, match="unsloth patches transformers"):
        train_speed.main()
    monkeypatch.setattr(sys, "argv", ["train_speed.py", "--modes", "project,liger,project+head_loss=cce"])
    with pytest.raises(SystemExit, match="put the liger modes last"):
        train_speed.main()


def test_memtrace_finds_the_peak_and_what_is_alive_then():
    f = lambda name: [{"filename": "/x/site-packages/lib/a.py", "line": 3, "name": name}]
    events = [{"action": "alloc", "addr": 1, "size": 100, "frames": f("weights")},
              {"action": "alloc", "addr": 2, "size": 50, "frames": f("temp")},
              {"action": "free_completed", "addr": 2, "size": 50},
              {"action": "alloc", "addr": 3, "size": 70, "frames": f("act")},  # peak: 170
              {"action": "free_completed", "addr": 3, "size": 70}]
    r = memtrace.peak_report({"device_traces": [events]}, base=0)
    assert r["peak_gib"] == round(170 / 2 ** 30, 2)
    assert sorted(s[1:] for s in r["sites"]) == [(1, "lib/a.py:3 act"), (1, "lib/a.py:3 weights")]


def test_stacks_counts_a_function_once_per_sample(tmp_path):
    raw = tmp_path / "s.txt"
    raw.write_text("main (a.py:1);f (a.py:5);f (a.py:9) 3\nmain (a.py:1);g (b.py:2) 1\n")
    total, inclusive, self_time = stacks.summarize(raw)
    assert total == 4 and inclusive["f (a.py)"] == 3 and inclusive["main (a.py)"] == 4
    assert self_time["f (a.py:9)"] == 3 and self_time["g (b.py:2)"] == 1


def _wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel (demo_pkg 0.1) built by hand."""
    import zipfile

    w = folder / "demo_pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(w, "w") as z:
        z.writestr("demo_pkg/__init__.py", "X = 42\n")
        z.writestr("demo_pkg-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: demo-pkg\nVersion: 0.1\n")
        z.writestr("demo_pkg-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("demo_pkg-0.1.dist-info/RECORD", "")
    return w


def test_bundle_travels_in_chunks_and_sets_up_a_device(tmp_path):
    """bundle.py: chunks that each call carries alone, staged one by one, joined and checked by the last
    call; then the wheels import and the data is data/raw. A fresh machine stops at once (exit 3), a
    missing chunk is named (exit 4), a damaged one fails the sha256 check; the same bundle cut smaller
    (--resplit, as the tree grows) stages and sets up too, and a damaged or missing chunk stops it."""
    import os
    import shutil
    import subprocess

    import bundle

    (tmp_path / "w").mkdir()
    _wheel(tmp_path / "w")
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.json").write_text('[{"id": "1", "instruction": "x", "output": "y"}]' * 40)
    repo = tmp_path / "repo"
    repo.mkdir()
    with pytest.raises(SystemExit, match="no wheels in"):
        bundle.main(["--wheels", str(tmp_path), "--root", str(repo)])
    with pytest.raises(SystemExit, match="not embedded"):
        bundle.main(["--models", "qwen-7b", "--root", str(repo)])
    bundle.main(["--wheels", str(tmp_path / "w"), "--data", str(data), "--chunk-bytes", "4096", "--root", str(repo)])
    chunks = sorted(repo.glob(".stG*"))
    assert len(chunks) >= 3

    def call(device, chunk, command):  # the tree a call carries: the scripts and one chunk
        tree = tmp_path / "tree"
        shutil.rmtree(tree, ignore_errors=True)
        shutil.copytree(repo / ".stD", tree / ".stD")
        if chunk is not None:
            shutil.copytree(chunk, tree / chunk.name)
        env = dict(os.environ, DEVICE_ROOT=str(device), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        return subprocess.run(["bash", "-c", command], cwd=tree, env=env, capture_output=True, text=True)

    before = (repo / ".stD" / "setup.sh").read_text()
    bundle.main(["--scripts-only", "--root", str(repo)])  # e.g. after a commit: the same scripts
    assert (repo / ".stD" / "setup.sh").read_text() == before and sorted(repo.glob(".stG*")) == chunks
    dev = tmp_path / "dev"
    for c in chunks[:-1]:
        assert call(dev, c, "bash .stD/stage.sh").returncode == 0
    r = call(dev, chunks[-1], "bash .stD/setup.sh")
    assert r.returncode == 0 and "setup done" in r.stdout, r.stderr
    r = call(dev, None, "source .stD/env.sh && python -c 'import demo_pkg; print(demo_pkg.X)' && cat data/raw/train.json")
    assert r.returncode == 0 and r.stdout.startswith("42\n") and r.stdout.endswith('"y"}]'), r.stderr

    r = call(tmp_path / "fresh", None, "source .stD/env.sh && echo ran")
    assert r.returncode == 3 and "ran" not in r.stdout and "no setup on this machine" in r.stderr
    r = call(tmp_path / "partial", chunks[-1], "bash .stD/setup.sh")
    named = " ".join(c.name for c in chunks[:-1])
    assert r.returncode == 4 and f"only 1 of {len(chunks)} chunks staged; missing: {named} " in r.stderr
    r = call(tmp_path / "changed", chunks[1], "bash .stD/stage.sh")  # a fresh machine half-way through
    assert r.stdout.startswith(f"staged: 1 of {len(chunks)}; missing: {chunks[0].name} {chunks[2].name}")
    bad = tmp_path / "bad"
    for c in chunks[:-1]:
        call(bad, c, "bash .stD/stage.sh")
    staged = bad / "stage" / "c00"
    staged.write_bytes(b"x" + staged.read_bytes()[1:])
    r = call(bad, chunks[-1], "bash .stD/setup.sh")
    assert r.returncode != 0 and "setup done" not in r.stdout and not (bad / "site" / "demo_pkg").exists()
    # the tree grew: the same bundle cut smaller, nothing rebuilt, staged and set up as before
    bundle.main(["--resplit", "--chunk-bytes", "2048", "--root", str(repo)])
    smaller = sorted(repo.glob(".stG*"))
    assert len(smaller) > len(chunks) and all(len(list(c.iterdir())) == 1 for c in smaller)
    for c in smaller[:-1]:
        assert call(tmp_path / "resplit", c, "bash .stD/stage.sh").returncode == 0
    r = call(tmp_path / "resplit", smaller[-1], "bash .stD/setup.sh")
    assert r.returncode == 0 and "setup done" in r.stdout, r.stderr
    (smaller[0] / "c00").write_bytes(b"x" + (smaller[0] / "c00").read_bytes()[1:])
    with pytest.raises(SystemExit, match="do not join into the bundle"):
        bundle.main(["--resplit", "--chunk-bytes", "4096", "--root", str(repo)])
    shutil.rmtree(smaller[1])
    with pytest.raises(SystemExit, match=f"chunks missing in .*{smaller[1].name}"):
        bundle.main(["--resplit", "--root", str(repo)])


def test_unsloth_gets_a_folder_whose_pad_is_not_eos(tmp_path):
    """unsloth stops on a tokenizer padding with EOS (the converted Qwen tokenizer did, on the H100): its
    folder links the model's weights and holds the tokenizer with an existing non-EOS token as pad, the
    vocabulary unchanged; the tokenizer passed in and the model's own folder are left alone."""
    from transformers import AutoTokenizer

    from lib import models

    tok = models.load_tokenizer(TINY)
    tok.pad_token = tok.eos_token  # as the converted Qwen tokenizer had it
    size = len(tok)
    folder = train_speed.unsloth_folder(Path(TINY), tok, tmp_path / "u")
    saved = AutoTokenizer.from_pretrained(folder)
    assert (saved.pad_token, saved.eos_token, len(saved)) == ("<pad>", "</s>", size)
    assert tok.pad_token == "</s>"  # the caller's tokenizer keeps its pad
    assert (folder / "config.json").is_symlink() and (folder / "config.json").resolve() == (Path(TINY) / "config.json").resolve()
    assert models.load_tokenizer(TINY).pad_token == "<pad>"  # the model's folder untouched


def test_bundle_chunks_leave_room_for_the_tree(tmp_path):
    """A chunk and the working tree travel together under 64 MiB: the default chunk is 64 MiB less the
    tree (tracked and untracked files git does not ignore) and a 2 MiB margin; no room is an error."""
    import subprocess

    import bundle

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("/big-ignored\n")
    (tmp_path / "tracked").write_bytes(b"x" * 3 * 2 ** 20)
    subprocess.run(["git", "add", "tracked", ".gitignore"], cwd=tmp_path, check=True)
    (tmp_path / "untracked").write_bytes(b"x" * 2 ** 20)
    (tmp_path / "big-ignored").write_bytes(b"x" * 70 * 2 ** 20)  # stays here: not counted
    tree = 4 * 2 ** 20 + len("/big-ignored\n")
    assert bundle.tree_bytes(tmp_path) == tree
    assert bundle.chunk_bytes(tmp_path) == 64 * 2 ** 20 - tree - 2 * 2 ** 20
    (tmp_path / "untracked").write_bytes(b"x" * 56 * 2 ** 20)
    with pytest.raises(SystemExit, match="too little room"):
        bundle.chunk_bytes(tmp_path)


def test_ddp_compare_keeps_the_one_gpu_run_when_the_call_is_cut(tmp_path, monkeypatch):
    """The JSON is written after each run: a call cut during the N-GPU run (as on the 2 x H100 machine)
    still returns the 1-GPU run's curve and speed."""
    import ddp_compare
    import yaml

    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"common": {"model": TINY}, "train": {"max_steps": 4, "eval_steps": 2}}))
    one = {"processes": 1, "summary": {"tokens_per_step": 100.0, "median_s_per_step": 0.5},
           "curve": pd.DataFrame({"step": [0, 2, 4], "eval_ppl": [9.0, 8.0, 7.0]})}

    def fake(p, n, out, repeat=0):
        if n > 1:
            raise KeyboardInterrupt  # the call's time limit
        return dict(one)

    monkeypatch.setattr(ddp_compare, "run", fake)
    monkeypatch.setattr(sys, "argv", ["ddp_compare.py", str(cfg), "--out", str(tmp_path / "o")])
    with pytest.raises(KeyboardInterrupt):
        ddp_compare.main()
    doc = json.loads((tmp_path / "o" / "ddp_compare.json").read_text())
    assert len(doc["runs"]) == 1 and doc["runs"][0]["tokens_per_s"] == 200
    assert [r["eval_ppl"] for r in doc["runs"][0]["curve"]] == [9.0, 8.0, 7.0]


def test_apart_runs_the_function_in_another_process(tmp_path):
    """gpu_meter.apart: the call runs in a child process (another pid), its result comes back (a Path as
    its string), a failure is raised with the child's error; train_speed's random model is made that way
    (the tiny Llama's architecture, loadable)."""
    import os

    from gpu_meter import apart

    assert apart("os", "getpid") != os.getpid()
    assert apart("os.path", "join", "a", "b") == "a/b"
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        apart("operator", "truediv", 1, 0)
    folder = apart("train_speed", "random_model", str(Path(TINY) / "config.json"), str(tmp_path / "m"))
    assert folder == str(tmp_path / "m")
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(folder)
    assert m.config.hidden_size == json.loads((Path(TINY) / "config.json").read_text())["hidden_size"]


def test_ddp_compare_repeats_interleave_the_pair_and_average_it(tmp_path, monkeypatch):
    """--repeats 2: the runs go 1, 2, 2, 1 GPUs (each variant once early, once late in the call), each repeat
    in its own folder; the ratio is of the mean steps over the repeats, and each pair's own is kept.
    By hand: 1 GPU 0.20 / 0.24 s, 2 GPUs 0.10 / 0.15 s -> 0.22 / 0.125 = 1.76x; pairs 2.0x, 1.6x."""
    import ddp_compare
    import yaml

    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"common": {"model": TINY}, "train": {"max_steps": 4, "eval_steps": 2}}))
    steps = {(1, 0): 0.20, (2, 0): 0.10, (1, 1): 0.24, (2, 1): 0.15}
    order = []

    def fake(p, n, out, repeat=0):
        order.append((n, repeat))
        s = steps[n, repeat]
        return {"processes": n, "repeat": repeat, "curve": pd.DataFrame({"step": [0, 4], "eval_ppl": [9.0, 7.0]}),
                "summary": {"tokens_per_step": 100.0, "median_s_per_step": s, "steady_s_per_step": 2 * s}}

    monkeypatch.setattr(ddp_compare, "run", fake)
    monkeypatch.setattr(sys, "argv", ["ddp_compare.py", str(cfg), "--out", str(tmp_path / "o"), "--repeats", "2"])
    ddp_compare.main()
    assert order == [(1, 0), (2, 0), (2, 1), (1, 1)]
    doc = json.loads((tmp_path / "o" / "ddp_compare.json").read_text())
    assert doc["speedup"] == pytest.approx(1.76) and doc["speedup_steady"] == pytest.approx(1.76)
    assert doc["speedup_pairs"] == pytest.approx([2.0, 1.6]) and doc["max_rel_diff_eval_ppl"] == 0
    assert [(r["processes"], r["repeat"]) for r in doc["runs"]] == order


def test_ddp_compare_starts_no_run_that_would_end_past_its_budget(tmp_path, monkeypatch, capsys):
    """--budget-s 300 with runs of 100 s (1 GPU) and 80 s (2 GPUs) on a fake clock, order 1, 2, 2, 1:
    the first 2-GPU run is expected to take the longest so far (100 s; 200 left: starts), the second 80 s
    (120 left: starts), the last 1-GPU run 100 s with 40 s left: not started, and listed."""
    import ddp_compare
    import yaml

    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"common": {"model": TINY}, "train": {"max_steps": 4, "eval_steps": 2}}))
    clock = {"now": 0.0}
    order = []

    def fake(p, n, out, repeat=0):
        order.append((n, repeat))
        clock["now"] += 100.0 if n == 1 else 80.0
        return {"processes": n, "repeat": repeat, "curve": pd.DataFrame({"step": [0, 4], "eval_ppl": [9.0, 7.0]}),
                "summary": {"tokens_per_step": 100.0, "median_s_per_step": 0.2 / n}}

    monkeypatch.setattr(ddp_compare, "run", fake)
    monkeypatch.setattr(ddp_compare, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(sys, "argv", ["ddp_compare.py", str(cfg), "--out", str(tmp_path / "o"), "--repeats", "2",
                                      "--budget-s", "300"])
    ddp_compare.main()
    assert order == [(1, 0), (2, 0), (2, 1)]
    doc = json.loads((tmp_path / "o" / "ddp_compare.json").read_text())
    assert doc["not_started"] == [{"processes": 1, "repeat": 1}] and len(doc["runs"]) == 3
    assert doc["speedup"] == pytest.approx(2.0)
    assert "not starting the 1-process run (repeat 1) nor the 0 after it: 40 s" in capsys.readouterr().out
    # a later call in a fresh folder whose 1-GPU run is already there: it is read back in a second, which is
    # no estimate of the next 1-GPU run. Budget 200: read back (t=1), 2 GPUs (no estimate: t=81), 2 GPUs
    # (80 <= 119 left: t=161), 1 GPU: estimated by the 80-s runs (39 left: not started), not by the second
    out2 = tmp_path / "o2"
    ddp_compare.run_folder(out2, 1, 0).mkdir(parents=True)
    (ddp_compare.run_folder(out2, 1, 0) / "summary.json").write_text("{}")
    clock["now"], order[:] = 0.0, []

    def read_back(p, n, out, repeat=0):
        if (ddp_compare.run_folder(out, n, repeat) / "summary.json").exists():
            order.append((n, repeat))
            clock["now"] += 1.0
            return {"processes": n, "repeat": repeat, "curve": pd.DataFrame({"step": [0, 4], "eval_ppl": [9.0, 7.0]}),
                    "summary": {"tokens_per_step": 100.0, "median_s_per_step": 0.2}}
        return fake(p, n, out, repeat)

    monkeypatch.setattr(ddp_compare, "run", read_back)
    monkeypatch.setattr(sys, "argv", ["ddp_compare.py", str(cfg), "--out", str(out2), "--repeats", "2", "--budget-s", "200"])
    ddp_compare.main()
    assert order == [(1, 0), (2, 0), (2, 1)]


@pytest.mark.parametrize("name, kind", [
    ("fmha_cutlassB_bf16_aligned_128x128_k128_seqaligned_sm80(PyTorchMemEffAttention::AttentionBackwardKernel", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel", "attention"),
    ("nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_TNT", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, unsigned char*", "dequantize"),
    ("triton_poi_fused___rshift____to_copy_bitwise_and_index_mul_stack_unsqueeze_0", "compiled"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "nccl"),
    ("void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl", "other elementwise"),
])
def test_kernel_kinds_of_real_kernel_names(name, kind):
    """Kernel names from the H100 profiles: the memory-efficient attention kernels are CUTLASS's and once
    counted as matmuls."""
    from gpu_meter import kernel_kind

    assert kernel_kind(name) == kind


def test_host_gaps_put_the_main_threads_python_between_its_ops():
    """A hand-made step on the main thread (tid 1): a forward 0-30 us (with an op inside), 20 us of Python,
    the loss's gradient 50-52 and 40 us waiting for autograd's thread (tid 2, not counted), an op, 8 us of
    Python, the optimizer step 110-130. Outside ops: 20 + 40 + 8 = 68 us of a 130-us span."""
    from gpu_meter import host_gaps

    op = lambda name, ts, dur, tid=1: {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "tid": tid}
    trace = {"traceEvents": [
        op("forward", 0, 30), op("aten::mm", 5, 10), op("aten::ones_like", 50, 2),
        op("CompiledFunctionBackward", 55, 30, tid=2), op("aten::reshape", 92, 10),
        op("Optimizer.step#AdamW.step", 110, 20)]}
    got = host_gaps(trace, n=1)
    assert got["span_ms_per_step"] == 0.13 and got["outside_ops_ms_per_step"] == 0.068
    assert got["by_pair"] == [("after aten::ones_like / before aten::reshape", 0.04, 1.0),
                              ("after forward / before aten::ones_like", 0.02, 1.0),
                              ("after aten::reshape / before Optimizer.step#AdamW.step", 0.008, 1.0)]


def test_idle_gaps_put_each_wait_on_the_host_op_that_ended_it():
    """A hand-made trace: kernel 1 runs 5-55 us; the optimizer launches kernel 2 at 120 us (the GPU idle
    70 us, the host late by 65); kernel 3, queued at 130, starts 5 us after kernel 2 ends (a small gap);
    aten::item blocks 40 us in a stream sync."""
    from gpu_meter import idle_gaps

    op = lambda name, ts, dur: {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "tid": 1}
    run = lambda name, ts, corr, dur=1: {"ph": "X", "cat": "cuda_runtime", "name": name, "ts": ts, "dur": dur,
                                         "tid": 1, "args": {"correlation": corr}}
    kern = lambda ts, dur, corr: {"ph": "X", "cat": "kernel", "name": "k", "ts": ts, "dur": dur, "tid": 7,
                                  "args": {"correlation": corr}}
    trace = {"traceEvents": [
        op("aten::mm", 0, 10), run("cudaLaunchKernel", 1, 1), kern(5, 50, 1),
        op("aten::item", 58, 45), run("cudaStreamSynchronize", 60, 99, dur=40),
        op("Optimizer.step", 100, 50), op("aten::_fused_adamw_", 110, 20), run("cudaLaunchKernel", 120, 2),
        kern(125, 10, 2), op("aten::add", 128, 5), run("cudaLaunchKernel", 130, 3), kern(140, 10, 3)]}
    got = idle_gaps(trace, n=1)
    assert got["idle_ms_per_step"] == 0.075 and got["in_gaps_over_20us_ms"] == 0.07
    assert got["between_queued_kernels_ms"] == 0.005 and got["gpu_span_ms_per_step"] == 0.145
    assert got["host_late_ms"] == 0.07 and got["launched_early_ms"] == 0.0
    assert got["by_launching_op"] == [("aten::_fused_adamw_", 0.07, 1.0)]
    assert got["by_outer_op"] == [("Optimizer.step", 0.07, 1.0)]
    assert got["host_blocked"] == [("cudaStreamSynchronize in aten::item", 0.04, 1.0)]
