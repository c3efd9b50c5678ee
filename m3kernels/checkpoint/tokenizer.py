"""mergekit's tokenizer merge: the ``tokenizer_source`` / ``tokenizer:`` settings and the output
vocabulary with each input's token -> row map (mergekit 0.1.5's semantics, our code).

* **Settings** (:func:`parse_tokenizer_settings`): ``tokenizer_source: base | union | PATH`` or the
  ``tokenizer:`` block (``source``, default ``union``; ``tokens: {TOKEN: {source, force}}``;
  ``pad_to_multiple_of``). A token ``source`` is a model path (that model's row for the token), a
  ``{kind: model_token, model, token | token_id}`` (a row of that model's own vocabulary) or
  ``{kind: zero}``.
* **Vocabulary** (:func:`build_vocab_plan`): every input's tokenizer is read (its files staged
  through the folder's checks into a private folder, then ``transformers.AutoTokenizer``); the
  base's drops tokens past its ``config.json`` ``vocab_size``. The output tokenizer is the base's
  (``base``), the one of PATH, or (``union``) the base's plus, in input order (base first, then
  ``models`` as listed), every other token of every input below its ``vocab_size`` (plain tokens
  first, then added tokens, first settings win), then the ``tokens:`` keys it lacks. Each input
  gets ``perm[new id] = its id of the token`` (-1: it lacks it). The output has ``len(vocab)``
  rows, rounded up to ``pad_to_multiple_of``.

How the rows are then filled is :mod:`m3kernels.checkpoint.tokenizer_rows`.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from m3kernels.checkpoint.config import MergeConfigError, _model_path, _same_path
from m3kernels.checkpoint.safetensors_io import model_roots, open_input, read_input_bytes
from m3kernels.checkpoint.source import CONFIG, SIDE_FILES
from m3kernels.errors import CheckpointError

TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")
TOKEN_KEYS = ("source", "force")
SOURCES = ("base", "union")
MAX_TOKENIZER_FILE = 1 << 30
MAX_PAD_MULTIPLE = 1 << 20
# what save_pretrained writes for a tokenizer: the input's files of these names are not copied
TOKENIZER_FILES = tuple(n for n in SIDE_FILES if n != "generation_config.json")


# ---------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class TokenSource:
    """Where a configured token's row comes from: ``kind`` 'model' (``model``'s row of the same
    token), 'model_token' (``model``'s row of ``token`` or ``token_id``) or 'zero'."""

    kind: str
    model: str | None = None
    token: str | None = None
    token_id: int | None = None

    def describe(self) -> str:
        if self.kind == "zero":
            return "zeros"
        if self.kind == "model":
            return f"model {self.model}"
        what = f"token {self.token!r}" if self.token is not None else f"token id {self.token_id}"
        return f"{what} of model {self.model}"


@dataclass(frozen=True)
class TokenRule:
    source: TokenSource | None
    force: bool = False


@dataclass
class TokenizerSettings:
    """The output vocabulary as configured (``source``: 'base', 'union' or a model path)."""

    source: str
    tokens: dict = field(default_factory=dict)  # token -> TokenRule, in config order
    pad_to_multiple_of: int | None = None
    key: str = "tokenizer_source"  # where it was written, for messages


def _token_model(value, key: str, inputs: list) -> str:
    path = _model_path(value, key)
    if not any(_same_path(path, p) for p in inputs):
        raise MergeConfigError(
            f"{key}: {path!r} is not one of the merged models ({', '.join(map(repr, inputs))}); "
            f"a token's row can only come from a model of the merge"
        )
    return path


def _token_source(raw, key: str, inputs: list) -> TokenSource | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        return TokenSource("model", _token_model(raw, key, inputs))
    if not isinstance(raw, dict):
        raise MergeConfigError(
            f"{key}: expected a model path, {{kind: model_token, model, token | token_id}} or "
            f"{{kind: zero}}, got {raw!r}"
        )
    kind = raw.get("kind")
    if kind == "zero":
        extra = set(raw) - {"kind"}
        if extra:
            raise MergeConfigError(
                f"{key}.{sorted(extra)[0]}: unknown key; {{kind: zero}} takes nothing else"
            )
        return TokenSource("zero")
    if kind == "model_token":
        extra = set(raw) - {"kind", "model", "token", "token_id"}
        if extra:
            raise MergeConfigError(
                f"{key}.{sorted(extra)[0]}: unknown key; a model_token source has model and token or token_id"
            )
        model = _token_model(raw.get("model"), f"{key}.model", inputs)
        token, tid = raw.get("token"), raw.get("token_id")
        if (token is None) == (tid is None):
            raise MergeConfigError(f"{key}: give one of token (a string) or token_id (an integer)")
        if token is not None and not isinstance(token, str):
            raise MergeConfigError(f"{key}.token: expected a string, got {token!r}")
        if tid is not None and (isinstance(tid, bool) or not isinstance(tid, int) or tid < 0):
            raise MergeConfigError(f"{key}.token_id: expected an integer >= 0, got {tid!r}")
        return TokenSource("model_token", model, token, tid)
    raise MergeConfigError(f"{key}.kind: expected 'model_token' or 'zero', got {kind!r}")


def parse_tokenizer_settings(raw: dict, base: str | None, inputs: list) -> TokenizerSettings | None:
    """``tokenizer_source`` / ``tokenizer`` of a config dict (None: neither given). ``inputs``:
    every model path of the merge (base included). A source path equal to the base is 'base'."""
    src, block = raw.get("tokenizer_source"), raw.get("tokenizer")
    if src is not None and block is not None:
        raise MergeConfigError("tokenizer_source: give tokenizer_source or the tokenizer block, not both")
    if src is None and block is None:
        return None
    if block is not None:
        if not isinstance(block, dict):
            raise MergeConfigError(
                f"tokenizer: expected a mapping (source, tokens, pad_to_multiple_of), got {block!r}"
            )
        extra = set(block) - set(TOKENIZER_KEYS)
        if extra:
            raise MergeConfigError(
                f"tokenizer.{sorted(extra)[0]}: unknown key; supported: {', '.join(TOKENIZER_KEYS)}"
            )
        src = block.get("source", "union")
        key = "tokenizer.source"
    else:
        block, key = {}, "tokenizer_source"
    if not isinstance(src, str) or not src.strip():
        raise MergeConfigError(f"{key}: expected 'base', 'union' or a model path, got {src!r}")
    if src not in SOURCES:
        src = _model_path(src, key)
        if base is not None and _same_path(src, base):
            src = "base"
    tokens = {}
    raw_tokens = block.get("tokens")
    if raw_tokens is not None:
        if not isinstance(raw_tokens, dict):
            raise MergeConfigError(
                f"tokenizer.tokens: expected a mapping of token -> {{source, force}}, got {raw_tokens!r}"
            )
        for tok, rule in raw_tokens.items():
            tkey = f"tokenizer.tokens[{tok!r}]"
            if not isinstance(tok, str) or not tok:
                raise MergeConfigError(f"{tkey}: a token must be a non-empty string")
            if rule is None:
                rule = {}
            if not isinstance(rule, dict):
                raise MergeConfigError(f"{tkey}: expected a mapping {{source, force}}, got {rule!r}")
            extra = set(rule) - set(TOKEN_KEYS)
            if extra:
                raise MergeConfigError(f"{tkey}.{sorted(extra)[0]}: unknown key; supported: source, force")
            force = rule.get("force", False)
            if not isinstance(force, bool):
                raise MergeConfigError(f"{tkey}.force: expected true or false, got {force!r}")
            source = _token_source(rule.get("source"), f"{tkey}.source", inputs)
            if force and source is None:
                raise MergeConfigError(
                    f"{tkey}: force: true needs a source (a model path, model_token or zero); "
                    f"mergekit 0.1.5 fails without one"
                )
            tokens[tok] = TokenRule(source, force)
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (
        isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad <= MAX_PAD_MULTIPLE
    ):
        raise MergeConfigError(
            f"tokenizer.pad_to_multiple_of: expected an integer in [1, {MAX_PAD_MULTIPLE}] (0 or null: none), got {pad!r}"
        )
    return TokenizerSettings(src, tokens, pad or None, key)


# ---------------------------------------------------------------------------- reading tokenizers
def read_tokenizer_files(folder: Path, follow_symlinks: bool = False) -> dict:
    """{name: bytes} of the tokenizer files of ``folder``, read by the folder's rules (regular
    files, inside the folder unless ``follow_symlinks``)."""
    folder = Path(folder)
    roots = None if follow_symlinks else model_roots(folder)
    out = {}
    for name in TOKENIZER_FILES:
        p = folder / name
        if not os.path.lexists(p):
            continue
        f = open_input(p, roots=roots, what=name, lease=False)
        try:
            out[name] = read_input_bytes(f, MAX_TOKENIZER_FILE, name)
        finally:
            f.close()
    return out


def _folder(ck) -> Path:
    return ck.path if ck.path.is_dir() else ck.root


def _stage(folder: Path, follow_symlinks: bool, dest: Path, config: dict | None) -> list:
    """Copy the tokenizer files of ``folder`` (:func:`read_tokenizer_files`) into ``dest``; returns
    their names."""
    files = read_tokenizer_files(folder, follow_symlinks)
    for name, data in files.items():
        (dest / name).write_bytes(data)
    if config is not None:
        (dest / CONFIG).write_text(json.dumps(config))
    return list(files)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise CheckpointError(
            "tokenizer merge: needs the transformers package (pip install transformers)"
        ) from None
    transformers.logging.set_verbosity_error()
    return transformers


def load_tokenizer(folder, *, config: dict | None = None, follow_symlinks: bool = False, what: str = "model"):
    """A fast tokenizer of a model folder (its files read by the folder's rules); CheckpointError
    naming the folder when there is none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(
            f"{what}: {folder} is not a model folder (no tokenizer can be read)", path=str(folder)
        )
    tf = _transformers()
    with tempfile.TemporaryDirectory(prefix="m3k-tok-") as tmp:
        names = _stage(folder, follow_symlinks, Path(tmp), config)
        if not any(
            n in names
            for n in ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
        ):
            raise CheckpointError(
                f"{what}: {folder} holds no tokenizer (tokenizer.json, tokenizer.model, ...)",
                path=str(folder),
            )
        try:
            tok = tf.AutoTokenizer.from_pretrained(tmp, use_fast=True, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
            gist = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise CheckpointError(
                f"{what}: cannot load the tokenizer of {folder}: {gist}", path=str(folder)
            ) from None
    return tok


def config_vocab_size(config: dict | None) -> int | None:
    """``vocab_size`` of a config.json (or of its ``text_config``)."""
    for c in (config or {}, (config or {}).get("text_config") or {}):
        v = c.get("vocab_size") if isinstance(c, dict) else None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _strip(tok, size: int, label: str, path):
    """The tokenizer without its tokens of id >= ``size`` (BPE only, as mergekit 0.1.5)."""
    unused = {t for t, i in tok.get_vocab().items() if i >= size}
    if not unused:
        return tok
    from tokenizers import Tokenizer

    backend = getattr(tok, "_tokenizer", None)
    data = json.loads(backend.to_str()) if backend is not None else None
    kind = (data or {}).get("model", {}).get("type")
    if kind != "BPE":
        raise CheckpointError(
            f"{label}: its tokenizer has {len(unused)} token(s) past config.json's vocab_size {size} and is "
            f"{kind or 'not a fast tokenizer'}; only a BPE tokenizer can be cut to the vocabulary (as in mergekit)",
            path=str(path),
        )
    data["added_tokens"] = [e for e in data.get("added_tokens", []) if e["id"] < size]
    vocab = data["model"]["vocab"]
    for t in unused:
        vocab.pop(t, None)

    def keep(m) -> bool:
        parts = m.split(" ") if isinstance(m, str) else list(m)
        return not any(p in unused for p in parts)

    data["model"]["merges"] = [m for m in data["model"].get("merges", []) if keep(m)]
    tok._tokenizer = Tokenizer.from_str(json.dumps(data))
    return tok


def _fresh_copy(tok):
    """An independent copy of a tokenizer (saved and loaded again)."""
    tf = _transformers()
    with tempfile.TemporaryDirectory(prefix="m3k-tok-") as tmp:
        tok.save_pretrained(tmp)
        return tf.AutoTokenizer.from_pretrained(tmp, use_fast=True, local_files_only=True)


# ---------------------------------------------------------------------------- the vocabulary
@dataclass
class InputVocab:
    """One input's vocabulary: its tokenizer's token -> id and the rows it may index."""

    ckpt: object  # Checkpoint
    vocab: dict
    size: int  # config.json vocab_size (else the vocabulary's length)
    own: bool  # False: its tokenizer could not be read; the base's is assumed
    perm: list = field(default_factory=list)  # perm[new id] = its id, -1 where it lacks the token


@dataclass
class VocabPlan:
    """The output vocabulary and how every input's rows map onto it."""

    settings: TokenizerSettings
    tokenizer: object  # the output tokenizer (transformers)
    vocab: dict  # token -> output id
    rows: int  # output rows: len(vocab) rounded up to pad_to_multiple_of
    inputs: list  # InputVocab, base first, then the models in order
    copy_files_of: object | None = None  # a Checkpoint whose tokenizer files are the output's as they are
    notes: list = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.vocab)

    def of(self, ckpt) -> InputVocab:
        for iv in self.inputs:
            if iv.ckpt is ckpt:
                return iv
        raise KeyError(getattr(ckpt, "label", ckpt))

    def identity(self, ckpt, rows: int) -> bool:
        """Whether ``ckpt``'s tensor of ``rows`` rows is already the output's layout."""
        perm = self.of(ckpt).perm
        return rows == self.rows == len(perm) and all(p == i for i, p in enumerate(perm))


