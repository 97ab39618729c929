"""The HF Trainer as the fine-tuning runs it: answer-only loss, the learning-curve callback, arguments."""
import contextlib
import dataclasses
import functools
import math
import os
import statistics
import time
import warnings
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
from accelerate.utils import DistributedDataParallelKwargs
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_pt_utils import BatchRebalanceSampler

from . import collate, evaluate, prompts, speedups, varlen_attention
from .graph_grads import GraphGrads
from .launch import per_process_accum
from .models import device_for
from .sampler import PackedRebalanceSampler


def world_size() -> int:
    """Processes in this data-parallel run (1 unless started by accelerate launch)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    """The process that prints and writes (rank 0 under accelerate launch; the only one otherwise)."""
    return int(os.environ.get("RANK", 0)) == 0


def planned_steps(p, n_train) -> int:
    """Optimizer steps the run will take (the same on 1 or N processes: the effective batch is fixed)."""
    if p.max_steps > 0:
        return p.max_steps
    per_epoch = math.ceil(n_train / (p.micro_batch_size * p.grad_accum))
    return math.ceil(per_epoch * p.epochs)


class TrainingDiverged(RuntimeError):
    """The loss, the gradient norm or an evaluation is no longer finite: the weights are lost from here."""


def check_finite(step: int, values: dict):
    """Stop a run whose numbers turned NaN or infinite. HF's Trainer would go on (it even hides a NaN loss
    in its logs behind the running mean), training NaN weights to the end and saving them; a run on an
    H100 did so for 200 steps before anyone looked (cuDNN's attention, see no_cudnn_attention)."""
    bad = {k: v for k, v in values.items() if v is not None and not math.isfinite(float(v))}
    if bad:
        what = ", ".join(f"{k} {v}" for k, v in bad.items())
        raise TrainingDiverged(f"step {step}: {what}: training diverged and stops here (the adapter saved at "
                               "the best evaluation and the checkpoints before this step are kept). Try a lower "
                               "learning_rate or max_grad_norm, or compute_dtype: float32")


def curve_row(df) -> dict:
    """A learning-curve row from per-example scores: mean ppl and bits per char, overall and per direction."""
    row = {"eval_ppl": float(df.ppl.mean()), "eval_bits_per_char": evaluate.bits_per_char(df)}
    for d, g in df.groupby("direction"):
        row[f"eval_ppl_{d}"], row[f"eval_bits_per_char_{d}"] = float(g.ppl.mean()), evaluate.bits_per_char(g)
    return row


def _wait_for_device():
    """The host waits until the GPU has run what was queued (nothing to wait for on a CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class CurveCallback(TrainerCallback):
    """Course-metric perplexity on the eval set every eval_steps (and at steps 0 and last).

    Rows go into state.log_history, which checkpoints carry, so a resumed run keeps its curve. A new
    best is saved as best_adapter/. Under DDP the processes share the evaluation (each scores a shard)
    and all get the whole result, so their Trainer states stay identical (an evaluation on rank 0 alone
    hung the next checkpoint save in a 2-process run); the main process alone writes files.
    """

    WARM_UP = 10  # steps of compilation before the steady pace

    def __init__(self, tok, eval_records, p, out: Path):
        self.tok, self.records, self.p, self.out = tok, eval_records, p, out
        self.prompts = [prompts.build(r["instruction"], p.template) for r in eval_records]
        self.eval_s = 0.0  # time spent here, so seconds per step can leave it out
        self.step_s = []  # each optimizer step's seconds, end to end, evaluations and checkpoint saves left out
        self._t = None  # when the last step (or evaluation, or save) ended

    def _score(self, model):
        """Per-example scores of the eval set; under DDP each process scores every world-th record and
        all gather the rows back into the one-process order, so every process holds the same table."""
        ranks = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        idx = list(range(dist.get_rank() if ranks > 1 else 0, len(self.records), ranks))
        with speedups.eager():
            df = evaluate.score_records(model, self.tok, [self.records[i] for i in idx], [self.prompts[i] for i in idx],
                                        self.p.eval_batch_size, self.p.max_length).assign(_i=idx)
        if ranks > 1:
            parts = [None] * ranks
            dist.all_gather_object(parts, df)
            df = pd.concat(parts)
        return df.sort_values("_i").drop(columns="_i").reset_index(drop=True)

    def _evaluate(self, model, state):
        t = time.time()
        model.eval()
        df = self._score(model)
        model.train()
        row = {"step": state.global_step, **curve_row(df)}
        check_finite(state.global_step, {"eval_ppl": row["eval_ppl"]})
        state.log_history.append(row)
        if state.best_metric is None or row["eval_ppl"] < state.best_metric:
            state.best_metric, state.best_global_step = row["eval_ppl"], state.global_step
            if state.is_world_process_zero:
                model.save_pretrained(self.out / "best_adapter")
        if state.is_world_process_zero:
            print(f"step {state.global_step}: eval ppl {row['eval_ppl']:.3f}", flush=True)
        self.eval_s += time.time() - t

    def on_train_begin(self, args, state, control, model=None, **kw):
        if state.global_step == 0:
            self._evaluate(model, state)
        self._t = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        check_finite(state.global_step, {k: logs.get(k) for k in ("loss", "grad_norm")})

    def steady_s_per_step(self, warm_up: int = WARM_UP) -> float | None:
        """The mean step after the first warm_up (compilation): the host may run a few steps ahead of the
        GPU and wait at the next sync (a logged loss), so single steps - and their median - can show the
        host's pace; over many steps the mean is the pace of both."""
        steady = self.step_s[warm_up:] if len(self.step_s) > warm_up else self.step_s
        return sum(steady) / len(steady) if steady else None

    def on_save(self, args, state, control, **kw):
        self._t = time.perf_counter()  # a checkpoint's save is not the next step's time

    def on_step_end(self, args, state, control, model=None, **kw):
        # A step's time runs from the end of the one before, so it holds what the Trainer does between
        # steps too: fetching and copying the batches, a logged loss's wait for the GPU. Timed from the
        # step's start instead, a step that never waited for the GPU looked as fast as its host (a run
        # without syncs waits at the log, outside that window). Where the mean's window starts and where
        # an evaluation starts, the GPU's queued work is waited for, so it counts in the steps that queued it.
        evaluate = state.global_step % self.p.eval_steps == 0 or state.global_step == state.max_steps
        if evaluate or len(self.step_s) + 1 == self.WARM_UP:
            _wait_for_device()
        self.step_s.append(time.perf_counter() - self._t)  # _t: set at train begin, after each step and save
        if evaluate:
            self._evaluate(model, state)
        self._t = time.perf_counter()


def answer_loss(model, input_ids, labels, attention_mask=None, position_ids=None, num_items_in_batch=None,
                bf16=False, head_loss="chunked", answer_index=None, **attention_kw):
    """Mean NLL of the answer tokens (labels != IGNORE), the LM head run on those positions only.
    answer_index: their flat positions from the collator (varlen_attention), which spares a host-GPU sync."""
    score = collate.scored(labels) if answer_index is None else None
    # accelerate puts bf16 autocast around model.forward; this path calls the decoder directly, so it must
    # do the same, or the LoRA matmuls run in fp32 with a cast around every one of them
    with torch.autocast(labels.device.type, dtype=torch.bfloat16, enabled=bf16):
        losses, _ = evaluate.token_nll(model, input_ids, attention_mask, score, position_ids, head_loss,
                                       index=answer_index, **attention_kw)
    # a sum over the items of all accumulated micro-batches, as HF does: exact token mean per step
    return losses.sum() / (num_items_in_batch if num_items_in_batch is not None else losses.numel())


def sampling_strategy(p) -> str:
    """HF's name for how the training batches are drawn."""
    return "batch_rebalance" if p.balance_ranks else "group_by_length" if p.group_by_length else "random"


class BalancedTrainer(Trainer):
    """HF's Trainer whose balance_ranks sampler splits by tokens (lib.sampler: HF's splits padded cost) and
    shuffles by the run's seed (HF builds it with its default, 42, whatever `seed` says)."""

    cuda_graphs = False  # SpeedParams.cuda_graphs; configure sets it from the recipe
    graph_grads = None  # GraphGrads under cuda_graphs, made at the first micro-batch
    flat_params = False  # SpeedParams.flat_params (with cuda_graphs); configure sets it
    bound = False  # this train() call's weights rebound to the flat parameters (flat_params)
    fetch_s = ()  # each optimizer step's seconds in get_batch_samples, this train() call's (a list from train())

    def _get_train_sampler(self, train_dataset=None):
        s = super()._get_train_sampler(train_dataset)
        if isinstance(s, BatchRebalanceSampler):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            s = PackedRebalanceSampler(s.lengths, s.effective_batch_size, s.dp_size, s.grad_accum, seed=seed,
                                       rank=s.rank, drop_last=s.drop_last)
        return s

    def training_step(self, model, inputs, *args, **kwargs):
        grads = self._graph_grads(model) if self.cuda_graphs else None
        fresh = grads is not None and grads.fresh()
        if fresh and not self.bound:
            grads.rebind()  # flat_params: the weights back in the flat parameter, after accelerate's prepare
            self.bound = True
        # wrapped by DDP: the sums over the processes are this Trainer's own (GraphGrads.all_reduce): DDP's
        # hooks bucket the gradients as the backward hands them over, for the all-reduce to overlap it; the
        # whole decoder's backward is one graph that hands them all over at its end, so nothing overlaps,
        # and the hooks' per-weight work (DDP's forward, a copy and a division per weight) was host time
        ddp = grads is not None and isinstance(model, torch.nn.parallel.DistributedDataParallel)
        # a batch with the sequences' bounds (varlen_attention) trains with that attention, backward included
        with varlen_attention.training(self.model, "seq_bounds" in inputs), \
                model.no_sync() if ddp else contextlib.nullcontext():
            loss = super().training_step(model, inputs, *args, **kwargs)
        if fresh:
            grads.take()
        if ddp and self.accelerator.sync_gradients:  # the step's last micro-batch (HF sets it before each)
            grads.all_reduce()
        return loss

    def train(self, *args, **kwargs):
        self.bound = False  # each train() prepares the model anew (a resume too): GraphGrads.rebind once after
        self.fetch_s = []
        return super().train(*args, **kwargs)

    def get_batch_samples(self, *args, **kwargs):
        """HF's fetch of one optimizer step's micro-batches, timed into fetch_s: the loader, the batches' copies
        to the device (accelerate's loader makes them as it yields) and, as a blocking copy waits for the
        device's queue, the wait for the step before (under DDP for its all-reduce: the slower process). A
        step's time less this is the host's own work on it, which tells a host-bound process from a waiting
        one (benchmarks/README.md: what a 2-GPU step costs beyond one micro-batch)."""
        t = time.perf_counter()
        batches = super().get_batch_samples(*args, **kwargs)
        self.fetch_s.append(time.perf_counter() - t)
        return batches

    def _graph_grads(self, model) -> GraphGrads:
        """cuda_graphs' gradient buffers, made at the first micro-batch (the model trainable, on its device)
        or by create_optimizer. HF's zero_grad after each step, on the model it steps (DDP's wrapper or the
        model itself), then drops the trained weights' gradients without a walk over every parameter (an
        instance attribute shadows the method)."""
        if self.graph_grads is None:
            self.graph_grads = GraphGrads(self.model)
        if "zero_grad" not in vars(model):
            model.zero_grad = self.graph_grads.zero_grad
        return self.graph_grads

    def create_optimizer(self, model=None):
        """HF's optimizer; with flat_params, over the flat weights (GraphGrads.flat_weights), one group."""
        if not self.flat_params or self.optimizer is not None:
            return super().create_optimizer(model)
        decayed = set(self.get_decay_parameter_names(self.model))
        if self.args.weight_decay and any(w.requires_grad and n not in decayed for n, w in self.model.named_parameters()):
            raise ValueError("flat_params steps every trained weight with one weight decay, but some (biases, norms) "
                             "take none: set weight_decay: 0 or flat_params: false")
        cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        flats = self._graph_grads(self.model).flat_weights()
        self.optimizer = cls([{"params": flats, "weight_decay": self.args.weight_decay}], **kwargs)
        return self.optimizer

    def _clip_grad_norm(self, model):
        """HF's clip (torch's clip_grad_norm_ over model.parameters()), on cuda_graphs' flat gradient buffers."""
        if self.graph_grads is not None and self.accelerator.scaler is None:
            return self.graph_grads.clip(self.args.max_grad_norm)
        return super()._clip_grad_norm(model)


class AnswerLossTrainer(BalancedTrainer):
    """Trainer whose loss runs the LM head only on answer tokens (evaluate.token_nll).

    Same value as the model's own loss on these labels, without the full-vocabulary logits of every
    prompt token: less memory and time, most of all for large vocabularies (Gemma: 262k).
    """

    head_loss = "chunked"  # SpeedParams.head_loss; make_trainer sets it from the recipe

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        kw = dict(bf16=self.args.bf16, head_loss=self.head_loss)
        if hasattr(model, "module") and not self.cuda_graphs:  # wrapped by DDP: its own forward must run, it arms
            # the gradient all-reduce (cuda_graphs' all-reduce is the Trainer's own: DDP's forward is not needed)
            with forward_replaced(model.module, functools.partial(answer_loss, model.module, **kw)):
                loss = model(**inputs, num_items_in_batch=num_items_in_batch)
        else:
            loss = answer_loss(getattr(model, "module", model), **inputs, num_items_in_batch=num_items_in_batch, **kw)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # as HF does: num_items_in_batch counts every process's tokens and DDP averages the gradients
            loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss

    def floating_point_ops(self, inputs):
        """HF's value (6 x tokens x non-embedding parameters) with the parameters counted once: HF walks
        every module on every step, ~4% of a 7B QLoRA step's host time (py-spy)."""
        if not hasattr(self, "_flop_params"):
            self._flop_params = self.model.num_parameters(exclude_embeddings=True) if hasattr(
                self.model, "num_parameters") else 0
        ids = inputs.get(getattr(self.model, "main_input_name", "input_ids"))
        return 0 if ids is None else 6 * ids.numel() * self._flop_params


@contextlib.contextmanager
def forward_replaced(module, forward):
    """module's forward is `forward` inside the block (an instance attribute shadows the class method)."""
    before = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if before is None:
            del module.forward
        else:
            module.forward = before


def training_args(p, out: Path, n_train: int) -> TrainingArguments:
    bf16 = p.compute_dtype == "bfloat16"
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"), per_device_train_batch_size=p.micro_batch_size,
        gradient_accumulation_steps=per_process_accum(p.grad_accum, world_size()), max_steps=planned_steps(p, n_train),
        learning_rate=p.learning_rate, lr_scheduler_type=p.lr_scheduler, warmup_steps=p.warmup_ratio,
        max_grad_norm=p.max_grad_norm, weight_decay=p.weight_decay, optim=p.optim,
        neftune_noise_alpha=p.neftune_noise_alpha or None,
        # HF saves a checkpoint at the last step whatever save_steps is: a large save_steps still wrote a 21-GB
        # full-FT checkpoint per run and filled a 64-GiB disk with two runs side by side. 0 saves none.
        logging_steps=p.logging_steps, save_strategy="steps" if p.save_steps else "no",
        save_steps=p.save_steps or 1,  # unused without saving, but HF wants it positive
        logging_nan_inf_filter=False,  # a NaN loss is logged as NaN (HF shows the mean so far), so check_finite sees it
        eval_strategy="no", report_to="none", seed=p.seed, data_seed=p.seed, bf16=bf16,
        use_cpu=(device_for(p.device) == "cpu"), remove_unused_columns=False,
        dataloader_num_workers=0, disable_tqdm=False, save_only_model=False,
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient; the search costs a pass
        ddp_broadcast_buffers=False if p.ddp_lean else None,
        train_sampling_strategy=sampling_strategy(p),
        # gradient checkpointing is set up by lib.trainable (peft's kbit preparation)
    )
    if world_size() == 1:
        # One process trains on one GPU. HF otherwise takes every visible GPU for nn.DataParallel and
        # multiplies the micro-batch by their number: on a 2-GPU host a "1-GPU" run trained 16 x 2
        # records a step instead of 8 x 2 (measured on 2 x H200), another recipe without a word.
        _ = args.device  # sets _n_gpu; setting it first would be overwritten
        args._n_gpu = min(args._n_gpu, 1)
    return args


