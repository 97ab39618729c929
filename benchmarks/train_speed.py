"""QLoRA training throughput: the project's trainer vs a naive HF-Trainer baseline, in one run.

Every mode: NF4 + double quant base (`project`: the params file's method, e.g. bf16 LoRA for
params/study-lora.yaml), LoRA r=64 on all 7 projections, the same records and the same effective
batch. `baseline` is the seed's recipe run naively: plain `Trainer` (the model's own loss over full
logits), fp32 compute, peft's kbit preparation, padding to the longest in a random batch, gradient
checkpointing. `project` takes every speed setting of a params file (default
params/course.yaml: what the project uses on a GPU). Any mode can be changed with +key=value
(TrainParams fields), e.g. `project+compile=false` or `baseline+compute_dtype=bfloat16`.

Prints real (non-pad) tokens/s, peak GPU memory while training (and while loading), the ratio to the
first mode and the mean loss of the last steps; --json keeps the loss curves. Random weights: the speed
and memory of QLoRA do not depend on the weight values.

    python benchmarks/train_speed.py --config gemma3-270m.json --tokenizer tok/ --data-dir data/raw

Two other trainers, each with its own best settings, for issue 17 (written against liger-kernel 0.8.5
and unsloth 2026.10.9; unsloth ran on an H100 on 2026-11-26, see benchmarks/README.md):
`liger` = the project's speed settings with the model's own loss, the model patched by Liger-Kernel
(fused RMSNorm, SwiGLU, RoPE and the linear + cross-entropy loss that never builds the logits), without
compile (its Triton kernels do not trace inside the compiled layers); its patch is class-wide, so its
modes come last in an invocation;
`unsloth` = unsloth's FastLanguageModel (its NF4 loading, LoRA and "unsloth" gradient checkpointing),
bf16, padded batches, the model's own (fused) loss. unsloth patches transformers when imported, so its
modes need an invocation of their own: run `--modes unsloth` and `--modes baseline,project,liger` in the
same call on the same machine.

--processes 1,2 runs every mode on 1 and on 2 GPUs of this host (accelerate launch, one process per
GPU; --grad-accum is the total, split across the processes, so the effective batch is the same) and
prints the tokens/s of N GPUs over 1 GPU, mode by mode.
"""
import sys


def modes_arg(argv) -> str:
    """--modes' value, read before anything imports transformers."""
    for i, x in enumerate(argv):
        if x == "--modes" and i + 1 < len(argv):
            return argv[i + 1]
        if x.startswith("--modes="):
            return x.split("=", 1)[1]
    return ""


if "unsloth" in modes_arg(sys.argv):
    import os as _os

    # offline: unsloth otherwise pings the hub for usage statistics at load (a 120 s limit when it hangs)
    _os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    _os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import unsloth  # noqa: F401  before transformers and peft, which it patches (its modes run alone)

import argparse
import copy
import dataclasses
import gc
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import torch
from transformers import PrinterCallback, TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, also when accelerate runs this file
from lib import collate, data, launch, models, paramfile, params, trainable  # noqa: E402
from lib.cli import one_line_errors  # noqa: E402
from lib.trainer import configure, is_main, no_cudnn_attention, trainer_class, training_args, world_size  # noqa: E402

from gpu_meter import apart, flops_per_token, matmul_rate, mfu, profile_summary, start_pyspy, sync  # noqa: E402  beside this file

BASELINE = dict(compute_dtype="float32", answer_loss=False, head_loss="chunked", group_by_length=False, packing=False, pack_tokens=512,
                gradient_checkpointing=True, keep_frozen_dtype=False, cache_dequantized=False, compile=False,
                optim="adamw_torch")
# what a mode sets; the rest of TrainParams is the same in every mode. Every speed setting of the params
# file, not only the baseline's keys: until 2026-11-26 `project` left out lean_nf4, compile_mode,
# balance_ranks, checkpointed_layers... and ran with their defaults whatever the file said
SPEED_KEYS = tuple(BASELINE) + tuple(f.name for f in dataclasses.fields(params.SpeedParams)
                                     if f.name not in BASELINE and f.name != "num_processes")
