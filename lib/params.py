"""One typed parameter dataclass per notebook, plus YAML loading: defaults + overrides, validated.

papermill only warns about unknown parameters, so a typo would silently do nothing; here unknown keys
and wrong types are errors that name the key, both in the runner and inside the notebook itself.
"""
import dataclasses
import inspect
import types
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import get_args, get_origin, get_type_hints

import yaml

from . import ROOT, resolve
from .launch import per_process_accum

DEFAULT_FILE = ROOT / "params" / "default.yaml"


class ParamsError(ValueError):
    """A parameter is unknown, mistyped or out of range."""


def _type_ok(value, hint) -> bool:
    if get_origin(hint) is list:
        (inner,) = get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if hint is float:  # YAML writes 2e-4 as a float but 1 as an int; both are fine floats
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint) -> str:
    return getattr(hint, "__name__", str(hint)) if get_origin(hint) is None else str(hint)


@dataclass
class Common:
    """Parameters every notebook shares."""

    run: str = "default"  # names the run: reports/<run>/<timestamp>/
    out_dir: str = "reports/interactive"  # where results go; the runner sets it per run
    model: str = "gemma-3-270m"  # embedded name (gemma-3-270m, smollm2-135m, tiny-llama), hub id or path
    data_dir: str = "data/sample"  # folder with train/public_test/private_test.json
    eval_split: str = "public_test"
    eval_limit: int = 0  # score only the first N records (0 = all)
    template: str = "course"  # prompt template name (lib.prompts.TEMPLATES)
    quantization: str = "nf4"  # nf4 (QLoRA: 4-bit NF4, double quant) or none
    compute_dtype: str = "float32"  # the seed's; bfloat16 is ~3x faster on GPUs
    device: str = "auto"  # auto, cpu, cuda
    max_length: int = 2048  # the course's cut
    eval_batch_size: int = 16
    seed: int = 0

    def __post_init__(self):
        hints = get_type_hints(type(self))
        for f in fields(self):
            v = getattr(self, f.name)
            if not _type_ok(v, hints[f.name]):
                raise ParamsError(f"parameter {f.name!r} must be {_type_name(hints[f.name])}, got {v!r}")
        self.check()

    def check(self):
        from . import models

        _choice("quantization", self.quantization, models.QUANTIZATIONS)
        _choice("compute_dtype", self.compute_dtype, models.DTYPES)
        _choice("eval_split", self.eval_split, ("train", "public_test"))
        _template(self.template)
        _positive(self, "max_length", "eval_batch_size")
        if self.eval_limit < 0:
            raise ParamsError("parameter 'eval_limit' must be >= 0 (0 = all)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _choice(name, value, allowed):
    if value not in allowed:
        raise ParamsError(f"parameter {name!r} must be one of {list(allowed)}, got {value!r}")


def _template(name):
    from . import prompts

    try:
        prompts.template(name)
    except KeyError as e:
        raise ParamsError(e.args[0]) from None


def _positive(p, *names):
    for n in names:
        if getattr(p, n) <= 0:
            raise ParamsError(f"parameter {n!r} must be > 0, got {getattr(p, n)!r}")


@dataclass
class TrainParams(Common):
    """QLoRA recipe; defaults are the seed's hyperparameters."""

    train_limit: int = 0  # train on the first N records (0 = all)
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    micro_batch_size: int = 1
    grad_accum: int = 16  # effective batch = micro_batch_size * grad_accum
    epochs: float = 5.0
    max_steps: int = 0  # optimizer steps; > 0 overrides epochs
    learning_rate: float = 2e-4
    # The seed set "constant" + warmup_ratio 0.03, but HF's "constant" ignores warmup; this applies it.
    lr_scheduler: str = "constant_with_warmup"
    warmup_ratio: float = 0.03
    max_grad_norm: float = 0.3
    weight_decay: float = 0.0
    gradient_checkpointing: bool = True
    eval_steps: int = 100  # public-test perplexity every N optimizer steps (the learning curve)
    save_steps: int = 100
    logging_steps: int = 10
    resume: bool = True  # continue from the last checkpoint in out_dir if there is one
    num_processes: int = 1  # data-parallel processes (GPUs) via accelerate launch; grad_accum is split across them
    answer_loss: bool = True  # LM head only on answer tokens: same loss, no prompt logits (big vocabularies)
    packing: bool = False  # sequences laid end to end in rows, no padding between them (same per-example loss)
    pack_tokens: int = 512  # row length for packing (a longer sequence gets a row of its own)
    group_by_length: bool = False  # batches of similar length pad less (speed); False keeps the seed's order
    # speedups (lib/speedups.py; measured in benchmarks/README.md); all off = the seed's recipe
    keep_frozen_dtype: bool = False  # don't upcast frozen embeddings/norms/LM head to fp32 (peft's kbit prep does)
    cache_dequantized: bool = False  # dequantize the 4-bit weights once: same numbers, +2 bytes/weight
    compile: bool = False  # torch.compile each decoder layer
    lean_nf4: bool = False  # 4-bit layers without bitsandbytes' Python wrappers (lib/nf4.py): same products
    optim: str = "adamw_torch"  # adamw_torch_fused: the same AdamW in one kernel per step

    def check(self):
        super().check()
        _positive(self, "lora_r", "lora_alpha", "micro_batch_size", "pack_tokens", "grad_accum", "eval_steps", "num_processes",
                  "save_steps", "logging_steps", "learning_rate")
        _choice("lr_scheduler", self.lr_scheduler, ("constant", "constant_with_warmup", "linear", "cosine"))
        _choice("optim", self.optim, ("adamw_torch", "adamw_torch_fused"))
        if not 0 <= self.lora_dropout < 1 or not 0 <= self.warmup_ratio < 1:
            raise ParamsError("lora_dropout and warmup_ratio must be in [0, 1)")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ParamsError("set epochs > 0 or max_steps > 0")
        if self.compile:
            import torch

            if not hasattr(torch.compiler, "set_stance"):
                raise ParamsError("compile: true needs torch >= 2.6 (torch.compiler.set_stance)")
        for flag in ("cache_dequantized", "lean_nf4"):
            if getattr(self, flag) and self.quantization != "nf4":
                raise ParamsError(f"{flag} needs quantization: nf4 (there are no 4-bit layers)")
        if self.cache_dequantized and self.lean_nf4:
            raise ParamsError("cache_dequantized and lean_nf4 exclude each other (the cache replaces the 4-bit layers)")
        try:
            per_process_accum(self.grad_accum, self.num_processes)
        except ValueError as e:
            raise ParamsError(str(e)) from None


@dataclass
class GenerateParams:
    """Decoding settings (the seed's zero-shot settings; greedy by default)."""

    max_new_tokens: int = 128
    do_sample: bool = False
    num_beams: int = 1
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    gen_batch_size: int = 16
    first_line_only: bool = True  # answers are one line; a model given examples goes on with the next one


@dataclass
class FinetuneParams(GenerateParams, TrainParams):
    """notebooks/01_finetune."""

    predict_split: str = "private_test"
    predict_limit: int = 0  # predict the first N records (0 = all)
    show_examples: int = 5


@dataclass
class ZeroshotParams(Common):
    """notebooks/02_zeroshot."""

    templates: list[str] = field(default_factory=lambda: ["course", "instructive"])

    def check(self):
        super().check()
        for t in self.templates:
            _template(t)


@dataclass
class FewshotParams(GenerateParams, Common):
    """notebooks/03_fewshot_sweep."""

    shots: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5])
    strategies: list[str] = field(default_factory=lambda: ["fixed", "random", "retrieved"])
    random_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    quality_strategy: str = "retrieved"  # the configuration whose generations get chrF/BLEU
    quality_k: int = 4
    quality_limit: int = 0  # generate for the first N eval records (0 = all)
    show_examples: int = 5

    def check(self):
        super().check()
        for s in self.strategies + [self.quality_strategy]:
            _choice("strategies", s, ("fixed", "random", "retrieved"))
        if any(k < 0 for k in self.shots) or self.quality_k < 0:
            raise ParamsError("shots must be >= 0")


