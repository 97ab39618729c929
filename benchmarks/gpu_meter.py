"""What the GPU did during a timed run (train_speed.py): its bf16 matmul rate measured now (the MFU
denominator), a model's FLOPs per trained token, a py-spy recording of the host's stacks, and a
profiler window summarized by kind of kernel."""
import bisect
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def start_pyspy(path):
    """py-spy sampling this process's Python stacks into path (collapsed-stack text)."""
    import os
    import subprocess

    spy = subprocess.Popen(["py-spy", "record", "--pid", str(os.getpid()), "--rate", "250", "--format", "raw",
                            "--output", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    time.sleep(2)  # attached before the clock starts
    return spy


PY_FRAME = re.compile(r"\.py\(\d+\)|^<built-in|^<frozen")
# first match wins. Attention before gemm: torch's memory-efficient attention kernels are CUTLASS's
# (fmha_cutlassF/B...) and were counted as matmuls until 2026-11-27 (~40 ms of the 7B step's "gemm")
KERNEL_KINDS = (("nccl", ("nccl",)), ("attention", ("fmha", "attention", "sdpa", "flash")),
                ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas")), ("dequantize", ("dequantize",)),
                ("optimizer", ("multi_tensor", "adam")), ("compiled", ("triton",)), ("copy/cast", ("copy", "direct_copy", "cast")))


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((k for k, keys in KERNEL_KINDS if any(x in low for x in keys)), "other elementwise")


def profile_summary(clock, trace_to: Path | None = None) -> dict:
    """Per step: wall time vs GPU kernel time (low GPU share = launch/Python bound), kernel count, GPU
    time by kind of kernel (gemm, dequantize, attention, ...), top kernels and top ops; the window's chrome
    trace gzipped at trace_to, if given."""
    events = clock.prof.key_averages()
    n = clock.profile
    # kernels only: a region the code names on the GPU side (DDP's forward, "nccl:all_reduce") and an op's
    # self device time both count kernels again (a 2-GPU profile showed 134 ms of phantom "elementwise")
    kernels = [e for e in events if e.device_type.name == "CUDA" and not getattr(e, "is_user_annotation", False)]
    gpu_us = sum(e.self_device_time_total for e in kernels)
    kinds = {}
    for e in kernels:
        k = kernel_kind(e.key)
        kinds[k] = kinds.get(k, 0.0) + e.self_device_time_total / 1000 / n
    ops = [e for e in events if e.device_type.name == "CPU" and e.self_device_time_total > 0]
    top = lambda es: [(e.key[:70], round(e.self_device_time_total / 1000 / n, 2), e.count // n)
                      for e in sorted(es, key=lambda e: -e.self_device_time_total)[:15]]
    # the host's side: where its time goes (a data-parallel rank waiting shows up here, as the collective or
    # a cuda*Synchronize / memcpy call), by the events' own time and by their time with what they call
    # (with --profile-stacks the profiler also records every Python call as an event: ops only here)
    host = [e for e in events if e.device_type.name == "CPU" and not PY_FRAME.search(e.key)]
    by = lambda attr: [(e.key[:70], round(getattr(e, attr) / 1000 / n, 2), e.count // n)
                       for e in sorted(host, key=lambda e: -getattr(e, attr))[:15]]
    return {"wall_ms_per_step": round(clock.p_wall * 1000 / n, 1), "gpu_ms_per_step": round(gpu_us / 1000 / n, 1),
            "kernels_per_step": sum(e.count for e in kernels) // n,
            "gpu_ms_by_kind": {k: round(v, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top_kernels": top(kernels), "top": top(ops),
            "host_self_ms": by("self_cpu_time_total"), "host_total_ms": by("cpu_time_total")} | (
                {"waits": waits(clock.prof, n)} if clock.stacks else {}) | _from_trace(clock.prof, n, trace_to)


def _from_trace(prof, n: int, keep: Path | None = None) -> dict:
    """idle_gaps and host_gaps of a finished torch.profiler window (its chrome trace, written to a temporary
    file; torch writes it once, so kept gzipped at `keep` if given)."""
    import gzip
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        prof.export_chrome_trace(f"{d}/trace.json")
        raw = Path(f"{d}/trace.json").read_bytes()
    if keep is not None:
        keep.write_bytes(gzip.compress(raw))
    trace = json.loads(raw)
    return {"idle": idle_gaps(trace, n), "host_gaps": host_gaps(trace, n)}


GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpyAsync")


def idle_gaps(trace, n: int, min_us: float = 20.0, top: int = 12, reach: int = 20000) -> dict:
    """Where the GPU waited, from a profiler's chrome trace (its dict) of n steps.

    Every gap between one GPU activity's end and the next one's start is idle time. A gap longer than
    min_us is put on the host: the op that launched the kernel ending it (innermost, and outermost: a
    Trainer phase or an autograd node), and whether the launch came after the GPU had run dry (the host
    was late) or before (the kernel waited on something else, a copy or another stream). Shorter gaps are
    summed apart: the GPU's own turnaround between queued kernels. Host calls that block until the GPU
    catches up (SYNCS) are listed with their op: each one lets the queue run empty."""
    ev = trace["traceEvents"] if isinstance(trace, dict) else trace
    gpu = sorted((e for e in ev if e.get("cat") in GPU_CATS and e.get("ph") == "X"), key=lambda e: e["ts"])
    if not gpu:
        return {}
    launch = {e["args"]["correlation"]: e for e in ev
              if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    ops = {}
    for e in sorted((e for e in ev if e.get("cat") == "cpu_op" and e.get("ph") == "X"), key=lambda e: e["ts"]):
        ops.setdefault(e["tid"], []).append(e)
    starts = {tid: [e["ts"] for e in es] for tid, es in ops.items()}

    def around(tid, t):
        """The ops of thread tid running at time t, outermost first."""
        es, i = ops.get(tid, []), bisect.bisect_right(starts.get(tid, []), t)
        return [e for e in reversed(es[max(0, i - reach):i]) if e["ts"] + e["dur"] >= t][::-1]

    inner, outer, late, early = {}, {}, 0.0, 0.0
    end, small, big = gpu[0]["ts"] + gpu[0]["dur"], 0.0, 0.0
    for e in gpu[1:]:
        gap = e["ts"] - end
        if gap > min_us:
            big += gap
            at = launch.get(e.get("args", {}).get("correlation"))
            host = around(at["tid"], at["ts"]) if at else []
            for table, op in ((inner, host[-1] if host else None), (outer, host[0] if host else None)):
                _add(table, op["name"][:70] if op else ("(no host op)" if at else "(launch not in the trace)"), gap)
            if at is not None and at["ts"] > end:  # launched after the GPU ran dry
                late += gap
            else:
                early += gap
        elif gap > 0:
            small += gap
        end = max(end, e["ts"] + e["dur"])
    blocked = {}
    for e in ev:
        if e.get("cat") == "cuda_runtime" and e.get("name") in SYNCS and e.get("dur", 0) > min_us:
            host = around(e["tid"], e["ts"])
            _add(blocked, f"{e['name']} in {host[-1]['name'][:60] if host else '?'}", e["dur"])
    ms = lambda us: round(us / 1000 / n, 3)
    rank = lambda t: [(k, ms(v[0]), round(v[1] / n, 2)) for k, v in sorted(t.items(), key=lambda kv: -kv[1][0])[:top]]
    return {"gpu_span_ms_per_step": ms(end - gpu[0]["ts"]), "idle_ms_per_step": ms(small + big),
            f"in_gaps_over_{min_us:g}us_ms": ms(big), "between_queued_kernels_ms": ms(small),
            "host_late_ms": ms(late), "launched_early_ms": ms(early),
            "by_launching_op": rank(inner), "by_outer_op": rank(outer), "host_blocked": rank(blocked)}


def host_gaps(trace, n: int, top: int = 12) -> dict:
    """Where the host's main thread ran outside any op, from a profiler's chrome trace of n steps: Python
    (the Trainer's loop, walks over a model's modules and parameters) shows only as time between ops.

    The main thread is the one that stepped the optimizer. Its top-level events (ops, annotations, CUDA
    calls not inside another) are taken in order; the time between one's end and the next one's start is
    put on the pair (after, before). The backward runs on autograd's thread, so the main thread's wait
    for it shows as a gap after the op that started it (aten::ones_like, the loss's gradient)."""
    ev = trace["traceEvents"] if isinstance(trace, dict) else trace
    cats = ("cpu_op", "user_annotation", "cuda_runtime")
    host = [e for e in ev if e.get("cat") in cats and e.get("ph") == "X"]
    main = next((e["tid"] for e in host if e["name"].startswith("Optimizer.step")), None)
    tops, end = [], float("-inf")
    for e in sorted((e for e in host if e["tid"] == main), key=lambda e: (e["ts"], -e["dur"])):
        if e["ts"] >= end:  # not inside the previous top-level event
            tops.append(e)
            end = e["ts"] + e["dur"]
    pairs, outside = {}, 0.0
    for a, b in zip(tops, tops[1:]):
        gap = b["ts"] - (a["ts"] + a["dur"])
        if gap > 0:
            outside += gap
            _add(pairs, f"after {a['name'][:50]} / before {b['name'][:50]}", gap)
    ms = lambda us: round(us / 1000 / n, 3)
    span = tops[-1]["ts"] + tops[-1]["dur"] - tops[0]["ts"] if tops else 0.0
    return {"span_ms_per_step": ms(span), "outside_ops_ms_per_step": ms(outside),
            "by_pair": [(k, ms(v[0]), round(v[1] / n, 2)) for k, v in sorted(pairs.items(), key=lambda kv: -kv[1][0])[:top]]}


def _add(table: dict, key: str, us: float):
    """One more occurrence of key lasting us: table[key] = [total us, count]."""
    row = table.setdefault(key, [0.0, 0])
    row[0], row[1] = row[0] + us, row[1] + 1


# host ops that block until the GPU catches up (or that a data-parallel rank's Python makes per tensor)
WAITS = ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize",
         "cudaMemcpyAsync", "aten::is_nonzero")


def waits(prof, n: int, depth: int = 8) -> list:
    """The Python stacks (innermost first, `depth` frames) that call the WAITS ops, by host time a step.
    Grouped here, not by key_averages: a frame names its bound method's address, which differs per tensor."""
    groups = {}
    for e in prof.events():
        if e.name in WAITS:
            stack = tuple(re.sub(r" at 0x[0-9a-f]+", "", f) for f in e.stack if "torch/profiler" not in f)[:depth]
            g = groups.setdefault((e.name, stack), [0, 0.0])
            g[0], g[1] = g[0] + 1, g[1] + e.cpu_time_total
    top = sorted(groups.items(), key=lambda kv: -kv[1][1])[:12]
    return [{"op": op, "per_step": c / n, "host_ms": round(us / 1000 / n, 2), "stack": list(st)}
            for (op, st), (c, us) in top]


def matmul_rate(n=8192, reps=10, rounds=5) -> float:
    """bf16 matmul FLOP/s this GPU reaches on large square products (the MFU denominator), measured now:
    the best of `rounds` timings after a warm-up, as the clocks settle."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n = n if dev == "cuda" else 512  # a CPU test only checks the arithmetic
    a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    # warm for a second first: on an H100 fresh from its start, 3 products then 20 timed ones measured
    # 363 TFLOP/s, against 792 once warm (the JSON of results/2026-11-26-balance-ranks-*); one second of
    # warm-up then one timing still gave 557 on another fresh H100 (results/2026-11-26-levers-*)
    t = time.perf_counter()
    while time.perf_counter() - t < (1.0 if dev == "cuda" else 0.01):
        a @ b
        sync()
    best = 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t))
    return best


def flops_per_token(model_dir, p) -> float:
    """Model FLOPs of one trained token in QLoRA under recipe p: 2 x parameters for the forward, 2 x for the
    gradient with respect to the inputs (frozen weights get none), 2 x more for the recomputed forward
    when checkpointing (x the share of layers recomputed, with checkpointed_layers); all parameters counted
    (embeddings included, LoRA's ~1% left out), as the 7B figure of the performance issue (6 x 6.74 GFLOP)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        n = sum(x.numel() for x in AutoModelForCausalLM.from_config(cfg).parameters())
    recomputed = (p.checkpointed_layers or cfg.num_hidden_layers) if p.gradient_checkpointing else 0
    return 2 * n * (2 + recomputed / cfg.num_hidden_layers)


def mfu(tokens_per_s: float, processes: int, flops_token: float, rate: float) -> float:
    """Model FLOP utilisation of each GPU: its share of the tokens/s times the FLOPs of a token, over the
    matmul rate measured in the same run."""
    return tokens_per_s / processes * flops_token / rate


def apart(module: str, function: str, *args):
    """`module.function(*args)` (a module of this folder, of the project or any other) run in a child
    process, its result given back through JSON (a Path as its string). Why: a script that starts training
    processes (ddp_compare.py, train_speed.py --processes) does its own device work this way, so it holds
    no CUDA context while they train (CUDA's guide advises one context per device, as Theano/Theano#1874
    quoted it when it stopped opening a second). It was the suspect of a 2-GPU run going 10-20% faster
    alone than inside ddp_compare.py; measured after (2 x H100, 2026-11-27), it was not the gap: 01's
    ratio stayed 1.79x (README, "Several GPUs"). Kept: a measuring process should not share the GPUs."""
    code = (f"import json, sys; sys.path[:0] = [{str(HERE)!r}, {str(HERE.parent)!r}]; import {module}; "
            f"print(json.dumps({module}.{function}(*{list(args)!r}), default=str))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{module}.{function} in a child process failed: {out.stderr.strip()[-800:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