# unsloth's own recommendations: bf16, its checkpointing, padded batches (its loss is fused already)
UNSLOTH = dict(BASELINE, compute_dtype="bfloat16", keep_frozen_dtype=True, optim="adamw_torch_fused")
TRAINERS = ("baseline", "project", "liger", "unsloth")


def project_settings(fp) -> dict:
    """The `project` mode: the speed settings of a params file's recipe (num_processes: --processes),
    and its method (QLoRA, or LoRA on bf16 weights as params/study-lora.yaml)."""
    return {k: getattr(fp, k) for k in SPEED_KEYS} | {"quantization": fp.quantization}


def base_settings(name: str, project: dict) -> dict:
    """The settings a trainer starts from: the seed's naive recipe, the project's, Liger on the project's
    (the model's own loss, which Liger fuses), or unsloth's."""
    uncompiled = {k: getattr(params.SpeedParams, k) for k in params.COMPILE_ONLY}  # Liger's kernels break compile
    return {"baseline": BASELINE, "project": project, "unsloth": UNSLOTH,
            "liger": dict(project, answer_loss=False, compile=False, **uncompiled)}[name]


class Counting:
    """Wraps a collator and counts the real (non-pad) tokens it hands out. With --vocab (a proxy tokenizer),
    the batch's token ids are folded into the benchmarked model's vocabulary: the records' and the pads the
    collator adds alike (Qwen's pad 151643 on a 1,024-token model was an index error in the embedding when
    only the records' ids were folded)."""

    def __init__(self, inner, vocab: int = 0):
        self.inner, self.tokens, self.vocab = inner, 0, vocab

    def __call__(self, feats):
        self.tokens += sum(len(f["input_ids"]) for f in feats)
        batch = self.inner(feats)
        if self.vocab:
            batch["input_ids"] = batch["input_ids"] % self.vocab
            batch["labels"] = torch.where(batch["labels"] < 0, batch["labels"], batch["labels"] % self.vocab)
        return batch


class Clock(TrainerCallback):
    """Wall time and tokens from the end of step `warm` to the end of step `stop`; then, if asked, a
    torch.profiler window of `profile` steps (outside the timed window). Optional diagnostics, both
    slowing the timed steps: the allocator's history of the whole run (benchmarks/memtrace.py: what is
    alive at the peak) and a py-spy recording of the host's Python stacks over the timed steps."""

    def __init__(self, collator, warm, stop, profile=0, memory_trace=False, pyspy=None, label="", stacks=False):
        self.collator, self.warm, self.stop, self.profile, self.stacks = collator, warm, stop, profile, stacks
        self.label, self.started = label, time.perf_counter()  # progress lines: where a cut call stopped
        self.memory_trace, self.pyspy = memory_trace and torch.cuda.is_available(), pyspy
        self.t0 = self.tok0 = self.dt = self.tokens = self.prof = self.memory = self.spy = None
        self.load_peak = 0

    def on_train_begin(self, args, state, control, **kw):
        if torch.cuda.is_available():  # loading the model has its own peak; from here on it's training's
            self.load_peak = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        if self.memory_trace:
            import memtrace  # beside this script

            self.mem_base = memtrace.start()

    def on_train_end(self, args, state, control, **kw):
        if self.memory_trace:
            import memtrace

            self.memory = memtrace.peak_report(memtrace.stop(), self.mem_base)

    def on_step_end(self, args, state, control, **kw):
        step = state.global_step
        if self.label and (step in (1, self.warm, self.stop) or step % 10 == 0):
            print(f"  {self.label}: step {step}/{self.stop} ({time.perf_counter() - self.started:.0f} s since the "
                  "model was built)", flush=True)
        if step in (self.warm, self.stop):
            sync()
        if step == self.warm and self.pyspy:
            self.spy = start_pyspy(self.pyspy)
        if step == self.warm:
            self.t0, self.tok0 = time.perf_counter(), self.collator.tokens
        if step == self.stop:
            self.dt, self.tokens = time.perf_counter() - self.t0, self.collator.tokens - self.tok0
            if self.spy is not None:
                self.spy.send_signal(2)  # SIGINT: py-spy writes its file and exits
                self.spy.wait(60)
            if self.profile:
                from torch.profiler import ProfilerActivity, profile

                # verbose: without it torch leaves the ops' stacks empty (2.13, measured)
                cfg = torch._C._profiler._ExperimentalConfig(verbose=True) if self.stacks else None
                self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=self.stacks,
                                    experimental_config=cfg)
                self.prof.__enter__()
                self.p0 = time.perf_counter()
        if self.prof is not None and step == self.stop + self.profile:
            sync()
            self.p_wall = time.perf_counter() - self.p0
            self.prof.__exit__(None, None, None)