@dataclass
class PlmParams(TrainParams):
    """notebooks/04_plm_compare: the same recipe on several base models."""

    models: list[str] = field(default_factory=lambda: ["gemma-3-270m", "smollm2-135m"])


@dataclass
class ReportParams(Common):
    """notebooks/05_report: reads only the results under out_dir."""

    title: str = "Classical Chinese <-> vernacular instruction tuning"


NOTEBOOKS = {
    "01_finetune": FinetuneParams,
    "02_zeroshot": ZeroshotParams,
    "03_fewshot_sweep": FewshotParams,
    "04_plm_compare": PlmParams,
    "05_report": ReportParams,
}


def build(cls, values: dict):
    """cls(**values), with unknown keys reported by name (dataclasses would say 'unexpected keyword')."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ParamsError(f"unknown parameter(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    return cls(**values)


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections")
    sections = {"common", *NOTEBOOKS}
    bad = sorted(set(data) - sections)
    if bad:
        raise ParamsError(f"{path}: unknown section(s) {bad}; expected {sorted(sections)}")
    for k, v in data.items():
        if not isinstance(v, dict):
            raise ParamsError(f"{path}: section {k!r} must be a mapping")
    return data


def load(path=None) -> dict:
    """{notebook: params object} for a params file merged over params/default.yaml.

    The merge happens here and only here: common keys apply to every notebook, a notebook's own
    section overrides them, and the experiment file overrides the default file key by key.
    """
    merged = {k: dict(v) for k, v in _read_yaml(DEFAULT_FILE).items()}
    if path is not None and resolve(path) != DEFAULT_FILE:
        for k, v in _read_yaml(resolve(path)).items():
            merged.setdefault(k, {}).update(v)
    common = merged.get("common", {})
    unknown = sorted(set(common) - {f.name for f in fields(Common)})
    if unknown:
        raise ParamsError(f"{path or DEFAULT_FILE}: unknown common parameter(s) {unknown}")
    out = {}
    for nb, cls in NOTEBOOKS.items():
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in common.items() if k in names}
        try:
            out[nb] = build(cls, {**values, **merged.get(nb, {})})
        except ParamsError as e:
            raise ParamsError(f"{path or DEFAULT_FILE} [{nb}]: {e}") from None
    return out


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
