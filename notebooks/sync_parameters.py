"""Rewrite each notebook's `parameters` cell from params/default.yaml (run after adding a parameter).

The cell is one `name = literal` line per field of the notebook's params dataclass, in field order;
tests/test_params.py checks that it matches.
"""
import json
from pathlib import Path

from lib import paramfile

HERE = Path(__file__).resolve().parent


def main():
    for name, p in paramfile.load().items():
        path = HERE / f"{name}.ipynb"
        nb = json.loads(path.read_text())
        cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
        lines = [f"{k} = {v!r}" for k, v in p.to_dict().items()]
        cell["source"] = [line + "\n" for line in lines[:-1]] + lines[-1:]
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
        print(f"{path.name}: {len(lines)} parameters")


if __name__ == "__main__":
    main()