class StepLosses(TrainerCallback):
    """Every optimizer step's training loss as the Trainer would log it (the sum of its micro-batches'
    losses; the mean over processes), kept on the GPU and read once after training. Logging every step
    instead (logging_steps 1, until 2026-11-27) made the host wait for the GPU at every step (the log's
    .item()), which the recipes' runs, logging every 10-25 steps, don't: it timed a sync they don't have."""

    def __init__(self, trainer):
        self.micro, self.steps = [], []
        inner = trainer.training_step  # the trainer's own (unsloth's patched one too): wrapped on this instance

        def training_step(*args, **kw):
            loss = inner(*args, **kw)
            self.micro.append(loss.detach())
            return loss

        trainer.training_step = training_step
        trainer.add_callback(self)

    def on_step_end(self, args, state, control, **kw):
        if self.micro:
            self.steps.append(torch.stack(self.micro).sum())
        self.micro = []

    def values(self) -> list[float]:
        if not self.steps:  # a trainer that bypassed training_step: the row says so by its empty losses
            return []
        t = torch.stack(self.steps).float()
        if world_size() > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
            t /= world_size()
        return [round(x, 4) for x in t.tolist()]


def random_model(config: str, folder: str | Path) -> Path:
    """Random weights of an architecture, made on the GPU and saved once in bf16 for the NF4 loader."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config), dtype=torch.bfloat16)
        m.save_pretrained(folder)
        del m
        torch.cuda.empty_cache()
    return folder


def build_model(trainer_name: str, model_dir: Path, tok, p, a):
    """The 4-bit model with LoRA as each trainer makes it: unsloth's own, or the project's loader, for
    `liger` with Liger-Kernel's kernels swapped into the base first (what HF's use_liger_kernel=True does)."""
    if trainer_name == "unsloth":
        return unsloth_model(model_dir, tok, p, a)
    base = models.load_model(p.model, p.quantization, p.compute_dtype, a.device)
    if trainer_name == "liger":
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=base)
    return trainable.make_trainable(base, p)


PAD_CANDIDATES = ("<|fim_pad|>", "<|vision_pad|>", "<pad>", "<unk>")  # existing tokens that can pad


def unsloth_folder(model_dir: Path, tok, dest: Path) -> Path:
    """A folder for unsloth to load: the model's files linked, and the tokenizer saved beside them with a
    pad token that is not EOS. unsloth loads the tokenizer from the model's folder and refuses pad == EOS;
    when the vocabulary names no reserved pad among its special tokens (the GGUF-converted Qwen tokenizer
    lists three) it adds one and then stops ("Could not find a valid pad token"). Pads are masked out of
    attention and loss, so which token pads changes nothing else. The model's own folder stays untouched."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for f in Path(model_dir).iterdir():
        if f.is_file() and not f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "added_tokens")):
            (dest / f.name).symlink_to(f.resolve())
    tok = copy.deepcopy(tok)  # the benchmark's own tokenizer keeps its pad
    if tok.pad_token is None or tok.pad_token == tok.eos_token:
        vocab = tok.get_vocab()
        pad = next((x for x in PAD_CANDIDATES if x in vocab and x != tok.eos_token), None)
        if pad is not None:  # an existing token: the vocabulary does not grow
            tok.add_special_tokens({"pad_token": pad})
    tok.save_pretrained(dest)
    return dest


