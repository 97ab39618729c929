"""Run the notebooks through papermill with a params file into reports/<run>/<timestamp>/, export HTML.

    python -m lib.pipeline [params/default.yaml] [--only 02_zeroshot ...] [--run-dir DIR]

Parameters are validated against the notebooks' dataclasses before anything runs. A failing notebook
stops the run (exit 1) and its executed copy stays next to the earlier notebooks' results.
"""
import argparse
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from . import ROOT, paramfile, params, resolve
from .cli import one_line_errors
from .runs import RunError

NOTEBOOK_DIR = ROOT / "notebooks"


class NotebookError(RunError):
    """A notebook failed; its executed copy is kept."""


def new_run_dir(run: str) -> Path:
    """reports/<run>/<timestamp>/, never an existing folder (runs are kept), with a `latest` link."""
    base = resolve("reports") / run
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    d = base / stamp
    n = 1
    while d.exists():
        n += 1
        d = base / f"{stamp}-{n}"
    d.mkdir(parents=True)
    latest = base / "latest"
    if latest.is_symlink() or not latest.exists():
        latest.unlink(missing_ok=True)
        latest.symlink_to(d.name)
    return d


def export_html(executed: Path) -> Path | None:
    """A self-contained HTML of an executed notebook, code hidden, figures embedded.

    A failed export only warns: the executed notebook and its results are what matter, and are kept.
    """
    try:
        return _export_html(executed)
    except Exception as e:  # nbconvert templates missing, etc.
        print(f"warning: HTML export of {executed.name} failed: {e}", file=sys.stderr)
        return None


def _export_html(executed: Path) -> Path:
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(executed, as_version=4)
    for cell in nb.cells:  # warnings and progress bars are for the console, not the report
        cell["outputs"] = [o for o in cell.get("outputs", []) if o.get("name") != "stderr"]
    html, _ = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True).from_notebook_node(nb)
    out = executed.with_suffix(".html")
    out.write_text(html, encoding="utf-8")
    return out


def kernel_manager_class():
    """Kernels on local pipes (ipc) rather than TCP ports where the OS has them: no port for other users of
    the host to reach, and no 'running over TCP without encryption' line from ipykernel per notebook."""
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class PipeKernelManager(AsyncKernelManager):
        @default("transport")
        def _transport_default(self):
            return "ipc"

    return PipeKernelManager if os.name == "posix" else AsyncKernelManager


def run_notebook(name: str, p, run_dir: Path) -> Path:
    import papermill as pm

    executed = run_dir / f"{name}.ipynb"
    pm.execute_notebook(NOTEBOOK_DIR / f"{name}.ipynb", executed, parameters=p.to_dict(),
                        cwd=str(NOTEBOOK_DIR), kernel_name="python3", progress_bar=False,
                        log_output=False, stdout_file=sys.stdout, stderr_file=sys.stderr,
                        kernel_manager_class=kernel_manager_class())
    return executed


def run(params_file=None, only=None, run_dir=None) -> Path:
    """Run the selected notebooks in order; returns the run folder. Raises on the first failure."""
    import papermill as pm

    all_params = paramfile.load(params_file)  # every notebook's params checked before any runs
    names = only or list(params.NOTEBOOKS)
    bad = sorted(set(names) - set(params.NOTEBOOKS))
    if bad:
        raise params.ParamsError(f"unknown notebook(s) {bad}; known: {list(params.NOTEBOOKS)}")
    run_dir = resolve(run_dir) if run_dir else new_run_dir(all_params[names[0]].run)
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"run folder: {run_dir}", flush=True)
    for i, name in enumerate(names, 1):
        p = all_params[name]
        p.out_dir = str(run_dir)
        print(f"\n=== [{i}/{len(names)}] {name} ({p.model}, {p.data_dir}) ===", flush=True)
        t = time.time()
        try:
            executed = run_notebook(name, p, run_dir)
        except pm.PapermillExecutionError as e:
            failed = run_dir / f"{name}.ipynb"
            export_html(failed)
            raise NotebookError(f"{name} failed in cell {e.exec_count}: {e.ename}: {e.evalue}\n"
                               f"the executed notebook is kept for inspection: {failed}") from None
        html = export_html(executed)
        print(f"=== {name} done in {time.time() - t:.0f} s -> {html}", flush=True)
    return run_dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("params_file", nargs="?", default=None, help="params YAML (merged over params/default.yaml)")
    ap.add_argument("--only", nargs="+", metavar="NOTEBOOK", help="run only these notebooks")
    ap.add_argument("--run-dir", help="write into this folder (e.g. to resume a run) instead of a new one")
    a = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # the kernels inherit this: library deprecation notices would otherwise flood the console
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning,ignore::UserWarning")
    with one_line_errors("resume with the same command plus --run-dir <the run folder printed above>") as cli:
        run_dir = run(a.params_file, a.only, a.run_dir)
        report = run_dir / "05_report.html"
        print(f"\nreport: {report}" if report.exists() else f"\nresults: {run_dir}")
    return cli.code


if __name__ == "__main__":
    sys.exit(main())
