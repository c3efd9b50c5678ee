"""Diagonal Fisher information of every parameter of a causal LM, from per-example gradients.

F = (1/N) Σₙ gₙ², gₙ = ∇θ log p(yₙ | xₙ) the gradient of example n's log-likelihood: the sum over
its target tokens (the response, for prompt/response data) of log p(y_t | x_<t), teacher-forced on
the data's tokens. ``sampled=False`` (default, the *empirical* Fisher): y_t is the data's token.
``sampled=True`` (the Fisher of the Fisher-merging paper): y_t is drawn from the model's own
p(· | x_<t) at every target position (one draw per position; a generator seeded by the run's
seed and the example's index, so a resumed run draws the same labels).

How the per-example gradients are obtained: ``per_example="vmap"`` (default) runs
``torch.func.vmap(torch.func.grad(loss))`` over the ``batch_size`` examples of a batch (each
example is its own unbatched forward and backward; right padding beyond an example's tokens is
never seen by its real tokens under causal attention and carries no target, so the result is that
of the example alone); memory: the model plus ``batch_size`` gradients plus the accumulator.
``per_example="loop"``: one forward + backward per example (model + one gradient + accumulator).
Both give the same numbers; vmap is faster for small models. With ``max_memory`` (bytes of
accumulators + per-example gradients held at once) the parameters are split into passes, one
forward and backward sweep over the data each, gradients taken for that pass's parameters only:
memory = the model + one pass's statistics (as little as one tensor's).

What a batch approximation would change: squaring the gradient of a batch's loss instead of each
example's. With the batch's summed loss, (Σₙ gₙ)² = Σₙ gₙ² + Σₙ≠ₘ gₙgₘ; per element its expectation
is B·F + B(B − 1)·μ² (μ the mean gradient), so (Σ gₙ)²/B estimates F + (B − 1)μ², too large where the
examples' gradients agree, and the cross terms add noise of the order of F instead of averaging it
out. With the batch's mean loss (what training loops use), averaging (Σ gₙ / B)² over the batches
estimates F/B + (1 − 1/B)μ²: about B times too small near an optimum (μ ≈ 0).
Either way the result depends on the batch size and on which examples share a batch; per-example
gradients do not. We never do it.
"""

from __future__ import annotations

import warnings

import torch

from m3kernels.datastats.data import pad_batch
from m3kernels.datastats.output import write_tensors
from m3kernels.datastats.run import StatsOptions, run_stats, torch_dtype

SHARD_BYTES = 4 << 30