def unsloth_model(model_dir: Path, tok, p, a):
    """unsloth's 4-bit model with its LoRA on the same projections, rank and alpha."""
    from unsloth import FastLanguageModel

    folder = unsloth_folder(model_dir, tok, Path(a.work) / "unsloth-model")
    model, _ = FastLanguageModel.from_pretrained(model_name=str(folder), max_seq_length=a.max_length,
                                                 dtype=torch.bfloat16, load_in_4bit=True)
    return FastLanguageModel.get_peft_model(
        model, r=p.lora_r, lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout, target_modules=list(p.target_modules),
        bias="none", use_gradient_checkpointing="unsloth" if p.gradient_checkpointing else False, random_state=p.seed)


def features(tok, a):
    recs = data.load_split(a.data_dir, "train", limit=None if a.longest else a.records)
    feats, cut, _ = collate.encode_examples(tok, recs, "course", a.max_length)
    if a.longest:  # every batch as long as the split's longest: the worst case of memory
        feats = sorted(feats, key=lambda f: -len(f["input_ids"]))[:a.records]
    n = sum(len(f["input_ids"]) for f in feats)
    print(f"{len(feats)} records, {n / len(feats):.1f} tokens each on average, {cut} cut at {a.max_length}")
    return feats


def mode_settings(mode: str, project: dict) -> dict:
    """'name+key=value+...' -> TrainParams overrides; name is one of TRAINERS."""
    name, *changes = mode.split("+")
    if name not in TRAINERS:
        raise SystemExit(f"mode {mode!r}: must start with one of {', '.join(TRAINERS)}")
    return dict(base_settings(name, project)) | paramfile.parse_changes(changes, params.TrainParams)


def run(mode, settings, model_dir, feats, tok, a, spy_file=None):
    p = params.TrainParams(**{**dict(model=str(model_dir), micro_batch_size=a.micro_batch, grad_accum=a.grad_accum,
                              max_steps=a.steps + a.profile, logging_steps=a.steps + a.profile, save_steps=0, eval_steps=1,
                              lr_scheduler="constant", seed=0), **settings})
    p.check()
    if not a.cudnn_attention:
        no_cudnn_attention()  # as the project's training does, for every trainer alike (NaN gradients otherwise)
    gc.collect()  # the previous mode's trainer sits in reference cycles with its optimizer state (1.2 GiB
    # at 7B): uncollected, it counted in this mode's peak
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    t_load = time.perf_counter()
    if is_main():
        print(f"  {mode}: building the model ({world_size()} process(es))", flush=True)
    trainer_name = mode.split("+")[0]
    model = build_model(trainer_name, model_dir, tok, p, a)
    t_load = time.perf_counter() - t_load
    collator = Counting(collate.collator(p, tok), a.vocab)
    clock = Clock(collator, a.warmup, a.steps, a.profile, a.memory_trace, spy_file,
                  label=mode if is_main() else "", stacks=a.profile_stacks)
    out = Path(a.work) / "run"
    args = training_args(p, out, len(feats))
    args.disable_tqdm = True
    if trainer_name == "unsloth":
        args.gradient_checkpointing = False  # unsloth's own checkpointing is in the model already
    trainer = trainer_class(p)(model=model, args=args, train_dataset=feats, data_collator=collator, callbacks=[clock])
    configure(trainer, p)  # the answer loss's LM head, DDP's gradient compression
    step_losses = StepLosses(trainer)
    trainer.remove_callback(PrinterCallback)  # a line per step and mode drowns the table
    t = time.perf_counter()
    trainer.train()
    losses = step_losses.values()[:a.steps]
    tokens, dt = across_processes(clock.tokens, clock.dt)
    # per GPU: each process's GPU against the matmul rate of this one
    util = mfu(tokens / dt, world_size(), flops_per_token(model_dir, p), a.matmul_rate)
    row = {"mode": mode, "settings": settings, "tokens_per_s": round(tokens / dt), "processes": world_size(),
           "mfu": round(util, 6),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if torch.cuda.is_available() else 0.0,
           "load_peak_gib": round(clock.load_peak / 2 ** 30, 2),
           "s_per_step": round(dt / (a.steps - a.warmup), 3), "load_s": round(t_load, 1),
           # this process's mean time in fetching a timed step's batches (and waiting for its GPU's queue)
           "fetch_s_per_step": round(sum(trainer.fetch_s[a.warmup:a.steps]) / (a.steps - a.warmup), 4),
           "untimed_s": round(time.perf_counter() - t - clock.dt, 1),  # warm-up (compilation) + profiling
           "losses": losses,  # every step's, read once at the end
           "logged_losses": [round(r["loss"], 4) for r in trainer.state.log_history if "loss" in r]}
    if a.profile:
        # --trace: every process's own window (a data-parallel rank's waits show in the other's trace)
        name = trace_name(a.trace, mode) if a.trace else None
        row["profile"] = profile_summary(clock, name and Path(name + ".trace.json.gz"))
        if name:
            Path(name + ".profile.json").write_text(json.dumps(row["profile"], indent=1))
    if clock.memory:
        row["memory"] = clock.memory
    del trainer, model
    shutil.rmtree(out, ignore_errors=True)
    return row