def _union(base_tok, inputs: list, notes: list):
    """mergekit's union: the base's tokenizer plus every other input's tokens (see module doc)."""
    plain, added, warned = {}, {}, set()
    for iv in inputs:
        tok = iv.tokenizer
        decoder = tok.added_tokens_decoder
        added_names = {info.content for info in decoder.values()}
        # in id order: get_vocab()'s order comes from a hash map (it changes from run to run),
        # and the new tokens' ids must not (mergekit's union order is a Python set's)
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < iv.size and t not in added_names and t not in plain:
                plain[t] = True
        for i, info in sorted(decoder.items()):
            if i >= iv.size:
                continue
            prev = added.get(info.content)
            if prev is None:
                added[info.content] = info
            elif prev != info and info.content not in warned:
                warned.add(info.content)
                notes.append(
                    f"tokenizer: token {info.content!r} is added with different settings; the first is used"
                )
    out = _fresh_copy(base_tok)
    base_vocab = base_tok.get_vocab()
    for t in plain:
        if t not in added and t not in base_vocab:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


class _Loaded:
    """An input's tokenizer while the vocabulary is built (``cfg_size``: config.json's
    vocab_size; ``size``: the limit the union uses, that or the tokenizer's base vocabulary)."""

    def __init__(self, ckpt, tokenizer, cfg_size: int | None, size: int | None):
        self.ckpt, self.tokenizer, self.cfg_size, self.size = ckpt, tokenizer, cfg_size, size


