import json

import pandas as pd
import pytest
import yaml

from lib import launch, params
from tests.tiny_model import TINY


def test_launch_command_for_n_processes(tmp_path):
    cmd = launch.command("p.yaml", tmp_path, 4)
    i = cmd.index("--num_processes")
    assert cmd[i + 1] == "4" and "--multi_gpu" in cmd and "--cpu" not in cmd
    assert cmd[-5:] == ["-m", "lib.train", "p.yaml", "--out", str(tmp_path)]
    assert "--cpu" in launch.command("p.yaml", tmp_path, 1, cpu=True)
    assert "--multi_gpu" not in launch.command("p.yaml", tmp_path, 1)
    env = launch.environment()
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"


def test_effective_batch_is_kept():
    assert launch.per_process_accum(16, 2) == 8 and launch.per_process_accum(16, 4) == 4
    with pytest.raises(ValueError, match="not divisible"):
        launch.per_process_accum(16, 3)
    with pytest.raises(params.ParamsError, match="divisible by num_processes"):
        params.FinetuneParams(grad_accum=16, num_processes=3)


def _cfg(tmp_path, n):
    f = tmp_path / f"p{n}.yaml"
    f.write_text(yaml.safe_dump({"common": {"model": TINY, "eval_limit": 7}, "01_finetune": {
        "micro_batch_size": 2, "grad_accum": 4, "max_steps": 4, "eval_steps": 2, "save_steps": 2,
        "logging_steps": 1, "learning_rate": 0.01, "num_processes": n}}))
    return f


def test_two_process_cpu_run_keeps_the_effective_batch(tmp_path):
    """accelerate launch, 2 CPU processes (gloo): same samples per step, evaluation sharded, same curve."""
    one = launch.run(_cfg(tmp_path, 1), tmp_path / "one", 1, cpu=True, port=29511)
    two = launch.run(_cfg(tmp_path, 2), tmp_path / "two", 2, cpu=True, port=29512)
    s1 = json.loads((one / "summary.json").read_text())
    s2 = json.loads((two / "summary.json").read_text())
    assert (s1["num_processes"], s2["num_processes"]) == (1, 2)
    c1, c2 = pd.read_csv(one / "curve.csv"), pd.read_csv(two / "curve.csv")
    assert c1.step.tolist() == c2.step.tolist() == [0, 2, 4]
    assert c2.eval_ppl.iloc[-1] < c2.eval_ppl.iloc[0]  # it learns
    # the evaluation is sharded across the 2 processes (7 records: 4 + 3) and gathered back: at step 0 (same
    # model) every number equals one process's. Later steps differ by up to 0.2%: the 2-process training
    # itself is not yet the 1-process one to float tolerance (open in the multi-GPU issue)
    for col in ("eval_ppl", "eval_ppl_classical", "eval_ppl_modern", "eval_bits_per_char"):
        assert c2[col].iloc[0] == pytest.approx(c1[col].iloc[0], rel=1e-6)
    assert c2.eval_ppl.to_numpy() == pytest.approx(c1.eval_ppl.to_numpy(), rel=5e-3)
    # epoch progress per optimizer step = samples per step / dataset size: equal means equal batches
    ep = lambda d: [r["epoch"] for r in json.loads(
        (d / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())["log_history"] if "loss" in r]
    assert ep(one) == pytest.approx(ep(two)) and ep(one)[0] == pytest.approx(8 / 40)
    assert (two / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors").exists()