def _restore_cpu_n(obj, location):
    return obj if location.startswith("cpu:") else None


# A data-parallel run on CPU (gloo) has the device "cpu:<rank>", where HF maps a resumed optimizer state
# to; torch.load restores "cpu" but not "cpu:0" ("don't know how to restore data location").
torch.serialization.register_package(11, lambda obj: None, _restore_cpu_n)


def no_cudnn_attention():
    """Training runs attention on the flash / memory-efficient kernels, not cuDNN's.

    Measured on an H100 (torch 2.11, qwen2.5-coder-1.5b, bf16 LoRA, packed micro-batches of 8): the
    gradient turned NaN at the first packed batch 448 tokens wide, and the run never recovered. It is
    pytorch/pytorch#196678: cuDNN's SDPA backward (the default backend on H100/H200 since 2.11) returns
    NaN in grad_q when a mask is passed and the length is 64 mod 128, once a row's logsumexp is below
    ln(FLT_MAX) - which Qwen2.5's "massive activation" heads reach. Forward passes are unaffected, so
    only a process that trains switches (for the rest of it: torch's switch is process-wide).
    """
    torch.backends.cuda.enable_cudnn_sdp(False)


def trainer_class(p) -> type:
    """The Trainer the recipe trains with (also benchmarks/train_speed.py's)."""
    return AnswerLossTrainer if p.answer_loss else BalancedTrainer