def _load_input(ckpt):
    return load_tokenizer(
        ckpt.path if ckpt.path.is_dir() else ckpt.root,
        config=ckpt.config,
        follow_symlinks=ckpt.follow_symlinks,
        what=ckpt.label,
    )


def build_vocab_plan(settings: TokenizerSettings, base, models: list, *, paths=(), legacy_ok: bool = False):
    """The :class:`VocabPlan` of a merge (``base``: the base Checkpoint, or None: the first model
    stands in, as in mergekit). ``legacy_ok``: when the base's tokenizer cannot be read, return
    None (the caller keeps its plain copy of the tokenizer files) instead of raising. ``paths``:
    (path as the config writes it, Checkpoint) pairs: a ``tokenizer_source`` path naming an input
    is that input."""
    notes: list = []
    first = base if base is not None else models[0]
    others = [m for m in models if m is not first]
    try:
        base_tok = _load_input(first)
    except CheckpointError as exc:
        if legacy_ok:
            return None, [
                f"tokenizer_source: base: {exc}; the tokenizer files are copied and the vocabulary rows merged as docs/SPEC.md §4 says"
            ]
        raise
    base_size = config_vocab_size(first.config) or len(base_tok.get_vocab())
    stripped = _strip(base_tok, base_size, first.label, first.path)
    loaded = [_Loaded(first, stripped, base_size, base_size)]
    for m in others:
        try:
            tok = _load_input(m)
        except CheckpointError as exc:
            notes.append(f"tokenizer: {exc}; assuming the same vocabulary as {first.label} (as mergekit)")
            loaded.append(_Loaded(m, None, config_vocab_size(m.config), None))
            continue
        cfg_size = config_vocab_size(m.config)
        loaded.append(_Loaded(m, tok, cfg_size, cfg_size or tok.vocab_size))

    copy_of = None
    src = settings.source
    if src == "base":
        out = stripped
        copy_of = first if stripped is base_tok else None
    elif src == "union":
        out = _union(stripped, [iv for iv in loaded if iv.tokenizer is not None], notes)
    else:
        path = Path(src.split("+", 1)[0]).expanduser()  # MODEL+LORA: the model's tokenizer (as mergekit)
        named = next((ck for p, ck in paths if p is not None and _same_path(p, src.split("+", 1)[0])), None)
        if named is not None:
            path = Path(_folder(named))
        same = next((iv for iv in loaded if os.path.realpath(iv.ckpt.path) == os.path.realpath(path)), None)
        if same is not None and same.tokenizer is not None:
            out = _fresh_copy(same.tokenizer) if same.ckpt is not first else stripped
            copy_of = same.ckpt if same.ckpt is not first or stripped is base_tok else None
        else:
            out = load_tokenizer(path, follow_symlinks=False, what=settings.key)
    existing = set(out.get_vocab())
    if out is stripped and any(t not in existing for t in settings.tokens):
        # a copy: the base's own vocabulary (its row map below) must not get the new tokens
        # (mergekit 0.1.5 adds them to the base's tokenizer itself and then fails with a KeyError)
        out = _fresh_copy(stripped)
    for t in settings.tokens:
        if t not in existing:
            out.add_tokens(t)
            existing.add(t)
            copy_of = None
    vocab = out.get_vocab()
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        raise CheckpointError(
            f"{settings.key}: the output tokenizer's ids are not 0 .. {len(ids) - 1} "
            f"(ids {ids[:3]} .. {ids[-3:]}); cannot lay out the embedding rows",
        )
    rows = len(vocab)
    pad = settings.pad_to_multiple_of
    if pad and rows % pad:
        rows = (rows // pad + 1) * pad
    if rows != len(vocab):
        copy_of = None

    by_id = [None] * len(vocab)
    for t, i in vocab.items():
        by_id[i] = t
    inputs = []
    for iv in loaded:
        own = iv.tokenizer is not None
        mv = (iv.tokenizer if own else stripped).get_vocab()
        size = iv.cfg_size if iv.cfg_size is not None else len(mv)
        perm = []
        for t in by_id:
            j = mv.get(t, -1)
            if j >= size:
                raise CheckpointError(
                    f"{iv.ckpt.label}: token {t!r} of the output vocabulary has id {j} in its tokenizer, past "
                    f"its vocab_size {size} (config.json); mergekit 0.1.5 fails on this too",
                    path=str(iv.ckpt.path),
                )
            perm.append(j)
        inputs.append(InputVocab(iv.ckpt, mv, size, own, perm))
    return VocabPlan(settings, out, vocab, rows, inputs, copy_of, notes), notes


@dataclass
class TokenizerOutput:
    """What the merge writes as its tokenizer: the merged vocabulary (None: the config source's
    tokenizer files as they are) and the chat template text (None: unchanged)."""

    vocab: VocabPlan | None
    chat_template: str | None
    source: object  # the config source Checkpoint

    def summary(self) -> str:
        parts = []
        if self.vocab is not None:
            v = self.vocab
            parts.append(
                f"tokenizer: {v.settings.source}, {v.size} tokens, {v.rows} embedding rows"
                + (f", {len(v.settings.tokens)} configured token(s)" if v.settings.tokens else "")
            )
        if self.chat_template is not None:
            parts.append(f"chat template: {len(self.chat_template)} characters (chat_template.jinja)")
        return "\n".join(parts)

    def describe(self) -> dict:
        """What the merge record keeps (and the resume fingerprint covers): the vocabulary's
        source, size, rows and a hash of token -> id, the chat template's hash."""
        import hashlib

        out = {}
        if self.vocab is not None:
            v = self.vocab
            ids = json.dumps(sorted(v.vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
            out.update(
                source=v.settings.source,
                tokens=len(v.vocab),
                rows=v.rows,
                vocab_sha256=hashlib.sha256(ids.encode("utf-8")).hexdigest(),
                configured_tokens=sorted(v.settings.tokens),
            )
        if self.chat_template is not None:
            out["chat_template_sha256"] = hashlib.sha256(self.chat_template.encode("utf-8")).hexdigest()
        return out

    def files(self, dest: Path) -> list:
        """Write the tokenizer files into ``dest`` (a private folder); returns their names."""
        from m3kernels.checkpoint.chat_template import apply_to_files

        dest = Path(dest)
        v = self.vocab
        if v is None or v.copy_files_of is not None:
            ck = self.source if v is None else v.copy_files_of
            names = _stage(_folder(ck), ck.follow_symlinks, dest, None)
        else:
            v.tokenizer.save_pretrained(str(dest))
            names = sorted(p.name for p in dest.iterdir() if p.is_file())
        if self.chat_template is not None:
            names = apply_to_files(dest, names, self.chat_template)
        return names


def plan_tokenizer(cfg, base, models: list) -> tuple:
    """(TokenizerOutput or None, notes) for a config: None when the tokenizer files are simply
    copied (no tokenizer settings and no chat template, or ``tokenizer_source: base`` over a base
    whose tokenizer cannot be read)."""
    from m3kernels.checkpoint.chat_template import resolve_chat_template

    settings = getattr(cfg, "tokenizer", None)
    chat = getattr(cfg, "chat_template", None)
    if settings is None and chat is None:
        return None, []
    source = base if base is not None else models[0]
    vocab, notes = None, []
    if settings is not None:
        legacy = settings.source == "base" and not settings.tokens and not settings.pad_to_multiple_of
        paths = ([(cfg.base_model, base)] if base is not None else []) + list(zip(cfg.models, models))
        vocab, notes = build_vocab_plan(settings, base, models, paths=paths, legacy_ok=legacy)
    text = None
    if chat is not None:
        inputs = [source] + [m for m in models if m is not source]
        files = (
            [read_tokenizer_files(_folder(ck), ck.follow_symlinks) for ck in inputs] if chat == "auto" else []
        )
        text = resolve_chat_template(chat, files)
        if text is None:
            notes.append("chat_template: auto: no input model has a chat template; none is written")
    if vocab is None and text is None:
        return None, notes
    return TokenizerOutput(vocab, text, source), notes


def tokenizer_for(cfg, base, models: list) -> tuple:
    """:func:`plan_tokenizer`, once per config object (a sliced merge plans its pre and post
    weights separately)."""
    key = (id(base), tuple(id(m) for m in models))
    hit = cfg.__dict__.get("_m3k_tokenizer")
    if hit is not None and hit[0] == key:
        return hit[1]
    result = plan_tokenizer(cfg, base, models)
    cfg.__dict__["_m3k_tokenizer"] = (key, result)
    return result


__all__ = [
    "TokenSource",
    "TokenRule",
    "TokenizerSettings",
    "VocabPlan",
    "InputVocab",
    "parse_tokenizer_settings",
    "build_vocab_plan",
    "load_tokenizer",
    "TokenizerOutput",
    "plan_tokenizer",
    "tokenizer_for",
    "read_tokenizer_files",
    "write_tokenizer_files",
    "config_vocab_size",
    "TOKENIZER_FILES",
]


def write_tokenizer_files(out: Path, plan) -> frozenset:
    """Write a plan's merged tokenizer / chat template into the output folder ``out`` (each file
    durably); returns the tokenizer file names the config source's copies must not overwrite
    (empty: the plan has none, its files are copied as they are)."""
    from m3kernels.checkpoint.writer import write_file_durably

    tok = getattr(plan, "tokenizer", None)
    if tok is None:
        return frozenset()
    with tempfile.TemporaryDirectory(prefix="m3k-tok-") as tmp:
        for name in tok.files(Path(tmp)):
            write_file_durably(Path(out) / name, (Path(tmp) / name).read_bytes())
    return frozenset(TOKENIZER_FILES)
