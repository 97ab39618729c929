import json
import os
import signal
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lib import ROOT, launch, paramfile, params, runs
from tests.tiny_model import TINY


def test_launch_command_for_n_processes(tmp_path):
    cmd = launch.command("p.yaml", tmp_path, 4)
    i = cmd.index("--num_processes")
    assert cmd[i + 1] == "4" and "--multi_gpu" in cmd and "--cpu" not in cmd
    assert cmd[-5:] == ["-m", "lib.train", "p.yaml", "--out", str(tmp_path)]
    assert "--cpu" in launch.command("p.yaml", tmp_path, 1, cpu=True)
    assert "--multi_gpu" not in launch.command("p.yaml", tmp_path, 1)
    i = cmd.index("--main_process_port")
    assert 1024 <= int(cmd[i + 1]) < 65536 and launch.command("p.yaml", tmp_path, 2, port=29511)[i + 1] == "29511"
    env = launch.environment()
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"


def test_effective_batch_is_kept():
    assert launch.per_process_accum(16, 2) == 8 and launch.per_process_accum(16, 4) == 4
    with pytest.raises(ValueError, match="not divisible"):
        launch.per_process_accum(16, 3)
    with pytest.raises(params.ParamsError, match="divisible by num_processes"):
        params.FinetuneParams(grad_accum=16, num_processes=3)


def _cfg(tmp_path, n, **train):
    """The GPU recipe's way of training (bf16, packed rows, answer-only loss, frozen weights kept in their
    dtype, dequantized cache), small: 2 x 4 per step, so each of 2 processes also accumulates 2."""
    f = tmp_path / f"p{n}.yaml"
    f.write_text(yaml.safe_dump({"common": {"model": TINY, "eval_limit": 7, "compute_dtype": "bfloat16"}, "01_finetune": {
        "micro_batch_size": 2, "grad_accum": 4, "max_steps": 4, "eval_steps": 2, "save_steps": 2,
        "logging_steps": 1, "learning_rate": 0.01, "packing": True, "gradient_checkpointing": False,
        "keep_frozen_dtype": True, "cache_dequantized": True, "num_processes": n, **train}}))
    return f


