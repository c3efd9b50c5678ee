"""The rows of a vocabulary tensor (input embedding, output head) under a merged tokenizer: each
input's tensor laid out on the output vocabulary before the merge, as mergekit 0.1.5's
``PermutedVocabulary`` does (our code).

For every input, in mergekit's order (``models`` as listed, the base appended when it is not
listed), output row i is the input's own row of token i when it has the token (and the token is
not ``force``-d); otherwise a row shared by every input that lacks it:

* a configured token (``tokenizer.tokens``): its source — zeros, a model's row of the token, or
  a model's row of another token / id (``model_token``);
* a token only one input has: that input's row; no input: zeros; the base has it (the base is an
  input of the merge): the base's row; else the float32 mean of the inputs that have it.

Rows past ``len(vocab)`` (``pad_to_multiple_of``) are each input's mean over its first
``len(vocab)`` rows. The merge method then runs on these tensors unchanged, so a row every input
shares comes out as that row (up to the method's rounding), like in mergekit. Only the one tensor
being merged is gathered (one copy per input that is not already in the output's layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from m3kernels.checkpoint.tokenizer import VocabPlan
from m3kernels.errors import CheckpointError, TensorMismatchError

OWN, AVERAGE, ROW, ZERO = "own", "average", "row", "zero"


@dataclass(frozen=True)
class RowRule:
    """Output row ``index``'s shared value: ``kind`` AVERAGE (``donors``: (input, row) pairs),
    ROW (the one donor) or ZERO; ``force``: every input takes it, also those with the token."""

    index: int
    kind: str
    donors: tuple = ()
    force: bool = False


def row_rules(vocab: VocabPlan, order: list, base, paths: list = ()) -> list:
    """The shared rows (RowRule per output token that needs one), for inputs ``order``
    (Checkpoints) with mergekit's ``base`` (None when the merge has no base model); ``paths``:
    (path as the config writes it, Checkpoint) pairs, to find a token's source model."""
    perms = [vocab.of(ck).perm for ck in order]
    k_of = {id(ck): k for k, ck in enumerate(order)}
    base_k = k_of.get(id(base)) if base is not None else None
    rules = []
    for token, i in vocab.vocab.items():
        have = [k for k, p in enumerate(perms) if p[i] >= 0]
        rule = vocab.settings.tokens.get(token)
        if rule is not None:
            if not rule.force and len(have) == len(order):
                continue
            src = rule.source
            where = f"tokenizer.tokens[{token!r}]"
            if src is None:
                lack = [order[k].label for k in range(len(order)) if k not in have]
                raise CheckpointError(
                    f"{where}: {', '.join(lack)} lack(s) the token and no source is given (a model path, "
                    f"model_token or zero); mergekit 0.1.5 fails here too",
                )
            if src.kind == "zero":
                rules.append(RowRule(i, ZERO, (), rule.force))
                continue
            ck = _input(order, src.model, where, paths)
            k = k_of[id(ck)]
            if src.kind == "model":
                j = perms[k][i]
                if j < 0:
                    raise CheckpointError(
                        f"{where}: the source model {src.model} does not have the token {token!r} "
                        f"(not in {ck.path}'s tokenizer)",
                        path=str(ck.path),
                    )
            else:
                if src.token is not None:
                    j = vocab.of(ck).vocab.get(src.token, -1)
                    if j < 0:
                        raise CheckpointError(
                            f"{where}: the source token {src.token!r} is not in the tokenizer of {ck.path}",
                            path=str(ck.path),
                        )
                else:
                    j = src.token_id
            rules.append(RowRule(i, ROW, ((k, j),), rule.force))
            continue
        if len(have) == len(order):
            continue
        if len(have) == 1:
            rules.append(RowRule(i, ROW, ((have[0], perms[have[0]][i]),)))
        elif not have:
            rules.append(RowRule(i, ZERO))
        elif base_k is not None and base_k in have:
            rules.append(RowRule(i, ROW, ((base_k, perms[base_k][i]),)))
        else:
            rules.append(RowRule(i, AVERAGE, tuple((k, perms[k][i]) for k in have)))
    return rules


def _input(order: list, path: str, where: str, paths: list = ()):
    import os

    for written, ck in paths:
        if written is not None and os.path.normpath(written) == os.path.normpath(path) and ck in order:
            return ck
    for ck in order:
        if os.path.normpath(str(ck.path)) == os.path.normpath(path) or os.path.realpath(
            ck.path
        ) == os.path.realpath(path):
            return ck
    raise CheckpointError(f"{where}: {path} is not one of the merged models")


