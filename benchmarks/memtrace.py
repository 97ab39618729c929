"""Where a run's peak GPU memory goes: record the allocator's history, replay it, and list what was
alive at the peak, grouped by the Python lines that allocated it.

Memory allocated before the recording (the model) is reported as one number; the rest (optimizer
state, activations, gradients) is listed. Allocations made by the autograd engine outside Python show as
'(backward, no Python frame)'.
"""
import torch

SKIP = ("torch/nn/modules/module.py", "torch/utils/_contextlib.py", "torch/_compile.py", "torch/autograd/function.py",
        "torch/_dynamo/eval_frame.py", "torch/utils/checkpoint.py", "torch/_tensor.py", "<frozen", "contextlib.py")


def start(max_entries=3_000_000):
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=max_entries, stacks="python")
    return torch.cuda.memory_allocated()


def stop():
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    return snap


def site(frames, depth=3) -> str:
    keep = [f for f in frames if not any(s in f["filename"] for s in SKIP)]
    if not keep:
        return "(backward, no Python frame)"
    return " < ".join(f"{f['filename'].split('site-packages/')[-1].split('/work/')[-1]}:{f['line']} {f['name']}"
                      for f in keep[:depth])


def peak_report(snap, base: int, top=12) -> dict:
    """Replay the trace: the peak above base, and the allocations alive at that moment by site."""
    events = [e for dev in snap["device_traces"] for e in dev]
    cur = best = best_i = 0
    live = {}
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            live[e["addr"]] = e["size"]
            cur += e["size"]
            if cur > best:
                best, best_i = cur, i
        elif e["action"] == "free_completed" and e["addr"] in live:
            cur -= live.pop(e["addr"])
    live = {}
    for e in events[:best_i + 1]:  # again, up to the peak, keeping the frames
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)
    sites = {}
    for e in live.values():
        s = sites.setdefault(site(e.get("frames", [])), [0, 0])
        s[0] += e["size"]
        s[1] += 1
    gib = 2 ** 30
    return {"before_gib": round(base / gib, 2), "peak_gib": round(best / gib, 2),
            "peak_event": site(events[best_i].get("frames", []), 6) if events else "",
            "sites": [(round(v[0] / gib, 3), v[1], k) for k, v in sorted(sites.items(), key=lambda kv: -kv[1][0])[:top]]}
