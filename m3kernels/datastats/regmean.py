"""RegMean statistics: the Gram matrix XᵀX of the inputs of every linear layer of a causal LM.

For every ``nn.Linear`` (weight W [out, in], y = x Wᵀ), G = Σ x xᵀ over all real (non-padding)
tokens of the data, prompt and response alike, [in, in], accumulated in float32 or float64.
Layers that read the same input tensor (q/k/v projections, gate/up projections) share one
matrix: a probe forward on the first example finds them (same input tensor object), and only
the first of each group is hooked. A linear layer whose weight is tied to another parameter
(``lm_head`` tied to the embeddings) is left out: its weight is not a matrix of its own.

Memory: all Gram matrices at once by default; with ``max_memory`` (bytes) the groups are split
into passes whose matrices fit, one pass over the data each (N passes cost N forward sweeps and
keep the memory at the model plus one pass's matrices). Forward hooks only: no gradients.
"""

from __future__ import annotations

import torch
from torch import nn

from m3kernels.datastats.data import pad_batch
from m3kernels.datastats.output import write_tensors
from m3kernels.datastats.run import StatsOptions, run_stats, torch_dtype


def linear_groups(model, probe_ids: torch.Tensor) -> list[list[str]]:
    """Module names of the linear layers, grouped by the input tensor they read (probe forward)."""
    params = {id(p): n for n, p in model.named_parameters()}
    linears = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and params.get(id(mod.weight)) == f"{name}.weight":
            linears[name] = mod
    seen, keep, handles = {}, [], []
    order: list[list[str]] = []

    def hook(name):
        def pre(mod, args):
            x = args[0]
            keep.append(x)  # alive until the probe ends: ids stay unique
            if id(x) in seen:
                order[seen[id(x)]].append(name)
            else:
                seen[id(x)] = len(order)
                order.append([name])

        return pre

    for name, mod in linears.items():
        handles.append(mod.register_forward_pre_hook(hook(name)))
    try:
        with torch.no_grad():
            model(input_ids=probe_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        keep.clear()
    called = {n for g in order for n in g}
    order += [[n] for n in linears if n not in called]  # not reached by the probe: own matrix
    return order


class GramAccumulator:
    """Σ XᵀX per input group, in passes that fit ``max_memory``."""

    def __init__(self, model, opts: StatsOptions, pad: int):
        self.model, self.opts, self.pad = model, opts, pad
        self.acc_dtype = torch_dtype(opts.accumulate)
        self.dev = next(model.parameters()).device
        probe = torch.zeros((1, 4), dtype=torch.int64, device=self.dev)
        self.groups = linear_groups(model, probe)
        self.modules = dict(model.named_modules())
        size = {g[0]: self.modules[g[0]].in_features ** 2 * self.acc_dtype.itemsize for g in self.groups}
        self.passes: list[list[list[str]]] = [[]]
        used = 0
        for g in self.groups:
            if self.passes[-1] and opts.max_memory is not None and used + size[g[0]] > opts.max_memory:
                self.passes.append([])
                used = 0
            self.passes[-1].append(g)
            used += size[g[0]]
        self.n_passes = len(self.passes)
        self.grams: dict[str, torch.Tensor] = {}
        self.handles = []
        self.real = None
        self.n_examples = self.n_tokens = 0

    @staticmethod
    def gram_name(group) -> str:
        return f"{group[0]}.weight"

    def begin_pass(self, p: int) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.grams = [], {}
        self.n_examples = self.n_tokens = 0  # every pass sees the same data: counted once
        for g in self.passes[p]:
            n = self.modules[g[0]].in_features
            name = self.gram_name(g)
            self.grams[name] = torch.zeros((n, n), dtype=self.acc_dtype, device=self.dev)
            self.handles.append(self.modules[g[0]].register_forward_pre_hook(self._hook(name)))

    def _hook(self, name):
        def pre(mod, args):
            x = args[0]
            if x.shape[:-1] == self.real.shape:
                x = x[self.real]  # [tokens, in]: padding left out
            else:  # a layer fed another layout: every row counts
                x = x.reshape(-1, x.shape[-1])
            x = x.to(self.acc_dtype)
            self.grams[name].addmm_(x.T, x)

        return pre

    def state_tensors(self) -> dict:
        return self.grams

    def state_info(self) -> dict:
        return {"examples": self.n_examples, "tokens": self.n_tokens}

    def load_state(self, tensors: dict, info: dict) -> None:
        for n in self.grams:
            self.grams[n].copy_(tensors[n])
        self.n_examples, self.n_tokens = info["examples"], info["tokens"]

    def counts(self) -> dict:
        return {"examples": self.n_examples, "tokens": self.n_tokens}

    def manifest_extra(self) -> dict:
        layers = {f"{m}.weight": self.gram_name(g) for g in self.groups for m in g}
        grams = {
            self.gram_name(g): {
                "layers": [f"{m}.weight" for m in g],
                "in_features": self.modules[g[0]].in_features,
            }
            for g in self.groups
        }
        return {
            "layers": layers,
            "grams": grams,
            "convention": "W [out, in], y = x W^T; G = X^T X [in, in], summed over tokens",
        }

    def step(self, batch, first_index: int) -> None:
        ids, _, real = (t.to(self.dev) for t in pad_batch(batch, self.pad))
        self.real = real
        with torch.no_grad():
            self.model(input_ids=ids, use_cache=False)
        self.real = None
        self.n_examples += len(batch)
        self.n_tokens += int(real.sum())

    def end_pass(self, p: int, out_dir, store_dtype) -> list[str]:
        name = f"regmean-{p + 1:05d}.safetensors"
        write_tensors(
            out_dir / name,
            {n: g.to(store_dtype).cpu() for n, g in self.grams.items()},
            {"m3kernels_stats": "regmean"},
        )
        for h in self.handles:
            h.remove()
        self.handles, self.grams = [], {}
        return [name]


def compute_regmean(
    model, data, out, *, resume: bool = False, force: bool = False, progress: bool = True, **options
) -> dict:
    """Gram matrices XᵀX of every linear layer's inputs of the checkpoint folder ``model`` over
    the data file ``data``, written to the folder ``out``; returns the manifest. ``options``: the
    fields of :class:`~m3kernels.datastats.run.StatsOptions` (``max_memory``: bytes of matrices
    held at once, more passes when smaller)."""
    opts = StatsOptions(**options)
    return run_stats(
        "regmean", model, data, out, opts, GramAccumulator, resume=resume, force=force, progress=progress
    )


__all__ = ["compute_regmean", "GramAccumulator", "linear_groups"]