def _log(run, step=4):
    """(loss, grad_norm) of every optimizer step, from the last checkpoint's trainer state."""
    h = json.loads((run / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").read_text())["log_history"]
    return [x for r in h if "loss" in r for x in (r["loss"], r["grad_norm"], r["epoch"])]


def _kill_after(cmd, env, done: Path, out):
    """Run cmd; once the file done exists, SIGKILL its process group and every process naming out on its
    command line (torch's launcher starts the workers in sessions of their own)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    for _ in proc.stdout:
        if done.exists():
            os.killpg(proc.pid, signal.SIGKILL)
            subprocess.run(["pkill", "-9", "-f", str(out)])
            break
    return proc.wait()


def test_two_process_cpu_run_is_the_one_process_run(tmp_path, capfd):
    """accelerate launch, 2 CPU processes (gloo), each accumulating 2 of the step's 4 micro-batches: the
    same records per step, the same gradients, the same curve as 1 process, evaluation sharded (7
    records: 4 + 3) and gathered back. A 2-process run killed after a checkpoint resumes to that curve."""
    one = launch.run(_cfg(tmp_path, 1), tmp_path / "one", 1, cpu=True)
    two = launch.run(_cfg(tmp_path, 2), tmp_path / "two", 2, cpu=True)
    s1 = json.loads((one / "summary.json").read_text())
    s2 = json.loads((two / "summary.json").read_text())
    assert (s1["num_processes"], s2["num_processes"]) == (1, 2)
    # each process's step and fetch medians, gathered to the main process's summary in rank order
    assert [len(s1["per_process"]), len(s2["per_process"])] == [1, 2]
    assert s2["per_process"][0]["median_s_per_step"] == s2["median_s_per_step"]
    assert all(0 < x["median_fetch_s"] < x["median_s_per_step"] for x in s1["per_process"] + s2["per_process"])
    c1, c2 = pd.read_csv(one / "curve.csv"), pd.read_csv(two / "curve.csv")
    assert c1.step.tolist() == c2.step.tolist() == [0, 2, 4]
    assert c2.eval_ppl.iloc[-1] < c2.eval_ppl.iloc[0]  # it learns
    # float tolerance: the 2 processes sum the same numbers in another order (measured: equal to the bit)
    for col in ("eval_ppl", "eval_ppl_classical", "eval_ppl_modern", "eval_bits_per_char"):
        assert c2[col].to_numpy() == pytest.approx(c1[col].to_numpy(), rel=1e-5)
    # per step: the loss over all 8 records, the gradient norm after the all-reduce (before: 0.080 vs
    # 0.105 at step 1, while the second process trained through repacked 4-bit weights), the epoch
    # progress (samples per step / dataset size: equal means equal batches)
    assert _log(two) == pytest.approx(_log(one), rel=1e-5) and _log(one)[2] == pytest.approx(8 / 40)
    assert (two / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors").exists()

    cut = tmp_path / "cut"
    cfg = paramfile.dump_train(paramfile.load(_cfg(tmp_path, 2))["01_finetune"], tmp_path / "cut.yaml")
    env = launch.environment() | {"CUDA_VISIBLE_DEVICES": ""}
    rc = _kill_after(launch.command(cfg, cut, 2, cpu=True), env,
                     cut / "checkpoints" / "checkpoint-2" / runs.MARKER, cut)
    assert rc != 0 and not (cut / "summary.json").exists()
    capfd.readouterr()
    launch.run(cfg, cut, 2, cpu=True)
    assert "resuming from" in capfd.readouterr().out  # not a fresh start, which would give the same curve
    c3 = pd.read_csv(cut / "curve.csv")
    assert c3.step.tolist() == [0, 2, 4]
    assert c3.eval_ppl.to_numpy() == pytest.approx(c2.eval_ppl.to_numpy(), rel=1e-5)


def test_bf16_gradient_all_reduce_is_used_and_stays_close(tmp_path):
    """ddp_bf16_grads: the 2-process run all-reduces bf16-rounded gradients, so its per-step loss and
    gradient norm leave the 1-process values (which fp32 all-reduce matches to 1e-5, test above) but stay
    within bf16's rounding of them."""
    one = launch.run(_cfg(tmp_path, 1), tmp_path / "one", 1, cpu=True)
    two = launch.run(_cfg(tmp_path, 2, ddp_bf16_grads=True), tmp_path / "two", 2, cpu=True)
    assert _log(two) != pytest.approx(_log(one), rel=1e-5)
    assert _log(two) == pytest.approx(_log(one), rel=5e-3)  # measured: at most 6e-4


def test_lean_ddp_reaches_ddp_and_plain_ddp_keeps_the_one_process_run(tmp_path):
    """ddp_lean: HF's arguments broadcast no buffers and accelerate's DDP handler makes gradients views of
    the buckets (where train() reads them); it is the default, so the 2-process run above trains through
    those views. DDP as torch sets it up (ddp_lean false) trains the 1-process losses, gradient norms and
    curve too."""
    import types

    from accelerate.utils import DistributedDataParallelKwargs

    from lib import params, trainer

    lean = params.FinetuneParams(ddp_lean=True)
    assert trainer.training_args(lean, tmp_path, 40).ddp_broadcast_buffers is False
    assert trainer.training_args(params.FinetuneParams(ddp_lean=False), tmp_path, 40).ddp_broadcast_buffers is None
    for p, views in ((lean, True), (params.FinetuneParams(ddp_lean=False), False), (params.FinetuneParams(ddp_lean=True, ddp_bf16_grads=True), True)):
        stand_in = types.SimpleNamespace(accelerator=types.SimpleNamespace(ddp_handler=DistributedDataParallelKwargs()))
        h = trainer.configure(stand_in, p).accelerator.ddp_handler
        assert h.to_kwargs().get("gradient_as_bucket_view", False) is views
    one = launch.run(_cfg(tmp_path, 1), tmp_path / "one", 1, cpu=True)
    two = launch.run(_cfg(tmp_path, 2, ddp_lean=False), tmp_path / "two", 2, cpu=True)
    assert _log(two) == pytest.approx(_log(one), rel=1e-5)
    c1, c2 = pd.read_csv(one / "curve.csv"), pd.read_csv(two / "curve.csv")
    assert c2.eval_ppl.to_numpy() == pytest.approx(c1.eval_ppl.to_numpy(), rel=1e-5)
    assert c2.eval_ppl.iloc[-1] < c2.eval_ppl.iloc[0]


def test_balanced_ranks_two_processes_are_the_one_process_run(tmp_path):
    """balance_ranks: each step's records split by tokens (lib.sampler) - 1 process accumulating 4
    micro-batches or 2 processes 2 each train the same records per step: the same losses, gradient norms
    and curve, each rank taking its share of the shuffle without talking to the other."""
    one = launch.run(_cfg(tmp_path, 1, balance_ranks=True), tmp_path / "one", 1, cpu=True)
    two = launch.run(_cfg(tmp_path, 2, balance_ranks=True), tmp_path / "two", 2, cpu=True)
    assert _log(two) == pytest.approx(_log(one), rel=1e-5) and _log(one)[2] == pytest.approx(8 / 40)
    c1, c2 = pd.read_csv(one / "curve.csv"), pd.read_csv(two / "curve.csv")
    assert c2.eval_ppl.to_numpy() == pytest.approx(c1.eval_ppl.to_numpy(), rel=1e-5)
    assert c2.eval_ppl.iloc[-1] < c2.eval_ppl.iloc[0]


@pytest.mark.parametrize("option", [{"fuse_projections": True}, {"varlen_attention": True},
                                    {"gradient_checkpointing": True, "compile": True, "compiled_recompute": 2},
                                    {"varlen_attention": True, "compile": True, "cuda_graphs": True},
                                    {"varlen_attention": True, "compile": True, "cuda_graphs": True, "flat_params": True}],
                         ids=lambda o: list(o)[-1])
def test_speed_option_two_processes_are_the_one_process_run(tmp_path, option):
    """Under DDP, fuse_projections (its 16-bit base weights are views of one stacked tensor, which the
    wrap-time broadcast writes through), varlen_attention (each rank's bounds reach its attention through
    DDP's forward; the switch is made on the unwrapped model) and compiled_recompute (the checkpointed
    layers' recompute inside their compiled backward, DDP's gradient hooks firing from it) and cuda_graphs (the
    whole decoder compiled, the gradients summed by the Trainer's own flat all-reduce, DDP's hooks idle; with
    flat_params the weights are views of the optimizer's one parameter, which the wrap-time broadcast writes
    through): 2 processes
    train the 1-process run's losses, gradient norms and curve; and that run is the plain one's to bf16
    rounding."""
    plain = launch.run(_cfg(tmp_path, 1), tmp_path / "plain", 1, cpu=True)
    one = launch.run(_cfg(tmp_path, 1, **option), tmp_path / "one", 1, cpu=True)
    two = launch.run(_cfg(tmp_path, 2, **option), tmp_path / "two", 2, cpu=True)
    assert _log(two) == pytest.approx(_log(one), rel=1e-5)
    c1, c2 = pd.read_csv(one / "curve.csv"), pd.read_csv(two / "curve.csv")
    assert c2.eval_ppl.to_numpy() == pytest.approx(c1.eval_ppl.to_numpy(), rel=1e-5)
    assert _log(one) == pytest.approx(_log(plain), rel=5e-3)
    assert c1.eval_ppl.to_numpy() == pytest.approx(pd.read_csv(plain / "curve.csv").eval_ppl.to_numpy(), rel=5e-3)


def test_lean_ddp_keeps_each_compiled_layer_one_graph(tmp_path):
    """Under DDP, dynamo cut a compiled layer holding more than 1 MB of trainable weights into two graphs
    (DDPOptimizer's first bucket; qwen2.5-1.5B's LoRA is ~10 MB a layer); ddp_lean keeps it one graph,
    with the same output and gradients."""
    import types

    import torch
    import torch._dynamo
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from lib import params, trainer

    class Layer(torch.nn.Module):  # a class of its own: dynamo does not trace torch.nn's own modules' frames
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(512, 512), torch.nn.Linear(512, 512)  # 1 MB of weights each

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    class Model(torch.nn.Module):
        def __init__(self, backend):
            super().__init__()
            torch.manual_seed(0)
            self.layer = Layer()
            self.layer.compile(backend=backend)

        def forward(self, x):
            return self.layer(x).square().mean()

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        counts, grads = {}, {}
        for lean in (False, True):
            graphs = []

            def backend(gm, example_inputs):
                graphs.append(gm)
                return gm.forward

            with torch._dynamo.config.patch(optimize_ddp=True):
                stand_in = types.SimpleNamespace(accelerator=types.SimpleNamespace(ddp_handler=None))
                trainer.configure(stand_in, params.FinetuneParams(ddp_lean=lean))
                torch._dynamo.reset()
                model = DistributedDataParallel(Model(backend))
                model(torch.ones(4, 512)).backward()
            counts[lean] = len(graphs)
            grads[lean] = [q.grad for q in model.parameters()]
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()
    assert counts == {False: 2, True: 1}
    for a, b in zip(grads[False], grads[True]):
        assert torch.allclose(a, b)
