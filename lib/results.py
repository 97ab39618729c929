"""Results with provenance: every notebook writes JSON/CSV through here; 05_report reads only these."""
import hashlib
import json
import os
import platform
import subprocess
import threading
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import pandas as pd

from . import ROOT, resolve

PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "sacrebleu", "papermill")


def git_state() -> dict:
    """Commit hash and whether the work tree had uncommitted changes."""
    def git(*args):
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    # a copy of the tree on a lent GPU says which commit it is: its .git, if any, may be an older one
    # (2026-11-26: a run of d76009f recorded e43039d, dirty, from the copy's stale .git); the commit's file
    # list (CCT_GIT_TREE, benchmarks/bundle.py) tells whether the copy's files are still that commit's
    if os.environ.get("CCT_GIT_COMMIT"):
        dirty = os.environ.get("CCT_GIT_DIRTY") == "1" or tree_changed(os.environ.get("CCT_GIT_TREE"), ROOT)
        return {"commit": os.environ["CCT_GIT_COMMIT"], "dirty": dirty}
    commit = git("rev-parse", "HEAD")
    return {"commit": commit, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def tree_changed(manifest, root: Path) -> bool:
    """Whether a file of `git ls-tree -r -z <commit>`'s list (the file `manifest`) is missing under root or
    holds other bytes (git's blob hash); no list: False. Why: a tree copied to a lent GPU has no git, and
    a file changed there (2026-11-27: a trainer swapped in for an A/B) left the result saying "clean"."""
    if not manifest or not Path(manifest).is_file():
        return False
    for entry in Path(manifest).read_bytes().decode().split("\0"):  # `ls-tree -z`: paths unquoted
        if not entry:
            continue
        meta, path = entry.split("\t", 1)
        mode, kind, sha = meta.split()
        if kind != "blob":
            continue  # a submodule's commit
        f = root / path
        if mode == "120000":  # a symlink: git stores its target
            data = os.readlink(f).encode() if f.is_symlink() else None
        else:
            data = f.read_bytes() if f.is_file() else None
        if data is None or hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() != sha:
            return True
    return False


def versions() -> dict:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def hardware() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "gpu": gpu, "python": platform.python_version()}


def provenance(params, model_ids=(), started: float | None = None) -> dict:
    """What produced a result: params, code, packages, model files, hardware, wall time."""
    from . import models

    return {
        "params": params.to_dict(),
        "git": git_state(),
        "versions": versions(),
        "models": [models.model_identity(m) for m in model_ids],
        "hardware": hardware(),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(time.time() - started, 1) if started else None,
    }


def section_dir(params, name: str) -> Path:
    """reports/<run>/<timestamp>/<name>/ (created)."""
    d = resolve(params.out_dir) / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def atomic_write(path: Path, text: str):
    """path holds text, or what it held before: a crash mid-write never leaves a truncated file. The
    temporary file's name is the writer's own: under DDP every process records its run (the same
    text), and with one shared name a process could rename the file another had just renamed (ENOENT)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def save(folder: Path, summary: dict, tables: dict | None = None, prov: dict | None = None):
    """results.json (summary + provenance) and one CSV per table in folder."""
    for name, df in (tables or {}).items():
        atomic_write(folder / f"{name}.csv", df.to_csv(index=False))
    doc = {"summary": summary, "tables": sorted(tables or {}), "provenance": prov}
    atomic_write(folder / "results.json", json.dumps(doc, ensure_ascii=False, indent=2, default=str))


def load(folder: Path) -> tuple[dict, dict]:
    """(results.json as a dict, {table: DataFrame}) from a results folder."""
    doc = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    return doc, {t: pd.read_csv(folder / f"{t}.csv") for t in doc["tables"]}