def make_trainer(model, tok, feats, eval_records, p, out: Path, collator) -> Trainer:
    no_cudnn_attention()
    trainer = trainer_class(p)(model=model, args=training_args(p, out, len(feats)), train_dataset=feats, data_collator=collator,
                  callbacks=[CurveCallback(tok, eval_records, p, out)])
    return configure(trainer, p)


def configure(trainer, p):
    """The recipe's settings a Trainer cannot take as arguments (also for benchmarks/train_speed.py)."""
    trainer.head_loss = p.head_loss  # used by AnswerLossTrainer only
    trainer.cuda_graphs = p.cuda_graphs
    trainer.flat_params = p.flat_params
    if p.varlen_attention and not (trainer.args.device.type == "cuda" and p.compute_dtype != "float32"):
        warnings.warn("varlen_attention runs the flash kernel on a CUDA GPU in bf16/fp16 only; here it attends "
                      "through a mask over the micro-batch's whole row (the same numbers, slower than packing "
                      "alone): turn it off", stacklevel=2)
    if p.cuda_graphs and trainer.args.device.type != "cuda":
        warnings.warn("cuda_graphs replays CUDA graphs on a GPU only; here torch compiles the whole decoder without "
                      "them (longer to compile than layer by layer, no faster): turn it off", stacklevel=2)
    if p.ddp_lean:
        if trainer.accelerator.ddp_handler is not None:
            # HF's arguments have no gradient_as_bucket_view; accelerate reads the handler when train() wraps
            trainer.accelerator.ddp_handler.gradient_as_bucket_view = True
        # Under DDP, dynamo's DDPOptimizer cuts every compiled graph where a gradient bucket would end, the
        # first bucket of each graph at 1 MB: each compiled decoder layer of qwen2.5-1.5B (~10 MB of LoRA)
        # became two graphs, each with its own launches and autograd node, on a host-bound step. The layers
        # are compiled one by one, so their gradients already arrive layer by layer for the all-reduce to
        # overlap; the cut buys nothing here. Process-wide; a one-process run never meets it
        import torch._dynamo

        torch._dynamo.config.optimize_ddp = False
    if p.ddp_bf16_grads and trainer.accelerator.ddp_handler is not None:
        # accelerate calls this when train() wraps the model in DDP: half the bytes on the wire. Over NVLink
        # (2 x H100) the all-reduce overlaps the backward and the 7B step was no faster (README, "Several GPUs").
        h = trainer.accelerator.ddp_handler
        trainer.accelerator.ddp_handler = _BF16AllReduce(**{f.name: getattr(h, f.name) for f in dataclasses.fields(h)})
    return trainer


