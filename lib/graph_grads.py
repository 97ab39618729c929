"""The trained weights' gradients under cuda_graphs: one flat buffer per dtype, made once, each weight's
.grad a view of it, so that the step's per-weight work is a few calls on a few tensors.

Why: with the whole decoder replayed as CUDA graphs the step is bound by the host's Python. Profiled on
2 x H100 (qwen2.5-coder-1.5b, LoRA r=64: 392 trained weights of 731, 2,333 modules), the per-step work
outside the micro-batches was ~40 ms of a ~110-ms profiled step: three walks over model.parameters()
(the gradients' copy, HF's clip, HF's zero_grad; ~2 ms of Python each on the CPU here), then a reshape,
a split and a view_as per weight for the copy, and the clip's per-weight norms. On one GPU that work is
spread over the step's micro-batches; on 2 GPUs at the same effective batch each process steps after one,
so it was the main reason 2 GPUs ran at 1.4-1.6x one (benchmarks/README.md, "CUDA graphs of the whole
decoder"). Here the weights are listed once, the gradients copied in one foreach call, clipped on the flat
buffers and dropped by a walk over the trained weights only. Same sums; the norm is summed in another
order (fp32 rounding).
"""
import torch
import torch.distributed as dist


class GraphGrads:
    def __init__(self, model: torch.nn.Module):
        weights = [w for w in model.parameters() if w.requires_grad]
        self.weights, self.views, self.flats, self.groups, self.params = [], [], [], [], []
        for dtype in sorted({w.dtype for w in weights}, key=str):  # the same order on every process
            group = [w for w in weights if w.dtype == dtype]
            flat = torch.zeros(sum(w.numel() for w in group), dtype=dtype, device=group[0].device)
            self.flats.append(flat)
            self.groups.append(group)
            self.weights += group
            self.views += [v.view_as(w) for w, v in zip(group, flat.split([w.numel() for w in group]))]

    def flat_weights(self) -> list[torch.nn.Parameter]:
        """flat_params: the trained weights moved into one flat parameter per dtype, each weight's data a
        view of it, in the gradients' layout; each flat parameter's .grad is its gradient buffer. The
        optimizer then steps one tensor a dtype (torch's AdamW is elementwise: the same update) instead of
        392 (qwen2.5-1.5B's LoRA). HF makes the optimizer before the first forward; the compiled graphs then
        take the weights' memory as it is, and a graph recorded before rebind (step 0's evaluation) is
        recorded again at the next evaluation."""
        self.params = [torch.nn.Parameter(torch.empty_like(grad)) for grad in self.flats]
        for flat, grad in zip(self.params, self.flats):
            flat.grad = grad
        self.rebind()  # the weights' values copied in, each weight then a view
        return self.params

    def rebind(self) -> None:
        """flat_params: weights whose data is not their flat parameter's (all of them, at flat_weights) are
        copied into it and made its views. In a 2-process run the weights had memory of their own again by
        the first micro-batch (accelerate's prepare, after HF makes the optimizer, moves the model with .to(),
        which sets each weight's data), and the optimizer stepped a flat parameter that no weight read
        (tests/test_launch.py caught it): the Trainer calls this at each train()'s first micro-batch too."""
        for group, flat in zip(self.groups, self.params):
            home = flat.untyped_storage().data_ptr()
            if all(w.untyped_storage().data_ptr() == home for w in group):
                continue
            views = flat.detach().split([w.numel() for w in group])
            with torch.no_grad():
                torch._foreach_copy_(list(views), [w.detach().reshape(-1) for w in group])
            for w, v in zip(group, views):
                w.data = v.view_as(w)

    def fresh(self) -> bool:
        """No gradient yet: the step's first micro-batch (each backward gives every trained weight one,
        zero_grad drops them all; the first weight alone tells)."""
        return self.weights[0].grad is None

    def take(self) -> None:
        """The gradients copied into the flat buffers, each .grad then their view. With no .grad yet, autograd
        keeps the compiled backward's output tensors as the gradients, in the CUDA graphs' memory, which the
        next replay writes over (torch raises, or the sums go wrong: tests/test_gpu.py); copied, later
        micro-batches add into the buffers, and the clip, the all-reduce and the optimizer read them there."""
        grads = [w.grad for w in self.weights]
        if missing := sum(g is None for g in grads):
            raise RuntimeError(f"{missing} trained weights got no gradient in this micro-batch: every trained "
                               "weight must take part in the forward under cuda_graphs")
        torch._foreach_copy_(self.views, grads)
        for w, v in zip(self.weights, self.views):
            w.grad = v

    def all_reduce(self) -> None:
        """The mean over the processes, one all-reduce per buffer (DDP's mean: HF scales the loss so that
        it is the sum over every process's tokens)."""
        for flat in self.flats:
            dist.all_reduce(flat)
            flat.div_(dist.get_world_size())

    def clip(self, max_norm: float) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ on the flat buffers (after take): the total norm, the gradients
        scaled by min(1, max_norm / (norm + 1e-6)) in place; returns the norm before clipping."""
        norm = torch.nn.utils.get_total_norm(self.flats)
        if max_norm != float("inf"):
            torch._foreach_mul_(self.flats, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Module.zero_grad over the trained weights only (frozen ones never have a gradient)."""
        if set_to_none:
            for w in self.weights:
                w.grad = None
        else:
            for flat in self.flats:
                flat.zero_()