def example_log_likelihood(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ_t targets[t]·log p(labels[t] | < t) for one example (logits [L, V]: row t predicts t+1)."""
    lp = torch.log_softmax(logits[:-1].float(), dim=-1)
    picked = lp.gather(-1, labels[1:, None])[:, 0]
    return (picked * targets[1:].to(picked.dtype)).sum()


class FisherAccumulator:
    """Σ gₙ² per parameter (in the ``accumulate`` dtype), with example and token counts."""

    def __init__(self, model, opts: StatsOptions, pad: int):
        self.model, self.opts, self.pad = model, opts, pad
        self.all_params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.acc_dtype = torch_dtype(opts.accumulate)
        self.n_examples = self.n_tokens = self.n_targets = 0
        self.sums: dict[str, torch.Tensor] = {}
        self.params: dict = {}
        # bytes a parameter costs while its pass runs: its accumulator and its gradients
        grads = opts.batch_size if opts.per_example == "vmap" else 1
        self.passes: list[list[str]] = [[]]
        used = 0
        for n, q in self.all_params.items():
            cost = q.numel() * (self.acc_dtype.itemsize + grads * max(q.element_size(), 4))
            if self.passes[-1] and opts.max_memory is not None and used + cost > opts.max_memory:
                self.passes.append([])
                used = 0
            self.passes[-1].append(n)
            used += cost
        self.n_passes = len(self.passes)

    # -- state
    def begin_pass(self, p: int) -> None:
        names = set(self.passes[p])
        self.params = {n: q for n, q in self.all_params.items() if n in names}
        for n, q in self.all_params.items():
            q.requires_grad_(n in names)
        self.sums = {
            n: torch.zeros(q.shape, dtype=self.acc_dtype, device=q.device) for n, q in self.params.items()
        }
        self.n_examples = self.n_tokens = self.n_targets = 0  # every pass sees the same data

    def state_tensors(self) -> dict:
        return self.sums

    def state_info(self) -> dict:
        return {"examples": self.n_examples, "tokens": self.n_tokens, "targets": self.n_targets}

    def load_state(self, tensors: dict, info: dict) -> None:
        for n in self.sums:
            self.sums[n].copy_(tensors[n])
        self.n_examples, self.n_tokens, self.n_targets = info["examples"], info["tokens"], info["targets"]

    def counts(self) -> dict:
        return {"examples": self.n_examples, "tokens": self.n_tokens, "target_tokens": self.n_targets}

    def manifest_extra(self) -> dict:
        return {
            "tensors": {n: n for n in self.all_params},
            "fisher": "sampled" if self.opts.sampled else "empirical",
        }

    # -- work
    def labels(self, ids, targets, first_index: int):
        """The labels of each position: the data's tokens, or draws from the model (sampled)."""
        if not self.opts.sampled:
            return ids
        with torch.no_grad():
            logits = self.model(input_ids=ids, use_cache=False).logits.float()
        labels = ids.clone()
        for b in range(ids.shape[0]):
            g = torch.Generator(device="cpu").manual_seed(
                (self.opts.seed * 1_000_003 + first_index + b) % 2**63
            )
            pos = targets[b].nonzero()[:, 0]
            if len(pos):
                probs = torch.softmax(logits[b, pos - 1], dim=-1).cpu()
                labels[b, pos] = torch.multinomial(probs, 1, generator=g)[:, 0].to(ids.device)
        return labels

    def step(self, batch, first_index: int) -> None:
        dev = next(iter(self.params.values())).device
        ids, targets, real = (t.to(dev) for t in pad_batch(batch, self.pad))
        labels = self.labels(ids, targets, first_index)
        if self.opts.per_example == "vmap":
            self._step_vmap(ids, labels, targets)
        else:
            self._step_loop(ids, labels, targets, real)
        self.n_examples += len(batch)
        self.n_tokens += int(real.sum())
        self.n_targets += int(targets.sum())

    def _step_vmap(self, ids, labels, targets) -> None:
        from torch.func import functional_call, grad, vmap

        model = self.model
        frozen = {n: p.detach() for n, p in self.params.items()}
        rest = {n: p.detach() for n, p in self.all_params.items() if n not in self.params}
        rest.update(dict(model.named_buffers()))

        def ll(params, x, y, w):
            out = functional_call(model, (params, rest), (x[None],), {"use_cache": False})
            return example_log_likelihood(out.logits[0], y, w)

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            grads = vmap(grad(ll), in_dims=(None, 0, 0, 0))(frozen, ids, labels, targets)
        for n, g in grads.items():
            self.sums[n] += g.to(self.acc_dtype).square().sum(0)

    def _step_loop(self, ids, labels, targets, real) -> None:
        for b in range(ids.shape[0]):
            n_real = int(real[b].sum())
            self.model.zero_grad(set_to_none=True)
            out = self.model(input_ids=ids[b : b + 1, :n_real], use_cache=False)
            example_log_likelihood(out.logits[0], labels[b, :n_real], targets[b, :n_real]).backward()
            for n, p in self.params.items():
                if p.grad is not None:
                    self.sums[n] += p.grad.to(self.acc_dtype).square()
        self.model.zero_grad(set_to_none=True)

    def end_pass(self, p: int, out_dir, store_dtype) -> list[str]:
        """F = Σ g² / N of this pass's parameters, in files of at most SHARD_BYTES (parameter
        order): ``fisher-<pass>.safetensors``, or ``fisher-<pass>-<part>.safetensors``."""
        shards, size = [{}], 0
        for n, s in self.sums.items():
            t = (s / max(self.n_examples, 1)).to(store_dtype).cpu()
            if shards[-1] and size + t.nbytes > SHARD_BYTES:
                shards.append({})
                size = 0
            shards[-1][n] = t
            size += t.nbytes
        files = []
        for k, shard in enumerate(shards):
            name = f"fisher-{p + 1:05d}" + (f"-{k + 1:03d}" if len(shards) > 1 else "") + ".safetensors"
            write_tensors(out_dir / name, shard, {"m3kernels_stats": "fisher"})
            files.append(name)
        self.sums = {}
        if p + 1 == self.n_passes:
            for q in self.all_params.values():
                q.requires_grad_(True)
        return files


def compute_fisher(
    model, data, out, *, resume: bool = False, force: bool = False, progress: bool = True, **options
) -> dict:
    """Diagonal Fisher of the checkpoint folder ``model`` over the data file ``data``, written to
    the folder ``out`` (safetensors named after the parameters + ``manifest.json``); returns the
    manifest. ``options``: the fields of :class:`~m3kernels.datastats.run.StatsOptions`
    (``device``, ``max_examples``, ``max_length``, ``batch_size``, ``seed``, ``dtype``,
    ``sampled``, ``per_example``, ``accumulate``, ``model_dtype``, ``fmt``, ``tokenizer``, ...)."""
    opts = StatsOptions(**options)
    return run_stats(
        "fisher", model, data, out, opts, FisherAccumulator, resume=resume, force=force, progress=progress
    )


__all__ = ["compute_fisher", "FisherAccumulator", "example_log_likelihood"]
