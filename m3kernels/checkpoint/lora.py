"""PEFT LoRA adapters as merge inputs: ``model: path/to/base+path/to/adapter``.

mergekit 0.1.5 reads such a reference as a base model and a PEFT adapter folder
(``adapter_config.json`` + ``adapter_model.safetensors``, or older PEFT's ``adapter_model.bin``,
read here only with ``allow_bin``); it loads both with transformers and
PEFT, calls ``merge_and_unload`` and saves a merged copy of the whole model before merging.
Here the adapter is applied tensor by tensor while the merge streams, with the same arithmetic
as that PEFT merge, and no merged copy is written anywhere:

* for a module ``M`` with ``M.lora_A.weight`` (r × in) and ``M.lora_B.weight`` (out × r), the
  tensor ``M.weight`` becomes ``W + s · (B @ A)`` (transposed for GPT-2's ``Conv1D`` modules);
  for an embedding with ``M.lora_embedding_A`` (r × vocab) and ``M.lora_embedding_B``
  (dim × r) it is ``W + s · (B @ A)ᵀ``. ``A`` and ``B`` are taken in float32 (PEFT upcasts
  (b)float16 adapter weights when it loads them), the product and the scaling are float32, and
  the sum is computed in float32 and rounded once to ``W``'s dtype (PEFT's in-place
  ``weight += delta`` on a (b)float16 weight); for an embedding PEFT first rounds the delta to
  ``W``'s dtype, then adds (two roundings), and so does this;
* ``s`` is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), with ``r`` and
  ``lora_alpha`` taken from ``rank_pattern`` / ``alpha_pattern`` when a pattern matches the
  module name as PEFT matches it (``(.*\\.)?PATTERN$``);
* ``lora_bias``: ``M.lora_B.bias`` adds ``s · bias_B`` to ``M.bias``;
* other tensors in the adapter file (``modules_to_save``, the biases of ``bias: all`` /
  ``lora_only``, ``M.base_layer.weight`` of targeted embeddings) replace the base model's
  tensor of that name, rounded to its dtype as PEFT loads them;
* every other tensor passes through unchanged.

Anything PEFT would do differently, or that is not a plain LoRA (DoRA, other PEFT types, LoRA
variants, initialisations that rewrite the base weights), is refused when the adapter is
opened, as are adapters whose tensors do not fit the base model: one
:class:`~m3kernels.errors.CheckpointError` naming the file and the tensor, before anything is
written. :class:`LoraCheckpoint` offers the interface of
:class:`~m3kernels.checkpoint.source.Checkpoint`, so the plan and the merge see one model.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from m3kernels.checkpoint.safetensors_io import (
    MAX_JSON_BYTES,
    SafetensorsFile,
    load_json,
    model_roots,
    open_input,
    read_input_bytes,
    short,
)
from m3kernels.checkpoint.source import Checkpoint, TensorMeta, bin_load_message
from m3kernels.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
KEY_PREFIX = "base_model.model."  # PEFT's prefix of every saved key of a PeftModel

# adapter_config.json keys that do not change what merge_and_unload computes (with their
# defaults, or whatever value); every other key must be absent, null, false or empty
NEUTRAL_KEYS = frozenset(
    {
        "alpha_pattern",
        "auto_mapping",
        "base_model_name_or_path",
        "bias",
        "exclude_modules",
        "fan_in_fan_out",
        "inference_mode",
        "init_lora_weights",
        "layers_pattern",
        "layers_to_transform",
        "lora_alpha",
        "lora_bias",
        "lora_dropout",
        "modules_to_save",
        "peft_type",
        "peft_version",
        "r",
        "rank_pattern",
        "revision",
        "target_modules",
        "task_type",
        "use_rslora",
        "megatron_core",  # a module name, only used with megatron_config
        "qalora_group_size",  # only used with use_qalora
        "ensure_weight_tying",
        # initialisations that only set the adapter's starting values (the saved A and B are used)
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
    }
)
# init_lora_weights values under which PEFT only draws the adapter's starting values; the others
# (pissa, olora, corda, loftq, eva, orthogonal, ...) also rewrite the base weights when loaded
PLAIN_INITS = (True, False, "gaussian")
# model types whose linear layers are transformers' Conv1D (weight stored in × out)
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})
CONV1D_MODULES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})
LORA_LINEAR = ("lora_A.weight", "lora_B.weight")
LORA_EMBEDDING = ("lora_embedding_A", "lora_embedding_B")
LORA_BIAS = "lora_B.bias"


def split_reference(value: str) -> tuple[str, str | None]:
    """mergekit's model reference ``MODEL(+LORA)?`` -> (model, adapter or None); more than one
    ``+`` or an empty side is a ValueError."""
    parts = value.split("+")
    if len(parts) == 1:
        return value, None
    if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
        raise ValueError(
            f"{value!r} is not MODEL or MODEL+ADAPTER (one '+' between a model folder and a PEFT "
            f"LoRA adapter folder)"
        )
    return parts[0], parts[1]


def pattern_key(patterns, module: str) -> str | None:
    """The first of ``patterns`` (rank_pattern / alpha_pattern keys) that PEFT matches to
    ``module`` (``re.match(r"(.*\\.)?(KEY)$", module)``), None if none does."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _targeted(spec, module: str, role: str) -> bool:
    """Whether PEFT's ``target_modules`` / ``exclude_modules`` value ``spec`` names ``module``:
    a string is a full regular-expression match (``all-linear``: every linear layer but the
    output head), a list matches a name or a dot-separated suffix."""
    if spec is None:
        return False
    if isinstance(spec, str):
        if spec == "all-linear":
            return role == "linear" and module.split(".")[-1] not in ("lm_head", "embed_out")
        return re.fullmatch(spec, module) is not None
    return any(module == t or module.endswith("." + t) for t in spec)


