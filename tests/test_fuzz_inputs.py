"""A seeded mutation fuzzer over the inputs of a merge (issue 14): safetensors headers, shard
indexes, ``config.json`` and merge parameters.

Each case starts from a valid input and mutates it in one category (header length, truncation,
offsets, overlaps, gaps, reordering, dtypes, shapes, numbers, nesting, UTF-8, duplicate keys,
metadata types, structure, random bytes; index maps, names, JSON and metadata; config.json;
merge parameters), then:

* **header** cases open the file with :class:`~m3kernels.checkpoint.source.Checkpoint` (all
  tensors read) and with ``safetensors.safe_open`` (all tensors read): we must reject every
  file the library rejects; a file both accept must read bit-identically; a file only the
  library reads is allowed only for the documented stricter rules (:data:`STRICTER`);
* **index** and **config** cases open a model folder and check what was read against the
  shards named (read with the library); config cases also run a merge;
* **params** cases run ``merge_checkpoints`` with mutated parameters on tiny models: a clean
  :class:`~m3kernels.errors.M3KError` or a merge bit-identical to ``merge_tensors``.

Every case ends in a clean ``M3KError`` (exit status 2) or a correct result within
:data:`CASE_LIMIT_S` seconds: never another exception (an "internal error"), a signal or a
hang. ``M3K_FUZZ_INPUTS=N`` sets the case count (CI: 2,000); ``bench/fuzz_inputs.py --cases
10000`` runs the same generator and prints the outcome counts per category.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import random
import shutil
import signal
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from m3kernels.checkpoint.source import Checkpoint
from m3kernels.errors import M3KError

SEED = 20261214
CASES = int(os.environ.get("M3K_FUZZ_INPUTS", "2000"))
CASE_LIMIT_S = 10.0
# Files the safetensors library reads but m3kernels refuses on purpose (a message holds one of these).
STRICTER = (
    "appears twice",  # a key twice in one JSON object (the library keeps the last tensor)
    "unknown dtype",  # dtypes m3kernels does not merge (C64, F8_E8M0, F4, ...)
    "dimensions (at most",  # more than 64 dimensions
    "2**63",  # a shape whose elements would not fit 2**63 bytes, zero-size or not
    "digits",  # an integer of more than 40 digits
)


# ---------------------------------------------------------------------------------- JSON text
class Obj(list):
    """A JSON object as a list of (key, value) pairs: keys may repeat."""


@dataclass
class Raw:
    """JSON text put in as it is."""

    text: str


def dump(v) -> str:
    if isinstance(v, Raw):
        return v.text
    if isinstance(v, Obj):
        return "{" + ",".join(f"{json.dumps(k)}:{dump(x)}" for k, x in v) + "}"
    if isinstance(v, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{dump(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(dump(x) for x in v) + "]"
    return json.dumps(v)


def nested(depth: int, kind: str, inner: str = "1") -> Raw:
    if kind == "list":
        return Raw("[" * depth + inner + "]" * depth)
    return Raw('{"a":' * depth + inner + "}" * depth)


# ---------------------------------------------------------------------------------- base shard
DTYPES = {
    "F32": (torch.float32, 4),
    "BF16": (torch.bfloat16, 2),
    "F16": (torch.float16, 2),
    "I64": (torch.int64, 8),
    "U8": (torch.uint8, 1),
    "I32": (torch.int32, 4),
}
BASE = [
    ("w", "F32", [3, 4]),
    ("h", "BF16", [5]),
    ("g", "F16", [2, 3]),
    ("ids", "I64", [4]),
    ("s", "F32", []),
    ("z", "F32", [0, 3]),
    ("m", "U8", [7]),
    ("q", "I32", [2, 2]),
]


def tensor_bytes(rng: random.Random, dtype: str, shape) -> bytes:
    n = math.prod(shape) * DTYPES[dtype][1]
    if dtype in ("F32", "F16", "BF16"):  # finite values
        t = torch.tensor([rng.uniform(-2, 2) for _ in range(math.prod(shape))], dtype=torch.float32)
        return (
            t.to(DTYPES[dtype][0]).numpy().tobytes()
            if dtype != "BF16"
            else t.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
        )
    return bytes(rng.randrange(256) for _ in range(n))


@dataclass
class Shard:
    """A safetensors file under construction: entries (name -> {dtype, shape, data_offsets})."""

    entries: Obj
    data: bytearray
    length: int | None = None  # the header length field (None: the real one)
    header_edit: object = None  # function(bytes) -> bytes on the header text
    pad: bool = True

    def build(self) -> bytes:
        raw = dump(self.entries).encode("utf-8", "surrogatepass")
        if self.header_edit is not None:
            raw = self.header_edit(raw)
        if self.pad:
            raw += b" " * (-len(raw) % 8)
        n = len(raw) if self.length is None else self.length
        return struct.pack("<Q", n % 2**64) + raw + bytes(self.data)


def base_shard(rng: random.Random, tensors=BASE) -> Shard:
    entries = Obj([("__metadata__", {"format": "pt"})])
    data, pos = bytearray(), 0
    for name, dtype, shape in tensors:
        b = tensor_bytes(rng, dtype, shape)
        entries.append((name, {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + len(b)]}))
        data += b
        pos += len(b)
    return Shard(entries, data)


def _entry(shard: Shard, rng: random.Random):
    """(index in entries, name, entry dict) of a random tensor entry."""
    idx = [i for i, (k, _) in enumerate(shard.entries) if k != "__metadata__"]
    i = rng.choice(idx)
    return i, shard.entries[i][0], shard.entries[i][1]


HUGE = [2**63 - 1, 2**63, 2**64, 2**64 + 8, 10**30, -1, -(2**63), -(10**30)]


def mut_length(s: Shard, rng):
    real = len(dump(s.entries).encode()) + (-len(dump(s.entries).encode()) % 8)
    s.length = rng.choice(
        [
            0,
            1,
            2,
            7,
            real - 1,
            real + 1,
            real + 8,
            real - 8,
            real + len(s.data) + 1,
            2**63,
            2**64 - 1,
            rng.randrange(2**64),
            100 * 1024 * 1024 + 1,
            3,
        ]
    )


def mut_truncate(s: Shard, rng):
    full = s.build()
    s.length, s.header_edit, s.pad = None, None, False
    cut = rng.choice([rng.randrange(len(full)), len(full) - 1, len(full) - rng.randint(1, 8), 8, 4])
    extra = bytes(rng.randrange(256) for _ in range(rng.choice([0, 0, 1, 8, 100])))
    data = full[:cut] + extra
    s.entries, s.data = Obj(), bytearray()
    s.header_edit = None
    s.build = lambda data=data: data  # type: ignore[method-assign]


def mut_offsets(s: Shard, rng):
    _, _, e = _entry(s, rng)
    b, end = e["data_offsets"]
    e["data_offsets"] = rng.choice(
        [
            [end, b],
            [b, end + rng.randint(1, 9)],
            [b - 1, end - 1],
            [b + 1, end + 1],
            [rng.choice(HUGE), end],
            [b, rng.choice(HUGE)],
            [rng.choice(HUGE), rng.choice(HUGE)],
            [b],
            [b, end, end],
            [],
            f"{b},{end}",
            [float(b), float(end)],
            None,
            {"b": b},
            [True, end],
            [b, Raw("1e999")],
            [b, Raw("-0")],
            [Raw("0" * 3 + "1"), end],
        ]
    )
    if rng.random() < 0.2:
        del e["data_offsets"]


def mut_overlap(s: Shard, rng):
    names = [k for k, _ in s.entries if k != "__metadata__"]
    a, c = rng.sample(range(1, len(names) + 1), 2)
    ea, ec = s.entries[a][1], s.entries[c][1]
    size = ec["data_offsets"][1] - ec["data_offsets"][0]
    start = ea["data_offsets"][0] + rng.randint(0, max(0, ea["data_offsets"][1] - ea["data_offsets"][0]))
    ec["data_offsets"] = [start, start + size]
    if rng.random() < 0.5:  # the same bytes for both, shapes and dtypes equal: still two tensors on one range
        ec.update(dtype=ea["dtype"], shape=list(ea["shape"]), data_offsets=list(ea["data_offsets"]))


def mut_gap(s: Shard, rng):
    op = rng.randrange(4)
    ents = [(i, e) for i, (k, e) in enumerate(s.entries) if k != "__metadata__"]
    if op == 0:  # unused bytes between tensors
        i, e = rng.choice(ents)
        k = rng.randint(1, 16)
        at = e["data_offsets"][1]
        s.data[at:at] = bytes(k)
        for _, f in ents:
            if f["data_offsets"][0] >= at and f is not e:
                f["data_offsets"] = [f["data_offsets"][0] + k, f["data_offsets"][1] + k]
    elif op == 1:  # a tensor dropped from the header (its bytes stay)
        i, _ = rng.choice(ents)
        del s.entries[i]
    elif op == 2:  # bytes after the last tensor
        s.data += bytes(rng.randint(1, 64))
    else:  # the data section shorter than the tensors
        del s.data[-rng.randint(1, 8) :]


def mut_reorder(s: Shard, rng):
    """The same tensors stored in another order, the entries listed in another order: a valid file."""
    ents = [(k, e) for k, e in s.entries if k != "__metadata__"]
    chunks = {k: bytes(s.data[e["data_offsets"][0] : e["data_offsets"][1]]) for k, e in ents}
    order = list(chunks)
    rng.shuffle(order)
    data, pos, by_name = bytearray(), 0, dict(ents)
    for k in order:
        by_name[k]["data_offsets"] = [pos, pos + len(chunks[k])]
        data += chunks[k]
        pos += len(chunks[k])
    s.data = data
    entries = list(s.entries)
    rng.shuffle(entries)
    s.entries = Obj(entries)


def mut_dtype(s: Shard, rng):
    _, _, e = _entry(s, rng)
    same_size = [d for d, (_, b) in DTYPES.items() if b == DTYPES[e["dtype"]][1]]
    e["dtype"] = rng.choice(
        [
            "Q7",
            "f32",
            "",
            "F32 ",
            "BF16\x00",
            "float32",
            "C64",
            "F8_E8M0",
            "F4",
            "F6_E2M3",
            "U16",
            "U32",
            "U64",
            "I16",
            "F64",
            "BOOL",
            "F8_E4M3",
            "F8_E5M2",
            rng.choice(same_size),
            rng.choice(list(DTYPES)),
            ["F32"],
            {"t": "F32"},
            None,
            32,
            True,
            4.0,
            nested(50, "list", '"F32"'),
        ]
    )


def mut_shape(s: Shard, rng):
    _, _, e = _entry(s, rng)
    shape = list(e["shape"])
    n = math.prod(shape)
    e["shape"] = rng.choice(
        [
            [-1] + shape[1:],
            [2.0] * len(shape),
            [2**63],
            [2**64],
            [10**40],
            "3,4",
            [[d] for d in shape] or [[1]],
            [True] * max(1, len(shape)),
            [1] * 65 + shape,
            [1] * 64 + shape[:1],
            [],
            [n] if n else [0],
            list(reversed(shape)),
            [0, 2**62, 4],
            [0, 2**63 - 1],
            [0, 2**63],
            [n, 1, 1],
            None,
            {},
            [None],
            [Raw("1e3")],
            [Raw("9" * 5000)],
            [0] * len(shape) or [0],
        ]
    )


def mut_numbers(s: Shard, rng):
    repl = rng.choice(
        [
            "9" * rng.choice([19, 20, 40, 41, 100, 5000]),
            "1e999",
            "-0",
            "NaN",
            "Infinity",
            "-Infinity",
            "0x10",
            "01",
            "1.0",
            "-1",
            "18446744073709551616",
            "1E2",
            ".5",
        ]
    )

    def edit(raw: bytes) -> bytes:
        nums = [i for i in range(len(raw)) if raw[i : i + 1].isdigit() and not raw[i - 1 : i].isdigit()]
        if not nums:
            return raw
        i = rng.choice(nums)
        j = i
        while j < len(raw) and raw[j : j + 1].isdigit():
            j += 1
        return raw[:i] + repl.encode() + raw[j:]

    s.header_edit = edit


def mut_nesting(s: Shard, rng):
    depth = rng.choice([2, 10, 64, 100, 127, 128, 129, 500, 990, 1000, 3000, 100000])
    kind = rng.choice(["list", "object"])
    where = rng.randrange(5)
    _, _, e = _entry(s, rng)
    if where == 0:
        e["extra"] = nested(depth, kind)
    elif where == 1:
        e["shape"] = nested(depth, kind)
    elif where == 2:
        s.entries = Obj([(k, v if k != "__metadata__" else {"x": nested(depth, kind)}) for k, v in s.entries])
    elif where == 3:
        s.entries.append(("deep", nested(depth, kind)))
    else:
        inner = dump(s.entries)
        s.entries = Obj()
        s.header_edit = lambda raw, inner=inner: ("[" * depth + inner + "]" * depth).encode()


def mut_utf8(s: Shard, rng):
    bad = rng.choice(
        [
            b"\xff",
            b"\xc0\x80",
            b"\xed\xa0\x80",
            b"\xe2\x82",
            b"\xf4\x90\x80\x80",
            b"\x00",
            b"\xef\xbb\xbf",
            b"\x1b[31m",
            b"\\ud800",
            b"\\u0000",
            b"\x7f",
        ]
    )
    where = rng.randrange(3)

    def edit(raw: bytes) -> bytes:
        if where == 0:  # inside a tensor name
            i = raw.find(b'"', 1) + 1
            return raw[:i] + bad + raw[i:]
        if where == 1 and bad == b"\xef\xbb\xbf":  # a byte-order mark first
            return bad + raw
        i = rng.randrange(len(raw))
        return raw[:i] + bad + raw[i:]

    s.header_edit = edit


def mut_duplicate(s: Shard, rng):
    op = rng.randrange(4)
    i, name, e = _entry(s, rng)
    if op == 0:  # a tensor listed twice, same entry
        s.entries.append((name, dict(e)))
    elif op == 1:  # a tensor listed twice, the second one elsewhere
        others = [v for k, v in s.entries if k not in ("__metadata__", name)]
        s.entries.append((name, dict(rng.choice(others))))
    elif op == 2:  # a field twice in one entry
        field_ = rng.choice(["dtype", "shape", "data_offsets"])
        s.entries[i] = (name, Obj(list(e.items()) + [(field_, e[field_])]))
    else:  # a metadata key twice, or __metadata__ twice
        if rng.random() < 0.5:
            s.entries = Obj(
                [
                    (k, Obj([("format", "pt"), ("format", "np")]) if k == "__metadata__" else v)
                    for k, v in s.entries
                ]
            )
        else:
            s.entries.append(("__metadata__", {"format": "pt"}))


def mut_metadata(s: Shard, rng):
    value = rng.choice(
        [
            [],
            "pt",
            1,
            None,
            True,
            {"k": 1},
            {"k": None},
            {"k": {"x": "y"}},
            {"k": ["a"]},
            {"": ""},
            {"k": "v" * 100000},
            {"\x1b": "\x07"},
            {"k": 1.5},
            {},
        ]
    )
    s.entries = Obj([(k, value if k == "__metadata__" else v) for k, v in s.entries])


def mut_structure(s: Shard, rng):
    op = rng.randrange(6)
    if op == 0:
        text = rng.choice(["[]", '"x"', "1", "null", "true", "{}", '{"__metadata__":{}}', "[{}]"])
        s.entries = Obj()
        s.header_edit = lambda raw, text=text: text.encode()
    elif op == 1:
        i, name, _ = _entry(s, rng)
        s.entries[i] = (name, rng.choice([[], "F32", 1, None, True, [1, 2]]))
    elif op == 2:
        i, name, e = _entry(s, rng)
        del e[rng.choice(["dtype", "shape", "data_offsets"])]
    elif op == 3:
        s.pad = False
        s.header_edit = lambda raw: raw + rng.choice([b"", b" ", b"\n", b"\x00", b"\t\t", b"}"])
    elif op == 4:
        s.header_edit = lambda raw: rng.choice([b" ", b"\n", b"\x00"]) + raw
    else:  # a tensor named like the metadata key, or oddly
        i, name, e = _entry(s, rng)
        s.entries[i] = (rng.choice(["", " ", "__metadata__ ", "a" * 10000, "x/../y", "\x1b[2J", "é"]), e)


def mut_bytes(s: Shard, rng):
    def edit(raw: bytes) -> bytes:
        data = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(data) + 1)
            op = rng.randrange(3)
            if op == 0 and data:
                del data[min(i, len(data) - 1)]
            elif op == 1:
                data[i:i] = bytes([rng.choice(b'{}[]:,"0123456789-eE. \\\xff')])
            elif data:
                data[min(i, len(data) - 1)] = rng.randrange(256)
        return bytes(data)

    s.header_edit = edit


HEADER_MUTATORS = {
    "length": mut_length,
    "truncate": mut_truncate,
    "offsets": mut_offsets,
    "overlap": mut_overlap,
    "gap": mut_gap,
    "reorder": mut_reorder,
    "dtype": mut_dtype,
    "shape": mut_shape,
    "numbers": mut_numbers,
    "nesting": mut_nesting,
    "utf8": mut_utf8,
    "duplicate": mut_duplicate,
    "metadata": mut_metadata,
    "structure": mut_structure,
    "bytes": mut_bytes,
}


# ---------------------------------------------------------------------------------- evaluation
@dataclass
class Outcome:
    category: str
    outcome: str  # accepted, rejected, stricter, merged, bug
    detail: str = ""
    seconds: float = 0.0


class CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise CaseTimeout in the main thread after ``seconds`` (a blocking system call included)."""

    def on_alarm(signum, frame):
        raise CaseTimeout()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and tuple(a.shape) == tuple(b.shape)
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def library_read(path: Path):
    """{name: tensor} as the safetensors library reads the file, or the library's error text."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k).clone() for k in f.keys()}, None
    except Exception as exc:  # SafetensorError, and what torch raises for odd dtypes
        return None, f"{type(exc).__name__}: {exc}"


def our_read(path: Path, **kw):
    """({name: tensor}, None) as m3kernels reads ``path``, or (None, the M3KError message)."""
    try:
        ck = Checkpoint(path, **kw)
    except M3KError as exc:
        return None, str(exc)
    try:
        return {n: ck.tensor(n).clone() for n in ck.names}, None
    except M3KError as exc:
        return None, str(exc)
    finally:
        ck.close()


def _check_message(msg: str, path) -> str:
    """'' if an M3KError message is fine (one line, names the file), else what is wrong."""
    if "\n" in msg:
        return "message is not one line"
    if str(path) not in msg and Path(path).name not in msg:
        return f"message does not name the file: {msg}"
    return ""


def judge_header(category: str, path: Path) -> Outcome:
    ours, err = our_read(path, role="fuzz")
    lib, lib_err = library_read(path)
    if ours is not None:
        if lib is None:
            return Outcome(category, "bug", f"accepted a file the library rejects ({lib_err})")
        if set(ours) != set(lib) or not all(same_bits(ours[k], lib[k]) for k in ours):
            return Outcome(category, "bug", "read differently from the library")
        return Outcome(category, "accepted")
    problem = _check_message(err, path)
    if problem:
        return Outcome(category, "bug", problem)
    if lib is not None:
        if not any(s in err for s in STRICTER):
            return Outcome(category, "bug", f"rejected a file the library reads, for no listed reason: {err}")
        return Outcome(category, "stricter", err)
    return Outcome(category, "rejected", err)


def header_case(rng: random.Random, category: str, work: Path) -> Outcome:
    s = base_shard(rng)
    HEADER_MUTATORS[category](s, rng)
    path = work / "case.safetensors"
    path.write_bytes(s.build())
    return judge_header(category, path)


# ---------------------------------------------------------------------------------- index files
def index_case(rng: random.Random, category: str, work: Path) -> Outcome:
    folder = work / "indexed"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    halves = [BASE[:4], BASE[4:]]
    names = [f"model-0000{i + 1}-of-00002.safetensors" for i in range(2)]
    wm = Obj()
    for fname, part in zip(names, halves):
        (folder / fname).write_bytes(base_shard(rng, part).build())
        for t in part:
            wm.append((t[0], fname))
    index = Obj([("metadata", {"total_size": 123}), ("weight_map", wm)])
    raw_edit = None
    if category == "index-map":
        v = rng.choice([None, [], "x", 1, {}, Obj(), nested(5, "list")])
        index = (
            Obj([("metadata", {"total_size": 123}), ("weight_map", v)])
            if rng.random() < 0.8
            else Obj([("metadata", {})])
        )
    elif category == "index-names":
        i = rng.randrange(len(wm))
        wm[i] = (
            wm[i][0],
            rng.choice(
                [
                    None,
                    1,
                    [],
                    {},
                    "",
                    "/etc/passwd",
                    "../x.safetensors",
                    "a\x00b",
                    "missing.safetensors",
                    ".",
                    "sub",
                    "x" * 5000,
                    names[1 - names.index(wm[i][1])],
                    "./" + wm[i][1],
                    "model.safetensors.index.json",
                    "\x1b[2J",
                    names[0] + "/",
                ]
            ),
        )
        if rng.random() < 0.3:
            wm.append(("not.there", names[0]))  # listed in a shard that does not hold it
        if rng.random() < 0.2:
            (folder / "sub").mkdir()
    elif category == "index-json":
        op = rng.randrange(5)
        if op == 0:
            wm.append((wm[0][0], wm[0][1]))  # a tensor twice
        elif op == 1:
            index.append(
                ("deep", nested(rng.choice([63, 64, 65, 200, 5000]), rng.choice(["list", "object"])))
            )
        elif op == 2:
            raw_edit = lambda raw: raw.replace(b"123", rng.choice([b"9" * 5000, b"NaN", b"1e999", b"-1"]))
        elif op == 3:
            raw_edit = lambda raw: raw[: rng.randrange(len(raw))] + rng.choice([b"\xff", b"\xc0", b""])
        else:
            raw_edit = lambda raw: rng.choice([b"", b"[]", b"null", b"\xef\xbb\xbf" + raw, b"{}", raw * 2])
    else:  # index-meta
        index = Obj(
            [
                (
                    "metadata",
                    rng.choice(
                        [
                            [],
                            "x",
                            1,
                            None,
                            {"total_size": "big"},
                            {"total_size": -5},
                            {"total_size": 10**39},
                            Obj([("a", 1), ("a", 2)]),
                        ]
                    ),
                ),
                ("weight_map", wm),
            ]
        )
    raw = dump(index).encode("utf-8", "surrogatepass")
    if raw_edit is not None:
        raw = raw_edit(raw)
    (folder / "model.safetensors.index.json").write_bytes(raw)
    ours, err = our_read(folder, role="fuzz")
    if ours is None:
        problem = _check_message(err, folder)
        return Outcome(category, "bug" if problem else "rejected", problem or err)
    # accepted: what the index names, as the library reads it
    try:
        obj = json.loads(raw)
        want = obj["weight_map"]
        lib = {}
        for name, fname in want.items():
            tensors, lib_err = library_read(folder / fname)
            if tensors is None or name not in tensors:
                return Outcome(category, "bug", f"accepted an index naming {fname!r} for {name!r}")
            lib[name] = tensors[name]
    except Exception as exc:
        return Outcome(category, "bug", f"accepted an index we cannot read back: {exc}")
    if set(lib) != set(ours) or not all(same_bits(ours[k], lib[k]) for k in ours):
        return Outcome(category, "bug", "read differently from what the index names")
    return Outcome(category, "accepted")


# ---------------------------------------------------------------------------------- merges
SIZES = dict(vocab=29, hidden=8, intermediate=12, layers=2, heads=2, kv_heads=1)


@dataclass
class Family:
    root: Path
    dirs: dict = field(default_factory=dict)


def make_models(root: Path) -> Family:
    from m3kernels.synthetic import fine_tune, llama_config, llama_tensors, write_checkpoint

    fam = Family(root)
    base = llama_tensors(seed=1, **SIZES)
    cfg = llama_config(**SIZES)
    fam.dirs["base"] = write_checkpoint(root / "base", base, shards=2, config=cfg)
    for i in (1, 2, 3):
        fam.dirs[f"ft{i}"] = write_checkpoint(root / f"ft{i}", fine_tune(base, 10 + i), shards=i, config=cfg)
    return fam


def expected(cfg_dict, thresholds) -> dict:
    """merge_tensors tensor by tensor (test_checkpoint_merge.expected_merge)."""
    from test_checkpoint_merge import expected_merge

    return expected_merge(cfg_dict, thresholds=thresholds, num_layers=SIZES["layers"])


def load_out(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for p in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(p)))
    return out


def run_merge_case(category: str, cfg, out: Path, *, check=True) -> Outcome:
    import m3kernels

    if out.exists():
        shutil.rmtree(out)
    try:
        result = m3kernels.merge_checkpoints(cfg, out, device="cpu", progress=False, out_shard_size=2000)
    except M3KError as exc:
        msg = str(exc)
        return Outcome(
            category, "bug" if "\n" in msg else "rejected", "message is not one line" if "\n" in msg else msg
        )
    if not check:
        return Outcome(category, "merged")
    got = load_out(out)
    want = expected(cfg, result.thresholds)
    if set(got) != set(want):
        return Outcome(
            category, "bug", f"merged tensors {sorted(set(got) ^ set(want))} differ from the reference"
        )
    bad = [n for n in want if not same_bits(got[n], want[n])]
    if bad:
        return Outcome(category, "bug", f"{len(bad)} tensor(s) differ from merge_tensors, first {bad[0]!r}")
    return Outcome(category, "merged")


METHODS = [
    "linear",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "TIES",
    "slerp",
    "nuzzle",
    "",
    None,
    7,
    ["ties"],
]
PARAM_VALUES = [
    0,
    1,
    0.5,
    0.2,
    -1,
    2,
    1e308,
    float("nan"),
    float("inf"),
    "0.5",
    [0.1, 0.9],
    [0.5],
    [0.1, 0.5, 0.9],
    {"filter": "mlp", "value": 0.3},
    [{"filter": "self_attn", "value": 0.1}, {"value": 0.7}],
    None,
    True,
    10**30,
    [],
    {},
    "x",
    -0.0,
    1e-300,
    0.999999,
]
PARAMS = ["density", "weight", "lambda", "epsilon", "normalize", "rescale", "drop_rate", "bogus"]


def params_config(rng: random.Random, fam: Family) -> dict:
    """A merge config: valid settings drawn at random, then (most of the time) a few odd values."""
    method = rng.choice(METHODS[:5])
    wild = rng.random() < 0.6  # else every value is a valid one
    models = []
    for i in rng.sample([1, 2, 3], rng.choice([1, 2, 2, 3])):
        params = {"weight": round(rng.uniform(0.1, 1.5), 3)}
        if method in ("ties", "dare_ties", "dare_linear"):
            params["density"] = round(rng.uniform(0.1, 1), 2)
        if wild and rng.random() < 0.5:
            params[rng.choice(PARAMS)] = rng.choice(PARAM_VALUES)
        models.append({"model": str(fam.dirs[f"ft{i}"]), "parameters": params})
    cfg = {"merge_method": method, "models": models, "seed": rng.randrange(2**32)}
    if method != "linear" or rng.random() < 0.3:
        cfg["base_model"] = str(fam.dirs["base"])
    if rng.random() < 0.3:
        cfg["mixup"] = {"alpha": round(rng.uniform(0.1, 2), 2), "seed": rng.randrange(2**32)}
    if method in ("ties", "dare_ties") and rng.random() < 0.3:
        cfg["trim_scope"] = rng.choice(["tensor", "model"])
    if rng.random() < 0.3:
        cfg["dtype"] = rng.choice(["float16", "bfloat16", "float32"])
    if wild:
        if rng.random() < 0.3:
            cfg["merge_method"] = rng.choice(METHODS)
        for key, values in [
            ("seed", [0, 2**32 - 1, 2**32, -1, 2**64, "x", 1.5, None, 10**50]),
            ("dtype", ["int8", "fp8", 3, None, "float64"]),
            ("out_dtype", ["float16", "bfloat16", "float32", "float64", "x"]),
            ("trim_scope", ["layer", 1, None, "model"]),
            (
                "mixup",
                [
                    {"alpha": -1},
                    {"alpha": 0.5},
                    True,
                    None,
                    {"alpha": float("nan")},
                    {"alpha": 1e308, "seed": 2**70},
                    "yes",
                    {"alpha": 0.5, "beta": 1},
                ],
            ),
            (
                "parameters",
                [
                    {"normalize": True},
                    {"normalize": "no"},
                    {"lambda": 0.7},
                    {"epsilon": 0.1},
                    [],
                    None,
                    {"rescale": "l1"},
                ],
            ),
        ]:
            if rng.random() < 0.15:
                cfg[key] = rng.choice(values)
    return cfg


def params_case(rng, category, work: Path, fam: Family) -> Outcome:
    return run_merge_case(category, params_config(rng, fam), work / "out")


def config_case(rng, category, work: Path, fam: Family) -> Outcome:
    """A model whose config.json is mutated, merged as the base."""
    folder = work / "cfgmodel"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(fam.dirs["base"], folder)
    good = json.loads((folder / "config.json").read_text())
    op = rng.randrange(7)
    if op == 0:
        raw = dump(rng.choice([[], "x", 1, None])).encode()
    elif op == 1:
        raw = dump(
            Obj(
                list(good.items())
                + [("num_hidden_layers", rng.choice([2, 10**30, -5, "2", 2**31, 2**31 - 1, 1.5, None]))]
            )
        ).encode()
    elif op == 2:
        raw = dump({**good, "nested": nested(rng.choice([10, 63, 64, 65, 500, 5000]), "object")}).encode()
    elif op == 3:
        raw = json.dumps(good).encode()
        i = rng.randrange(len(raw))
        raw = raw[:i] + rng.choice([b"\xff", b"\xc3", b"\x00", b"\xed\xa0\x80"]) + raw[i:]
    elif op == 4:
        raw = json.dumps(
            {**good, "vocab_size": rng.choice([10**4000 if False else 10**39, -1, 2**31])}
        ).encode()
    elif op == 5:
        raw = json.dumps({**good, "rope_theta": float("nan"), "x": float("inf")}).encode()
    else:
        raw = json.dumps({**good, "tie_word_embeddings": rng.choice([False, "no", None, 1])}).encode()
    (folder / "config.json").write_bytes(raw)
    ours, err = our_read(folder, role="fuzz")
    if ours is None:
        problem = _check_message(err, folder)
        return Outcome(category, "bug" if problem else "rejected", problem or err)
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(folder),
        "models": [{"model": str(fam.dirs["ft1"])}, {"model": str(fam.dirs["ft2"])}],
    }
    return run_merge_case(category, cfg, work / "out", check=False)


INDEX_CATEGORIES = ["index-map", "index-names", "index-json", "index-meta"]
CATEGORIES = list(HEADER_MUTATORS) + INDEX_CATEGORIES + ["config", "params"]
WEIGHTS = (
    {c: 1.0 for c in HEADER_MUTATORS} | {c: 1.0 for c in INDEX_CATEGORIES} | {"config": 1.0, "params": 4.0}
)


def run_case(rng: random.Random, category: str, work: Path, fam: Family) -> Outcome:
    if category in HEADER_MUTATORS:
        return header_case(rng, category, work)
    if category in INDEX_CATEGORIES:
        return index_case(rng, category, work)
    if category == "config":
        return config_case(rng, category, work, fam)
    return params_case(rng, category, work, fam)


def run_cases(n: int, work: Path, *, seed: int = SEED, limit_s: float = CASE_LIMIT_S, on_case=None) -> list:
    """``n`` cases (categories drawn by WEIGHTS from ``seed``); returns their Outcomes."""
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    fam = make_models(work / "models")
    cats, weights = zip(*WEIGHTS.items())
    outcomes = []
    for k in range(n):
        category = rng.choices(cats, weights)[0]
        case_rng = random.Random(rng.getrandbits(64))
        t0 = time.perf_counter()
        try:
            with time_limit(limit_s):
                out = run_case(case_rng, category, work, fam)
        except CaseTimeout:
            out = Outcome(category, "bug", f"case {k} took more than {limit_s} s")
        except Exception as exc:  # an internal error: what no input may cause
            out = Outcome(category, "bug", f"case {k}: {type(exc).__name__}: {exc}"[:2000])
        out.seconds = time.perf_counter() - t0
        outcomes.append(out)
        if on_case is not None:
            on_case(k, out)
    return outcomes


def summary(outcomes) -> dict:
    """{category: {outcome: count, ..., 'cases', 'ms_mean', 'ms_max'}}."""
    table = collections.defaultdict(lambda: collections.Counter())
    times = collections.defaultdict(list)
    for o in outcomes:
        table[o.category][o.outcome] += 1
        times[o.category].append(o.seconds)
    out = {}
    for c in sorted(table, key=CATEGORIES.index):
        t = times[c]
        out[c] = dict(table[c]) | {
            "cases": len(t),
            "ms_mean": 1000 * sum(t) / len(t),
            "ms_max": 1000 * max(t),
        }
    return out


# ---------------------------------------------------------------------------------- the test
def test_fuzzed_inputs_end_in_a_clean_error_or_a_correct_result(tmp_path):
    """CASES seeded cases: no internal error, no signal, no hang; stricter than the library only
    for the documented reasons; every category exercised, most of them both ways."""
    t0 = time.perf_counter()
    outcomes = run_cases(CASES, tmp_path)
    bugs = [o for o in outcomes if o.outcome == "bug"]
    assert not bugs, "\n".join(f"{o.category}: {o.detail}" for o in bugs[:20])
    table = summary(outcomes)
    print(json.dumps(table, indent=1), f"{time.perf_counter() - t0:.1f} s")
    if CASES >= 1000:
        assert set(table) == set(CATEGORIES)
        total = collections.Counter()
        for row in table.values():
            total.update(
                {k: v for k, v in row.items() if k in ("accepted", "rejected", "stricter", "merged")}
            )
        assert total["rejected"] > CASES // 3 and total["accepted"] + total["merged"] > CASES // 10, total
        for cat in ("offsets", "dtype", "shape", "nesting", "params", "index-names"):
            assert table[cat].get("rejected", 0) > 0, (cat, table[cat])


def test_fuzz_cases_are_reproducible(tmp_path):
    a = [(o.category, o.outcome, o.detail) for o in run_cases(40, tmp_path / "a", seed=5)]
    b = [
        (o.category, o.outcome, o.detail.replace(str(tmp_path / "b"), str(tmp_path / "a")))
        for o in run_cases(40, tmp_path / "b", seed=5)
    ]
    assert a == b
