"""Params files: YAML sections merged over params/default.yaml into the notebooks' dataclasses.

Sections: `common` (every notebook), `train` (the fine-tuning recipe, read by 01 and 04 alike, so it
is written once), then one per notebook, each overriding the one before it key by key.

`base: other.yaml` (a path relative to the file) makes a file a variant of another: the base is merged
first, then this file's keys, section by section (as peft's method_comparison does with default params
and per-experiment overrides), so a variant states only what it changes. A notebook section, of the base
or the variant, still overrides `train` for that notebook (study.yaml's 04 epochs stay 04's).
"""
import inspect
import re
import types
from dataclasses import fields
from pathlib import Path

import yaml

from . import ROOT, resolve
from .paramcheck import ParamsError
from .params import NOTEBOOKS, Common, TrainParams

DEFAULT_FILE = ROOT / "params" / "default.yaml"
SECTIONS = ("common", "train", *NOTEBOOKS)


class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats: PyYAML (YAML 1.1) reads `1e-4` (no dot) as the string '1e-4'."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def build(cls, values: dict):
    """cls(**values), with unknown keys reported by name (dataclasses would say 'unexpected keyword')."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ParamsError(f"unknown parameter(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    return cls(**values)


def read_yaml(path: Path, allow_empty=False) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
        data = yaml.load(text, Loader=_Loader)  # a SafeLoader: no Python objects
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except UnicodeDecodeError as e:
        raise ParamsError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: invalid YAML: {e}") from None
    if data is None and not allow_empty:
        raise ParamsError(f"{path}: the params file is empty; to run the default study give no file "
                          f"(it is {DEFAULT_FILE.relative_to(ROOT)})")
    data = data or {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections")
    bad = sorted(set(data) - set(SECTIONS) - {"base"})
    if bad:
        raise ParamsError(f"{path}: unknown section(s) {bad}; expected {list(SECTIONS)}")
    if "base" in data and not isinstance(data["base"], str):
        raise ParamsError(f"{path}: 'base' must be a params file's path (relative to {Path(path).parent})")
    for k, v in data.items():
        if k != "base" and not isinstance(v, dict):
            raise ParamsError(f"{path}: section {k!r} must be a mapping")
    return data


def _check_section(path, name, values, cls):
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        raise ParamsError(f"{path}: unknown {name} parameter(s) {unknown}")


def _chain(path) -> list[dict]:
    """The sections of path and of its bases, the farthest base first (default.yaml is merged before all)."""
    chain, seen = [], []
    while path is not None and resolve(path) != DEFAULT_FILE:
        path = resolve(path)
        if path in seen:
            raise ParamsError(f"{seen[0]}: its bases loop: {' -> '.join(map(str, seen + [path]))}")
        seen.append(path)
        data = read_yaml(path)
        base = data.pop("base", None)
        chain.insert(0, data)
        path = (path.parent / base) if base is not None else None
    return chain


def load(path=None) -> dict:
    """{notebook: params object} for a params file merged over params/default.yaml.

    The merge happens here and only here: common, then train (for 01 and 04), then the notebook's own
    section; the experiment file overrides the default file key by key within each section.
    """
    merged = {k: dict(v) for k, v in read_yaml(DEFAULT_FILE).items()}
    for data in _chain(path):
        for k, v in data.items():
            merged.setdefault(k, {}).update(v)
    where = path or DEFAULT_FILE
    common, train = merged.get("common", {}), merged.get("train", {})
    _check_section(where, "common", common, Common)
    _check_section(where, "train", train, TrainParams)
    out = {}
    for nb, cls in NOTEBOOKS.items():
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in common.items() if k in names}
        if issubclass(cls, TrainParams):
            values |= train
        try:
            out[nb] = build(cls, values | merged.get(nb, {}))
        except ParamsError as e:
            raise ParamsError(f"{where} [{nb}]: {e}") from None
    return out


def parse_changes(items, cls) -> dict:
    """['lora_alpha=64', '+learning_rate=1e-4'] -> {'lora_alpha': 64, 'learning_rate': 0.0001}: command-line
    changes of cls's fields (a leading + is allowed), values read as a params file reads them."""
    names = {f.name for f in fields(cls)}
    out = {}
    for item in items:
        k, sep, v = item.lstrip("+").partition("=")
        if not sep or k not in names:
            raise ParamsError(f"{item!r} is not key=value of a {cls.__name__} field ({', '.join(sorted(names))})")
        out[k] = yaml.load(v, Loader=_Loader)
    return out


def dump_train(p, path: Path, **changes) -> Path:
    """A params file whose `train` section is p's recipe (for launched processes and run records)."""
    values = {f.name: getattr(p, f.name) for f in fields(TrainParams)} | changes
    Path(path).write_text(yaml.safe_dump({"train": values}, allow_unicode=True, sort_keys=False))
    return Path(path)


_IPYTHON = {"In", "Out", "get_ipython", "exit", "quit", "open"}


def from_notebook(cls, namespace: dict):
    """The params object from a notebook's globals; an injected name that is no field is an error."""
    names = {f.name for f in fields(cls)}
    values, unknown = {}, []
    for k, v in namespace.items():
        if k.startswith("_") or k in _IPYTHON:
            continue
        if isinstance(v, (types.ModuleType, types.FunctionType, type)) or inspect.isbuiltin(v):
            continue
        if k in names:
            values[k] = v
        else:
            unknown.append(k)
    if unknown:
        raise ParamsError(f"unknown parameter(s) {sorted(unknown)} for {cls.__name__}; known: {sorted(names)}")
    return build(cls, values)
