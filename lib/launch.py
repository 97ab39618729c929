"""Data-parallel fine-tuning through `accelerate launch` (DDP), driven by the same params.

One process per GPU (gloo on CPU for tests); the HF Trainer picks the process group up from the
environment accelerate sets. The effective batch stays the single-GPU recipe's:
micro_batch_size x grad_accum, with grad_accum split across the processes.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

from . import ROOT


class LaunchError(RuntimeError):
    """A launched data-parallel run failed (its processes printed why)."""


def per_process_accum(grad_accum: int, num_processes: int) -> int:
    """Gradient-accumulation steps per process that keep the effective batch unchanged."""
    if grad_accum % num_processes:
        raise ValueError(f"grad_accum={grad_accum} is not divisible by num_processes={num_processes}: "
                         "the effective batch would change")
    return grad_accum // num_processes


def free_port() -> int:
    """A TCP port nobody listens on now: two runs on one host (or a port still held by a finished run)
    must not meet on accelerate's default 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_command(num_processes: int, cpu: bool = False, port: int | None = None) -> list[str]:
    """`accelerate launch` for N processes on this host, up to the program it runs.

    cpu=True hides the GPUs (tests); accelerate refuses --cpu together with --multi_gpu. port: of the
    processes' rendezvous; a free one by default.
    """
    port = port or free_port()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", "no", "--main_process_port", str(port),
           "--dynamo_backend", "no"]
    if num_processes > 1:  # --multi_gpu is accelerate's torchrun path; without CUDA it runs on gloo
        cmd += ["--multi_gpu"]
    elif cpu:
        cmd += ["--cpu"]
    return cmd


def command(params_file, out, num_processes: int, cpu: bool = False, port: int | None = None) -> list[str]:
    """The `accelerate launch` command line for N processes on this host running lib.train."""
    return accelerate_command(num_processes, cpu, port) + ["-m", "lib.train", str(params_file), "--out", str(out)]


def environment() -> dict:
    """The launch environment: NVLink multicast stays off (it can take a shared host's GPUs down)."""
    return {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(params_file, out, num_processes: int, cpu: bool = False, port: int | None = None) -> Path:
    """Launch and wait; raises with the exit code if any process failed."""
    env = environment() | ({"CUDA_VISIBLE_DEVICES": ""} if cpu else {})
    rc = subprocess.run(command(params_file, out, num_processes, cpu, port), cwd=ROOT, env=env).returncode
    if rc:
        raise LaunchError(f"accelerate launch with {num_processes} processes failed (exit {rc})")
    return Path(out)