class _BF16AllReduce(DistributedDataParallelKwargs):
    """accelerate's DDP settings, whose hook (registered when the model is wrapped) is bf16_all_reduce."""

    def register_comm_hook(self, model):
        model.register_comm_hook(None, bf16_all_reduce)


def bf16_all_reduce(process_group, bucket):
    """DDP communication hook: a gradient bucket averaged in bf16, then copied back into its fp32 buffer.
    torch's bf16_compress_hook does the same but is refused without NCCL (by its name), so gloo could
    not test it; gloo and NCCL both all-reduce bf16."""
    group = process_group if process_group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    half = buffer.to(torch.bfloat16).div_(group.size())
    fut = dist.all_reduce(half, group=group, async_op=True).get_future()

    def back(f):
        buffer.copy_(f.value()[0])
        return buffer

    return fut.then(back)


def curve_callback(trainer) -> CurveCallback:
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, CurveCallback))


def per_process(step_s: list, fetch_s: list) -> list[dict]:
    """Each process's median step and median fetch (BalancedTrainer.fetch_s), in rank order and on every
    process (gathered under DDP): a process whose step is mostly its own host work sets the pace, one that
    spends it fetching waits for its GPU or for the other processes."""
    mine = {"median_s_per_step": round(statistics.median(step_s), 4) if step_s else None,
            "median_fetch_s": round(statistics.median(fetch_s), 4) if fetch_s else None}
    if world_size() == 1 or not dist.is_initialized():
        return [mine]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return parts


def curve_table(log_history) -> pd.DataFrame:
    """Learning curve: eval perplexity rows joined with the nearest training loss by step."""
    ev = pd.DataFrame([r for r in log_history if "eval_ppl" in r])
    # one column order however the rows were read (a resumed run's come back with sorted keys)
    ev = ev[["step", "eval_ppl", "eval_bits_per_char"] + sorted(c for c in ev if c.startswith(("eval_ppl_", "eval_bits_per_char_")))]
    loss = pd.DataFrame([{"step": r["step"], "train_loss": r["loss"]} for r in log_history if "loss" in r])
    if loss.empty:
        return ev.assign(train_loss=float("nan"))
    return ev.merge(loss, on="step", how="left")