class RowMap:
    """The output layout of one vocabulary tensor: ``sources`` maps each input Checkpoint (by
    id) to its :class:`~m3kernels.checkpoint.plan.Source` of this tensor; ``order`` is mergekit's
    input order; ``rules`` come from :func:`row_rules`."""

    def __init__(self, name: str, vocab: VocabPlan, order: list, sources: dict, rules: list):
        self.name, self.vocab, self.order, self.rules = name, vocab, order, rules
        self.sources = [sources[id(ck)] for ck in order]
        shapes = [tuple(s.meta.shape) for s in self.sources]
        if any(len(sh) != 2 for sh in shapes) or len({sh[1] for sh in shapes}) != 1:
            raise TensorMismatchError(
                f"tensor {name!r}: a vocabulary tensor must be 2-D with the same width in every input; got "
                + "; ".join(s.describe() for s in self.sources),
                tensor=name,
            )
        self.width = shapes[0][1]
        for ck, s in zip(order, self.sources):
            perm = vocab.of(ck).perm
            top = max(perm, default=-1)
            donors = [j for r in rules for k, j in r.donors if self.order[k] is ck]
            top = max([top, *donors])
            if top >= s.meta.shape[0]:
                raise TensorMismatchError(
                    f"tensor {name!r} of {ck.label} has {s.meta.shape[0]} rows but its tokenizer (or a "
                    f"tokenizer.tokens source) needs row {top}",
                    tensor=name,
                    path=str(ck.path),
                )
        self.computed = vocab.rows > vocab.size or any(r.kind == AVERAGE for r in rules)
        dtypes = {s.meta.dtype for s in self.sources}
        self.dtype = torch.float32 if self.computed or len(dtypes) > 1 else dtypes.pop()
        forced = {r.index for r in rules if r.force}
        self.forced = sorted(forced)

    @property
    def shape(self) -> tuple:
        return (self.vocab.rows, self.width)

    def unchanged(self) -> bool:
        """Whether every input is already in the output's layout (nothing to gather)."""
        return not self.rules and all(
            self.vocab.identity(ck, s.meta.shape[0]) for ck, s in zip(self.order, self.sources)
        )

    def _shared(self, tensors: list) -> dict:
        """{output row: its shared value (float32 for means, else the row's dtype)}."""
        out = {}
        for r in self.rules:
            if r.kind == ZERO:
                out[r.index] = torch.zeros(self.width, dtype=self.dtype)
            elif r.kind == ROW:
                k, j = r.donors[0]
                out[r.index] = tensors[k][j]
            else:
                acc = torch.zeros(self.width, dtype=torch.float32)
                for k, j in r.donors:
                    acc = acc + tensors[k][j].to(torch.float32)
                out[r.index] = acc / len(r.donors)
        return out

    def gathered(self) -> list:
        """Every input's tensor in the output layout, in ``order``."""
        tensors = [s.tensor() for s in self.sources]
        shared = self._shared(tensors)
        n, rows = self.vocab.size, self.vocab.rows
        result = []
        for ck, t in zip(self.order, tensors):
            if not self.forced and self.vocab.identity(ck, t.shape[0]):
                result.append(t)  # has every token, in place: its own rows, read as they are
                continue
            perm = torch.tensor(self.vocab.of(ck).perm, dtype=torch.long)
            if self.forced:
                perm[self.forced] = -1
            out = torch.zeros((rows, self.width), dtype=self.dtype)
            have = (perm >= 0).nonzero().reshape(-1)
            out[have] = t.index_select(0, perm[have]).to(self.dtype)
            for i, v in shared.items():
                if perm[i] < 0:
                    out[i] = v.to(self.dtype)
            if rows > n:
                out[n:] = out[:n].mean(dim=0)
            result.append(out)
        return result

    def inputs(self, base_source, model_sources: list):
        """(base, models) for the kernels: the gathered tensors of the planned tensor's inputs."""
        g = self.gathered()
        by_ck = {id(ck): t for ck, t in zip(self.order, g)}
        b = by_ck[id(base_source.ckpt)] if base_source is not None else None
        return b, [by_ck[id(s.ckpt)] for s in model_sources]


def input_order(cfg, base, models: list) -> list:
    """mergekit's order of a tensor's inputs: the config's model entries as listed (the base at its
    place when it is listed), then the base when it is not."""
    import os

    def same(a, b) -> bool:
        return os.path.normpath(str(a)) == os.path.normpath(str(b))

    raw = cfg.raw
    entries = raw.get("models")
    if entries is None and isinstance(raw.get("slices"), list) and raw["slices"]:
        entries = (raw["slices"][0] or {}).get("sources")
    order, used = [], set()
    paths = [(cfg.base_model, base)] if base is not None else []
    paths += list(zip(cfg.models, models))
    for e in entries if isinstance(entries, list) else []:
        p = e.get("model") if isinstance(e, dict) else None
        for path, ck in paths:
            if p is not None and id(ck) not in used and same(p, path):
                order.append(ck)
                used.add(id(ck))
                break
    for ck in list(models) + ([base] if base is not None else []):
        if id(ck) not in used:
            order.append(ck)
            used.add(id(ck))
    return order


def plan_rows(name: str, vocab: VocabPlan, cfg, base, models: list, found: list) -> RowMap | None:
    """The RowMap of vocabulary tensor ``name`` (``found``: its Source in every input), or None
    when every input already has the output's layout (a plain merge)."""
    order = input_order(cfg, base, models)
    cache = vocab.__dict__.setdefault("_rules", {})
    key = tuple(id(ck) for ck in order)
    if key not in cache:
        paths = ([(cfg.base_model, base)] if base is not None else []) + list(zip(cfg.models, models))
        cache[key] = row_rules(vocab, order, base, paths)
    rm = RowMap(name, vocab, order, {id(s.ckpt): s for s in found}, cache[key])
    return None if rm.unchanged() else rm


__all__ = ["RowMap", "RowRule", "row_rules", "input_order", "plan_rows", "OWN", "AVERAGE", "ROW", "ZERO"]
