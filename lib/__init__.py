"""Instruction-tuning causal LLMs on Classical Chinese <-> vernacular translation (NTU ADL 2023 HW3)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # project root: relative paths in params resolve here


def resolve(path) -> Path:
    """A params path: absolute stays, relative is taken from the project root (not the cwd)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else ROOT / p

# bitsandbytes warns at import on CPUs with AVX512-BF16 that an optional kernel package is missing; it
# falls back to its own kernel, so the warning is noise in every command's output
import logging  # noqa: E402

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# tqdm.auto, which transformers and others import, warns where ipywidgets is missing ("IProgress not
# found"): a red box in JupyterLab and a line a notebook on the pipeline's console; the bars work without
import warnings  # noqa: E402

warnings.filterwarnings("ignore", message="IProgress not found")
