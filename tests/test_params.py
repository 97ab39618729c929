import ast
import json
from pathlib import Path

import pytest
import yaml

from lib import paramfile, params

ROOT = Path(__file__).resolve().parents[1]
PARAM_FILES = sorted((ROOT / "params").glob("*.yaml"))


@pytest.mark.parametrize("path", PARAM_FILES, ids=lambda p: p.name)
def test_every_params_file_validates(path):
    loaded = paramfile.load(path)
    assert set(loaded) == set(params.NOTEBOOKS)
    raw = yaml.load(path.read_text(), Loader=paramfile._Loader)
    raw.pop("base", None)
    sections = {}  # the file's sections over its bases' (a base's notebook section still overrides train)
    for data in paramfile._chain(path):
        for k, v in data.items():
            sections.setdefault(k, {}).update(v)
    train_nbs = [nb for nb, cls in params.NOTEBOOKS.items() if issubclass(cls, params.TrainParams)]
    for section, values in raw.items():  # every key written in the file reaches its notebook(s)
        targets = {"common": list(params.NOTEBOOKS), "train": train_nbs}.get(section, [section])
        for nb in targets:
            for k, v in values.items():
                later = sections.get(nb, {}) if section != nb else {}
                if hasattr(loaded[nb], k) and k not in later and not (section == "common" and k in sections.get("train", {})):
                    assert getattr(loaded[nb], k) == v, (nb, k)


def test_each_setting_is_written_once_per_file():
    """The recipe lives in `train`: a notebook section may change a shared key (04's epochs), not repeat it."""
    for path in PARAM_FILES:
        raw = yaml.safe_load(path.read_text())
        shared = raw.get("common", {}) | raw.get("train", {})
        for nb in params.NOTEBOOKS:
            repeated = [k for k, v in raw.get(nb, {}).items() if k in shared and shared[k] == v]
            assert not repeated, (path.name, nb, repeated)


def test_a_variant_file_states_only_what_it_changes(tmp_path):
    """`base:` merges the base file (and its own base) before the variant, key by key, over default.yaml;
    a loop of bases, a missing base or a base that is no path is one error naming the file."""
    (tmp_path / "a.yaml").write_text("common:\n  eval_limit: 7\ntrain:\n  lora_r: 8\n  learning_rate: 1e-4\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\ntrain:\n  lora_r: 16\n")
    (tmp_path / "sub" / "c.yaml").write_text("base: b.yaml\n01_finetune:\n  max_new_tokens: 9\n")
    p = paramfile.load(tmp_path / "sub" / "c.yaml")["01_finetune"]
    default = paramfile.load()["01_finetune"]
    assert (p.eval_limit, p.lora_r, p.learning_rate, p.max_new_tokens) == (7, 16, 1e-4, 9)
    assert (p.max_steps, p.model) == (default.max_steps, default.model)  # untouched keys: default.yaml's
    assert paramfile.load(tmp_path / "sub" / "b.yaml")["01_finetune"].max_new_tokens == default.max_new_tokens
    (tmp_path / "x.yaml").write_text("base: y.yaml\ntrain:\n  lora_r: 4\n")
    (tmp_path / "y.yaml").write_text("base: x.yaml\n")
    with pytest.raises(params.ParamsError, match="bases loop"):
        paramfile.load(tmp_path / "x.yaml")
    (tmp_path / "y.yaml").write_text("base: nope.yaml\n")
    with pytest.raises(params.ParamsError, match="nope.yaml: params file not found"):
        paramfile.load(tmp_path / "x.yaml")
    (tmp_path / "y.yaml").write_text("base: [a.yaml]\n")
    with pytest.raises(params.ParamsError, match="'base' must be a params file's path"):
        paramfile.load(tmp_path / "x.yaml")