def trace_name(folder: str, mode: str) -> str:
    """--trace's files of this mode and process, less their suffix (.trace.json.gz: chrome://tracing, perfetto;
    .profile.json: the summary)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    return f"{folder}/{mode.replace('+', '_').replace('=', '-')}.n{world_size()}.rank{os.environ.get('RANK', 0)}"


def across_processes(tokens, dt):
    """(tokens of all processes, the slowest process's seconds) of a data-parallel run; as is on one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return tokens, dt
    t = torch.tensor([float(tokens), dt], device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t[:1])
    dist.all_reduce(t[1:], op=dist.ReduceOp.MAX)
    return int(t[0].item()), float(t[1].item())


def over_processes(a, argv) -> None:
    """--processes: every count in its own `accelerate launch`, then N GPUs over 1 GPU per mode."""
    counts = [int(n) for n in a.processes.split(",")]
    if a.config:
        # once, before the launches, in a process of its own: this one must hold no CUDA context while they train
        apart("train_speed", "random_model", a.config, str(Path(a.work) / ("model-" + Path(a.config).stem)))
    rest = strip_option(argv, "--processes")
    rest = strip_option(rest, "--json")
    result = {"processes": counts, "runs": {}}
    for n in counts:
        out = Path(a.work) / f"processes-{n}.json"
        out.unlink(missing_ok=True)
        cmd = launch.accelerate_command(n, cpu=a.device == "cpu") + [__file__, *rest, "--json", str(out)]
        print(f"--- {n} process(es): {' '.join(cmd[:4])} ...", flush=True)
        rc = subprocess.run(cmd, env=launch.environment()).returncode
        result["runs"][n] = json.loads(out.read_text()) if out.exists() else {"error": f"exit {rc}"}
        if a.json:  # after each count: a call cut during the next keeps this one
            Path(a.json).write_text(json.dumps(result, indent=1))
    one = {r["mode"]: r for r in result["runs"].get(counts[0], {}).get("rows", []) if "error" not in r}
    for n in counts[1:]:
        for r in result["runs"][n].get("rows", []):
            if "error" not in r and r["mode"] in one:
                ratio = r["tokens_per_s"] / one[r["mode"]]["tokens_per_s"]
                r[f"over_{counts[0]}"] = round(ratio, 3)
                print(f"{r['mode']}: {n} processes {r['tokens_per_s']} tok/s vs {counts[0]}: "
                      f"{one[r['mode']]['tokens_per_s']} tok/s = {ratio:.2f}x", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))