def _layer_of(module: str, pattern) -> int | None:
    """The layer index PEFT reads for ``layers_to_transform``: the number after a
    ``layers_pattern`` name part (default: any of layers, h, blocks, layer, block)."""
    names = (
        [pattern]
        if isinstance(pattern, str)
        else list(pattern or ("layers", "h", "blocks", "layer", "block"))
    )
    parts = module.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in names and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


@dataclass(frozen=True)
class _BinInfo:
    dtype: torch.dtype
    shape: tuple
    st_dtype: str


@dataclass(frozen=True)
class _BinHeader:
    file_size: int
    sha256: None = None


class _BinWeights:
    """``adapter_model.bin`` (older PEFT), loaded with ``torch.load(weights_only=True)`` (only with
    ``allow_bin``), with the parts of :class:`SafetensorsFile` the adapter uses."""

    def __init__(self, path: Path, roots):
        self.path = Path(path)
        self.input_file = open_input(self.path, roots=roots, what="adapter weights (.bin)")
        try:
            try:
                sd = torch.load(self.input_file.real, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                sd = torch.load(self.input_file.real, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling errors come in many types
            self.input_file.close()
            raise CheckpointError(bin_load_message(self.path, exc), path=str(self.path)) from None
        if not isinstance(sd, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()
        ):
            self.input_file.close()
            raise CheckpointError(f"{self.path}: not a state dict of named tensors", path=str(self.path))
        self._sd = sd
        self.tensors = {
            k: _BinInfo(v.dtype, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in sd.items()
        }
        self.header = _BinHeader(self.input_file.size)

    def tensor(self, name: str) -> torch.Tensor:
        self.input_file.check(name)
        return self._sd[name]

    def close(self) -> None:
        self._sd = {}
        self.input_file.close()


@dataclass(frozen=True)
class LoraDelta:
    """One adapted tensor: ``target`` += scaling · B @ A (``transpose``: of the product)."""

    target: str  # the base model's tensor name (M.weight)
    a: str  # adapter keys
    b: str
    scaling: float
    transpose: bool
    rank: int
    embedding: bool  # an embedding's LoRA (lora_embedding_A/B)


class LoraAdapter:
    """A PEFT LoRA adapter folder, checked against the base model it is applied to.

    ``deltas`` {base tensor: LoraDelta}, ``bias_deltas`` {base bias: (adapter key, scaling)},
    ``replaced`` {base tensor: adapter key}."""

    def __init__(
        self,
        path,
        base: Checkpoint,
        *,
        role: str = "model",
        follow_symlinks: bool = False,
        allow_bin: bool = False,
    ):
        self.path = Path(path)
        self.role = role
        self.deltas: dict[str, LoraDelta] = {}
        self.bias_deltas: dict[str, tuple[str, float]] = {}
        self.replaced: dict[str, str] = {}
        self.file: SafetensorsFile | _BinWeights | None = None
        self.allow_bin = allow_bin
        self._config_sha = ""
        if not os.path.lexists(self.path):
            raise CheckpointError(f"{role}: LoRA adapter {self.path} does not exist", path=str(self.path))
        if not self.path.is_dir():
            raise CheckpointError(
                f"{role}: LoRA adapter {self.path} is not a folder (expected a PEFT adapter folder with "
                f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})",
                path=str(self.path),
            )
        self._roots = None if follow_symlinks else model_roots(self.path)
        try:
            self.config = self._read_config()
            self._open_weights()
            self._build(base)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ reading
    def _need(self, name: str) -> Path:
        p = self.path / name
        if not os.path.lexists(p):
            raise CheckpointError(f"{self.role}: {p} is missing (a PEFT adapter needs {name})", path=str(p))
        return p

    def _read_config(self) -> dict:
        p = self._need(ADAPTER_CONFIG)
        f = open_input(p, roots=self._roots, what=ADAPTER_CONFIG, lease=False)
        try:
            raw = read_input_bytes(f, MAX_JSON_BYTES, ADAPTER_CONFIG)
        finally:
            f.close()
        self._config_sha = hashlib.sha256(raw).hexdigest()
        cfg = load_json(raw, p, ADAPTER_CONFIG)
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{p}: {ADAPTER_CONFIG} is not a JSON object", path=str(p))
        self._check_config(cfg, p)
        return cfg

    def _check_config(self, cfg: dict, p: Path) -> None:
        kind = cfg.get("peft_type")
        if kind != "LORA":
            raise CheckpointError(
                f"{p}: peft_type {short(kind)} is not supported; only LoRA adapters (peft_type LORA) "
                f"can be applied",
                path=str(p),
            )
        if cfg.get("use_dora"):
            raise CheckpointError(
                f"{p}: use_dora: DoRA adapters are not supported (only plain LoRA: W + s·B·A)", path=str(p)
            )
        for key, value in cfg.items():
            if key in NEUTRAL_KEYS or key == "use_dora":
                continue
            if value not in (None, False, "", [], {}):
                raise CheckpointError(
                    f"{p}: {key} = {short(value)} is not supported (a LoRA variant or option that "
                    f"changes how PEFT merges the adapter); only plain LoRA adapters can be applied",
                    path=str(p),
                )
        init = cfg.get("init_lora_weights", True)
        if not any(init is v or (isinstance(v, str) and init == v) for v in PLAIN_INITS):
            raise CheckpointError(
                f"{p}: init_lora_weights = {short(init)}: PEFT rewrites the base weights with this "
                f"initialisation when it loads the adapter; convert it to a plain LoRA first",
                path=str(p),
            )
        for key in ("r", "lora_alpha"):
            v = cfg.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise CheckpointError(f"{p}: {key} = {short(v)}; expected a positive number", path=str(p))
        for key in ("rank_pattern", "alpha_pattern"):
            pat = cfg.get(key) or {}
            if not isinstance(pat, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in pat.values()
            ):
                raise CheckpointError(
                    f"{p}: {key} = {short(pat)}; expected {{module pattern: positive number}}", path=str(p)
                )
            for k in pat:
                try:
                    re.compile(k)
                except re.error as exc:
                    raise CheckpointError(f"{p}: {key} key {short(k)}: {exc}", path=str(p)) from None
        tm = cfg.get("target_modules")
        if tm is not None and not isinstance(tm, (str, list)):
            raise CheckpointError(
                f"{p}: target_modules = {short(tm)}; expected a list or a string", path=str(p)
            )

    def _open_weights(self) -> None:
        p = self.path / ADAPTER_WEIGHTS
        if not os.path.lexists(p):
            binary = self.path / ADAPTER_BIN
            if os.path.lexists(binary) and self.allow_bin:
                self.file = _BinWeights(binary, self._roots)
                return
            other = (
                f" (only {ADAPTER_BIN} is there: pickled files can run code when loaded, so they need "
                f"--allow-bin, allow_bin=True)"
                if os.path.lexists(binary)
                else ""
            )
            raise CheckpointError(
                f"{self.role}: {p} is missing (a PEFT adapter needs {ADAPTER_WEIGHTS}){other}", path=str(p)
            )
        f = open_input(p, roots=self._roots, what="adapter weights")
        try:
            self.file = SafetensorsFile(p, file=f)
        except BaseException:
            f.close()
            raise

    # ------------------------------------------------------------------ the plan
    def _scaling(self, module: str) -> tuple[int, float]:
        cfg = self.config
        rk = pattern_key((cfg.get("rank_pattern") or {}).keys(), module)
        ak = pattern_key((cfg.get("alpha_pattern") or {}).keys(), module)
        r = (cfg.get("rank_pattern") or {})[rk] if rk is not None else cfg["r"]
        alpha = (cfg.get("alpha_pattern") or {})[ak] if ak is not None else cfg["lora_alpha"]
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        return r, scale

    def _bad(self, msg: str, key: str) -> CheckpointError:
        return CheckpointError(
            f"{self.file.path}: tensor {key!r}: {msg}", path=str(self.file.path), tensor=key
        )

    def _build(self, base: Checkpoint) -> None:
        tensors = self.file.tensors
        if not tensors:
            raise CheckpointError(f"{self.file.path}: the adapter holds no tensors", path=str(self.file.path))
        conv1d = isinstance(base.config, dict) and base.config.get("model_type") in CONV1D_MODEL_TYPES
        lora: dict[str, dict] = {}  # module -> {part: key}
        for key, info in tensors.items():
            if not key.startswith(KEY_PREFIX):
                raise self._bad(
                    f"does not start with {KEY_PREFIX!r}, the prefix PEFT saves every adapter key with", key
                )
            if not info.dtype.is_floating_point:
                raise self._bad(f"dtype {info.st_dtype} is not a float type", key)
            rest = key[len(KEY_PREFIX) :]
            part = next(
                (s for s in LORA_LINEAR + LORA_EMBEDDING + (LORA_BIAS,) if rest.endswith("." + s)), None
            )
            if part is not None:
                lora.setdefault(rest[: -len(part) - 1], {})[part] = key
                continue
            parts = rest.split(".")
            if any(x.startswith("lora_") for x in parts):
                what = "DoRA's magnitude vector" if "lora_magnitude_vector" in parts else "an adapter tensor"
                raise self._bad(f"{what} that plain LoRA does not have; not supported", key)
            target = rest.replace(".base_layer.", ".")
            self._check_target(base, key, target, info.shape)
            if target in self.replaced:
                raise self._bad(f"replaces {target!r}, which another adapter tensor replaces too", key)
            self.replaced[target] = key
        for module, got in lora.items():
            self._add_module(base, module, got, conv1d)

    def _check_target(self, base: Checkpoint, key: str, target: str, shape) -> TensorMeta:
        if target not in base:
            raise self._bad(f"names {target!r}, which {base.label} does not have", key)
        meta = base.meta(target)
        if tuple(shape) != tuple(meta.shape):
            raise self._bad(
                f"shape {list(shape)} does not match {target!r} {list(meta.shape)} of {base.label}", key
            )
        if not meta.dtype.is_floating_point:
            raise self._bad(f"{target!r} of {base.label} is not a float tensor", key)
        return meta

    def _add_module(self, base: Checkpoint, module: str, got: dict, conv1d: bool) -> None:
        cfg = self.config
        emb = LORA_EMBEDDING[0] in got or LORA_EMBEDDING[1] in got
        pair = LORA_EMBEDDING if emb else LORA_LINEAR
        if emb and any(p in got for p in LORA_LINEAR + (LORA_BIAS,)):
            raise self._bad("a module with both embedding and linear LoRA tensors", got[next(iter(got))])
        for part in pair:
            if part not in got:
                other = (
                    got[next(p for p in pair if p in got)] if any(p in got for p in pair) else got[LORA_BIAS]
                )
                raise self._bad(f"its pair {module}.{part} is missing", other)
        ka, kb = got[pair[0]], got[pair[1]]
        sa, sb = self.file.tensors[ka].shape, self.file.tensors[kb].shape
        if len(sa) != 2 or len(sb) != 2 or sa[0] != sb[1]:
            raise self._bad(f"shape {list(sa)} does not pair with {kb!r} {list(sb)} (r × in and out × r)", ka)
        role = "embedding" if emb else "linear"
        if not (
            _targeted(cfg.get("target_modules"), module, role)
            and not _targeted(cfg.get("exclude_modules"), module, role)
        ):
            raise self._bad(
                f"module {module!r} is not in target_modules {short(cfg.get('target_modules'))} (or is "
                f"excluded): PEFT would not load this tensor",
                ka,
            )
        layers = cfg.get("layers_to_transform")
        if layers is not None:
            wanted = {layers} if isinstance(layers, int) else set(layers)
            idx = _layer_of(module, cfg.get("layers_pattern"))
            if idx is None or idx not in wanted:
                raise self._bad(
                    f"module {module!r} is not in a layer of layers_to_transform {short(layers)}: PEFT "
                    f"would not load this tensor",
                    ka,
                )
        r, scale = self._scaling(module)
        if sa[0] != r:
            raise self._bad(f"rank {sa[0]}, but adapter_config.json gives {module!r} rank {r}", ka)
        target = module + ".weight"
        transpose = emb or (conv1d and module.split(".")[-1] in CONV1D_MODULES)
        delta_shape = (sa[1], sb[0]) if transpose else (sb[0], sa[1])
        if target not in base:
            raise self._bad(f"names {target!r}, which {base.label} does not have", ka)
        meta = base.meta(target)
        if tuple(meta.shape) != tuple(delta_shape):
            b_axis = 1 if transpose else 0  # where B's rows land in W
            wrong = kb if len(meta.shape) != 2 or meta.shape[b_axis] != sb[0] else ka
            raise self._bad(
                f"shape {list(self.file.tensors[wrong].shape)} does not fit {target!r} "
                f"{list(meta.shape)} of {base.label} (B @ A{'ᵀ' if transpose else ''} would be "
                f"{list(delta_shape)})",
                wrong,
            )
        if not meta.dtype.is_floating_point:
            raise self._bad(f"{target!r} of {base.label} is not a float tensor", ka)
        self.deltas[target] = LoraDelta(target, ka, kb, scale, transpose, r, emb)
        if LORA_BIAS in got:
            kbias = got[LORA_BIAS]
            bias = module + ".bias"
            self._check_target(base, kbias, bias, self.file.tensors[kbias].shape)
            self.bias_deltas[bias] = (kbias, scale)

    # ------------------------------------------------------------------ values
    def _f32(self, key: str) -> torch.Tensor:
        return self.file.tensor(key).to(torch.float32)

    def delta(self, target: str) -> torch.Tensor:
        """s · B @ A (float32, transposed where PEFT transposes it: a view) for base tensor
        ``target``; a buffer of its own, which :meth:`apply` adds into."""
        d = self.deltas[target]
        prod = self._f32(d.b) @ self._f32(d.a)
        prod.mul_(d.scaling)  # the same float32 product PEFT's (B @ A) * scaling rounds
        return prod.T if d.transpose else prod

    def apply(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """Base tensor ``name`` (value ``w``) with the adapter applied, in ``w``'s dtype, contiguous.

        The operations (and so the roundings) are PEFT's: the float32 delta plus W in float32,
        rounded once to W's dtype; for an embedding the delta rounded to W's dtype first and the
        sum of the two rounded once (torch adds (b)float16 in float32). The sums run in place in
        the delta's buffer: one float32 copy of the tensor at a time."""
        if name in self.replaced:
            w = self.file.tensor(self.replaced[name]).to(w.dtype)
        if name in self.deltas:
            delta = self.delta(name)
            if self.deltas[name].embedding:  # PEFT's Embedding.merge rounds the delta to W's dtype first
                return torch.add(w, delta.to(w.dtype)).contiguous()
            delta.add_(w)  # float32 += W: the same sum as W + delta (addition commutes exactly)
            return delta.to(w.dtype).contiguous()
        if name in self.bias_deltas:
            key, scale = self.bias_deltas[name]
            return (w.to(torch.float32) + self._f32(key) * scale).to(w.dtype)
        return w

    def touches(self, name: str) -> bool:
        return name in self.deltas or name in self.replaced or name in self.bias_deltas

    def describe(self) -> dict:
        """What the merge record holds about the adapter."""
        return {
            "path": str(self.path.resolve()),
            "config_sha256": self._config_sha,
            "files": [{"name": self.file.path.name, "bytes": self.file.header.file_size}],
            "adapted": len(self.deltas) + len(self.bias_deltas),
            "replaced": len(self.replaced),
        }

    def stamps(self) -> list:
        f = self.file
        return [
            (ADAPTER_CONFIG, None, None, self._config_sha),
            (f.path.name, f.input_file.size, f.input_file.mtime_ns, f.header.sha256),
        ]

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def reference(ck) -> str:
    """How a plan names an input: its path, ``BASE+ADAPTER (LoRA: ...)`` for a LoRA input."""
    adapter = getattr(ck, "adapter", None)
    if adapter is None:
        return str(ck.path)
    return (
        f"{ck.path}+{adapter.path} (LoRA: {len(adapter.deltas) + len(adapter.bias_deltas)} tensors "
        f"adapted, {len(adapter.replaced)} replaced)"
    )


class LoraCheckpoint:
    """A base checkpoint seen through a LoRA adapter: the tensors of the base, those the
    adapter touches computed when asked for (kept until released). Everything else is the
    base :class:`Checkpoint`'s."""

    def __init__(self, base: Checkpoint, adapter: LoraAdapter):
        self.base = base
        self.adapter = adapter
        self._cache: dict[str, torch.Tensor] = {}

    @classmethod
    def open(cls, base_path, adapter_path, *, role: str, allow_bin: bool, follow_symlinks: bool):
        base = Checkpoint(base_path, role=role, allow_bin=allow_bin, follow_symlinks=follow_symlinks)
        try:
            adapter = LoraAdapter(
                adapter_path, base, role=role, follow_symlinks=follow_symlinks, allow_bin=allow_bin
            )
        except BaseException:
            base.close()
            raise
        return cls(base, adapter)

    def __getattr__(self, name):  # config, side_files, root, open_file, read_json, names, ...
        if name in ("base", "adapter", "_cache"):
            raise AttributeError(name)
        return getattr(self.base, name)

    @property
    def path(self) -> Path:
        return self.base.path

    @property
    def role(self) -> str:
        return self.base.role

    @property
    def label(self) -> str:
        return f"{self.base.role} ({self.base.path}+{self.adapter.path})"

    @property
    def names(self) -> list[str]:
        return self.base.names

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def meta(self, name: str) -> TensorMeta:
        return self.base.meta(name)

    def tensor(self, name: str) -> torch.Tensor:
        if not self.adapter.touches(name):
            return self.base.tensor(name)
        hit = self._cache.get(name)
        if hit is None:
            hit = self.adapter.apply(name, self.base.tensor(name))
            self._cache[name] = hit
        return hit

    def address(self, name: str) -> int | None:
        return None if self.adapter.touches(name) else self.base.address(name)

    def prefetch(self, name: str) -> None:
        self.base.prefetch(name)

    def release(self, name: str) -> None:
        self._cache.pop(name, None)
        self.base.release(name)

    def files(self) -> list[dict]:
        """The base model's weight files (the adapter's: :meth:`LoraAdapter.describe`)."""
        return self.base.files()

    def input_files(self) -> list:
        return self.base.input_files() + [self.adapter.file.input_file]

    def folders(self) -> list[Path]:
        return list(dict.fromkeys(self.base.folders() + [Path(os.path.realpath(self.adapter.path))]))

    def file_stamps(self) -> list[tuple]:
        return self.base.file_stamps() + self.adapter.stamps()

    def dtype_name(self, name: str) -> str:
        return self.base.dtype_name(name)

    def close(self) -> None:
        self._cache.clear()
        self.adapter.close()
        self.base.close()


__all__ = ["LoraAdapter", "LoraCheckpoint", "LoraDelta", "split_reference", "pattern_key", "reference"]