def test_train_section_reaches_01_and_04_alike(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("train:\n  learning_rate: 1e-4\n  lora_r: 8\n04_plm_compare:\n  epochs: 2\n")
    loaded = paramfile.load(f)
    for nb in ("01_finetune", "04_plm_compare"):
        assert loaded[nb].learning_rate == 0.0001 and loaded[nb].lora_r == 8  # 1e-4: YAML 1.2 float
    assert loaded["01_finetune"].epochs == 5.0 and loaded["04_plm_compare"].epochs == 2.0
    f.write_text("train:\n  templates: [course]\n")
    with pytest.raises(params.ParamsError, match=r"unknown train parameter\(s\) \['templates'\]"):
        paramfile.load(f)


def _parameters_cell(nb_path):
    nb = json.loads(nb_path.read_text())
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{nb_path.name}: exactly one parameters cell"
    tree = ast.parse("".join(cells[0]["source"]))
    return {n.targets[0].id: ast.literal_eval(n.value) for n in tree.body}  # literals only


@pytest.mark.parametrize("name", list(params.NOTEBOOKS))
def test_notebook_parameters_cell_matches_default_yaml(name):
    """The parameters cell holds literals only, one per dataclass field, equal to params/default.yaml."""
    cell = _parameters_cell(ROOT / "notebooks" / f"{name}.ipynb")
    assert cell == paramfile.load()[name].to_dict()


def test_notebooks_have_no_outputs():
    for nb in (ROOT / "notebooks").glob("*.ipynb"):
        for c in json.loads(nb.read_text())["cells"]:
            assert not c.get("outputs"), f"{nb.name} is committed with outputs"


def test_unknown_key_is_an_error_naming_it(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("01_finetune:\n  lora_rr: 8\n")
    with pytest.raises(params.ParamsError, match=r"unknown parameter\(s\) \['lora_rr'\]"):
        paramfile.load(f)
    f.write_text("common:\n  modle: x\n")
    with pytest.raises(params.ParamsError, match="modle"):
        paramfile.load(f)
    f.write_text("02_zeroshoot:\n  templates: [course]\n")
    with pytest.raises(params.ParamsError, match="02_zeroshoot"):
        paramfile.load(f)


@pytest.mark.parametrize("yaml_text,msg", [
    ("01_finetune:\n  lora_r: '64'\n", "'lora_r' must be int"),
    ("01_finetune:\n  save_steps: -1\n", "'save_steps' must be >= 0"),
    ("01_finetune:\n  balance_ranks: true\n  group_by_length: true\n", "exclude each other"),
    ("01_finetune:\n  gradient_checkpointing: 1\n", "'gradient_checkpointing' must be bool"),
    ("02_zeroshot:\n  templates: course\n", "'templates' must be list"),
    ("common:\n  quantization: int8\n", "'quantization' must be one of"),
    ("common:\n  template: fancy\n", "unknown prompt template 'fancy'"),
    ("03_fewshot_sweep:\n  strategies: [best]\n", "must be one of"),
])
def test_mistyped_values_are_errors(tmp_path, yaml_text, msg):
    f = tmp_path / "x.yaml"
    f.write_text(yaml_text)
    with pytest.raises(params.ParamsError, match=msg):
        paramfile.load(f)


def test_floats_accept_ints():
    assert params.FinetuneParams(learning_rate=1, epochs=2).learning_rate == 1


def test_from_notebook_rejects_injected_typo():
    ns = {**params.ZeroshotParams().to_dict(), "templtes": ["course"], "In": [], "_": None, "json": json}
    with pytest.raises(params.ParamsError, match="templtes"):
        paramfile.from_notebook(params.ZeroshotParams, ns)
    del ns["templtes"]
    assert paramfile.from_notebook(params.ZeroshotParams, ns).templates == ["course", "instructive", "chat"]


def test_command_line_changes_are_read_as_a_params_file_reads_them():
    """+key=value of a dataclass's fields; 1e-4 is a number (YAML 1.2), not the string PyYAML makes of it."""
    got = paramfile.parse_changes(["+learning_rate=1e-4", "lora_alpha=64", "target_modules=[q_proj]"], params.TrainParams)
    assert got == {"learning_rate": 0.0001, "lora_alpha": 64, "target_modules": ["q_proj"]}
    params.TrainParams(**got)  # the types pass the dataclass's check
    for bad in ("num_beams=2", "lora_alpha"):
        with pytest.raises(params.ParamsError, match="not key=value of a TrainParams field"):
            paramfile.parse_changes([bad], params.TrainParams)