def strip_option(argv, name):
    """argv without `name value` / `name=value`."""
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x == name:
            skip = True
        elif not x.startswith(name + "="):
            out.append(x)
    return out


def print_row(r, base):
    tail = r["losses"][-10:]
    print(f"{r['mode']:44s} {r['tokens_per_s']:>7d} tok/s  peak {r['peak_gib']:6.2f} GiB (load {r.get('load_peak_gib', 0):.2f})"
          f"  {r['s_per_step']:.3f} s/step ({r['fetch_s_per_step']:.3f} fetching)"
          f"  x{r['tokens_per_s'] / base['tokens_per_s']:.2f}  MFU {r['mfu']:.1%}  loss(last 10) {sum(tail) / len(tail):.4f}", flush=True)
    if "profile" in r:
        pr = r["profile"]
        print(f"    profile: wall {pr['wall_ms_per_step']} ms/step, GPU busy {pr['gpu_ms_per_step']} ms/step, "
              f"{pr['kernels_per_step']} kernels/step; by kind {pr['gpu_ms_by_kind']}", flush=True)
        for k in pr["top_kernels"][:10]:
            print(f"      {k[1]:9.2f} ms x{k[2]:<5d} {k[0]}", flush=True)
        print("    host, by time with callees:", flush=True)
        for k in pr.get("host_total_ms", [])[:12]:
            print(f"      {k[1]:9.2f} ms x{k[2]:<5d} {k[0]}", flush=True)
        for w in pr.get("waits", [])[:8]:
            print(f"    wait {w['op']} x{w['per_step']:g}/step {w['host_ms']} ms: {' < '.join(w['stack'][:5])}", flush=True)
    if "memory" in r:
        m = r["memory"]
        print(f"    memory: {m['before_gib']} GiB before training, +{m['peak_gib']} GiB at the peak, "
              f"reached at {m['peak_event']}; alive then:", flush=True)
        for gib, n, where in m["sites"]:
            print(f"      {gib:7.3f} GiB x{n:<4d} {where}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="a model name/path with real weights (instead of --config)")
    ap.add_argument("--config", help="architecture config.json (random weights)")
    ap.add_argument("--tokenizer", help="tokenizer folder for the course data (default: the model's)")
    ap.add_argument("--vocab", type=int, default=0, help="fold token ids into this vocabulary (proxy tokenizer)")
    ap.add_argument("--data-dir", default="data/raw")
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--longest", action="store_true", help="the split's longest records (peak memory's worst case)")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps timed up to (after --warmup)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--profile", type=int, default=0, help="profile this many steps after the timed ones")
    ap.add_argument("--profile-stacks", action="store_true",
                    help="with --profile: the Python stacks of the host's waits (item, synchronize, copies to host)")
    ap.add_argument("--trace", help="with --profile: each process's chrome trace and profile summary into this folder")
    ap.add_argument("--memory-trace", action="store_true", help="what is alive at the run's peak (slows it)")
    ap.add_argument("--pyspy", help="record the timed steps' Python stacks with py-spy into PATH.<mode>.txt")
    ap.add_argument("--params", default="params/course.yaml", help="where the project mode's settings come from")
    ap.add_argument("--modes", default="baseline,project")
    ap.add_argument("--work", default="/tmp/train_speed")
    ap.add_argument("--device", default="auto", help="auto: the GPU of this process's local rank, else cpu")
    ap.add_argument("--json", help="write the result (loss curves included) here, after every mode")
    ap.add_argument("--cudnn-attention", action="store_true",
                    help="keep torch's default attention kernels (cuDNN on H100/H200): what the project's switch "
                         "costs in speed; NaN-prone at some shapes (README)")
    ap.add_argument("--processes", help="e.g. 1,2: every mode on 1 and on 2 GPUs, and the ratio")
    a = ap.parse_args()
    if a.profile_stacks and not a.profile:
        raise SystemExit("--profile-stacks needs --profile N (the steps it records)")
    trainers = [m.split("+")[0] for m in a.modes.split(",")]
    if "unsloth" in trainers and set(trainers) != {"unsloth"}:
        raise SystemExit("unsloth patches transformers for the whole process: give its modes an invocation "
                         "of their own (--modes unsloth), the others another, in the same call")
    if "liger" in trainers and set(trainers[trainers.index("liger"):]) != {"liger"}:
        raise SystemExit("Liger-Kernel patches the model's classes for the rest of the process (a later mode "
                         "would train with its kernels): put the liger modes last")
    if a.processes and world_size() == 1 and "LOCAL_RANK" not in os.environ:
        return over_processes(a, sys.argv[1:])
    main_process = is_main()
    from transformers import AutoTokenizer

    fp = paramfile.load(a.params)["01_finetune"]
    project = project_settings(fp)
    tok = AutoTokenizer.from_pretrained(a.tokenizer) if a.tokenizer else models.load_tokenizer(a.model)
    feats = features(tok, a)
    model_dir = models.model_path(a.model) if a.model else random_model(
        a.config, Path(a.work) / ("model-" + Path(a.config).stem))
    if torch.cuda.is_available():  # each process times its own GPU (on cuda:0 both ranks timed GPU 0 at
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))  # once: 422 TFLOP/s, MFU 76%)
    a.matmul_rate = matmul_rate()
    result = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch": torch.__version__, "model": a.model or a.config,
              "micro_batch": a.micro_batch, "grad_accum": a.grad_accum, "params": a.params,
              "cudnn_attention": a.cudnn_attention, "matmul_flops_per_s": a.matmul_rate, "rows": []}
    if main_process:
        print(f"bf16 matmul rate measured here: {a.matmul_rate / 1e12:.1f} TFLOP/s (the MFU denominator)", flush=True)
    for i, m in enumerate(a.modes.split(","), 1):
        try:
            row = run(m, mode_settings(m, project), model_dir, feats, tok, a, a.pyspy and f"{a.pyspy}.{i}.txt")
        except Exception as e:  # one failing mode (e.g. out of memory) must not lose the others
            print(f"{m}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            result["rows"].append({"mode": m, "error": f"{type(e).__name__}: {e}"[:2000]})
            continue
        result["rows"].append(row)
        ok = [r for r in result["rows"] if "error" not in r]
        if main_process:
            print_row(row, ok[0])
        if a.json and main_process:
            Path(a.json).write_text(json.dumps(result, indent=1))
    rerate(result, matmul_rate(), main_process)
    if a.json and main_process:
        Path(a.json).write_text(json.dumps(result, indent=1))


def rerate(result, after: float, show: bool):
    """The matmul rate measured again after the runs, and each row's MFU against the higher of the two.
    One H100 measured 618 TFLOP/s before one invocation and 672 / 679 before the ones beside it, in the
    same call: a low start would flatter every MFU of its invocation (2026-11-27-compiled-recompute-*)."""
    result["matmul_flops_per_s_after"] = after
    best = max(result["matmul_flops_per_s"], after)
    for row in result["rows"]:
        if "mfu" in row:
            row["mfu_at_best_rate"] = row["mfu"] * result["matmul_flops_per_s"] / best
    if show:
        mfus = ", ".join(f"{r['mode']} {r['mfu_at_best_rate']:.1%}" for r in result["rows"] if "mfu" in r)
        print(f"bf16 matmul rate after the runs: {after / 1e12:.1f} TFLOP/s; MFU against the higher rate: {mfus}",
              flush=True)


if __name__ == "__main__":
    with one_line_errors() as cli:  # a bad key=value is one line, not a traceback
        main()
    sys.exit(cli.code)
