"""Bad inputs and failing outputs: one clear error naming the file and tensor, exit status 2,
no traceback without --verbose, and nothing of an existing OUT_DIR damaged.

Covers truncated and corrupt safetensors files (each header check), missing tensors,
mismatched shapes, broken shard indexes, an existing OUT_DIR without --force, an output that
would replace an input, and a full disk (ENOSPC, simulated by patching the writer).
"""

from __future__ import annotations

import errno
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from m3kernels import cli
from m3kernels.checkpoint import writer
from m3kernels.checkpoint.safetensors_io import read_header
from m3kernels.errors import CheckpointError

from checkpoint_factory import fine_tune, llama_tensors, write_checkpoint

SIZES = dict(vocab=29, hidden=8, intermediate=12, layers=2, heads=2, kv_heads=1)


@pytest.fixture
def models(tmp_path):
    """base + two fine-tunes (2 shards each) and a ties config file pointing at them."""
    base = llama_tensors(seed=1, **SIZES)
    dirs = {"base": write_checkpoint(tmp_path / "base", base, shards=2)}
    for i in (1, 2):
        dirs[f"ft{i}"] = write_checkpoint(tmp_path / f"ft{i}", fine_tune(base, 10 + i), shards=2)
    cfg = {
        "merge_method": "ties",
        "base_model": str(dirs["base"]),
        "models": [
            {"model": str(dirs["ft1"]), "parameters": {"density": 0.5}},
            {"model": str(dirs["ft2"]), "parameters": {"density": 0.5}},
        ],
    }
    (tmp_path / "merge.yaml").write_text(json.dumps(cfg))
    dirs["config"] = tmp_path / "merge.yaml"
    dirs["tensors"] = base
    return dirs


def run(capsys, *args):
    """cli.main -> (status, stderr)."""
    status = cli.main([str(a) for a in args])
    return status, capsys.readouterr().err


def merge(capsys, models, out, *extra):
    return run(capsys, "merge", models["config"], out, "--device", "cpu", "--quiet", *extra)


def assert_user_error(status, err, *needles):
    assert status == 2, err
    assert "Traceback" not in err
    assert err.count("m3kernels: error:") == 1
    for n in needles:
        assert str(n) in err, (n, err)


def snapshot(folder: Path) -> dict:
    return {
        p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def shard_of(folder: Path, tensor: str) -> Path:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / index["weight_map"][tensor]


def rewrite_header(path: Path, edit) -> None:
    """Apply ``edit`` to the parsed header JSON of a safetensors file and write it back."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


# ---------------------------------------------------------------------------------- input files
def test_truncated_input(models, tmp_path, capsys):
    shard = shard_of(models["ft1"], "model.norm.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    status, err = merge(capsys, models, tmp_path / "out")
    header = json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])
    header.pop("__metadata__", None)
    last = max(header, key=lambda k: header[k]["data_offsets"][1])  # the tensor cut short
    assert_user_error(status, err, shard, "truncated", last)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.m3k-*"))


def test_corrupt_header_json(models, tmp_path, capsys):
    shard = shard_of(models["ft2"], "model.norm.weight")
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\xff\xfe{["
    shard.write_bytes(bytes(data))
    status, err = merge(capsys, models, tmp_path / "out")
    assert_user_error(status, err, shard, "not valid JSON")
    assert not (tmp_path / "out").exists()


def test_absurd_header_length(models, tmp_path, capsys):
    shard = shard_of(models["base"], "model.norm.weight")
    data = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", 1 << 60) + data[8:])
    status, err = merge(capsys, models, tmp_path / "out")
    assert_user_error(status, err, shard, "header length")


@pytest.mark.parametrize(
    "case,needle",
    [
        ("dtype_size", "needs"),
        ("unknown_dtype", "unknown dtype"),
        ("overlap", "overlaps"),
        ("past_end", "truncated"),
        ("bad_shape", "shape"),
        ("metadata", "__metadata__"),
    ],
)
def test_corrupt_header_entries(models, tmp_path, capsys, case, needle):
    shard = shard_of(models["ft1"], "model.embed_tokens.weight")
    name = "model.embed_tokens.weight"

    def edit(h):
        e = h[name]
        if case == "dtype_size":
            e["shape"] = [e["shape"][0] + 1, e["shape"][1]]
        elif case == "unknown_dtype":
            e["dtype"] = "Q7"
        elif case == "overlap":
            other = next(k for k in h if k not in (name, "__metadata__"))
            h[other]["data_offsets"] = e["data_offsets"]
            h[other]["shape"], h[other]["dtype"] = e["shape"], e["dtype"]
        elif case == "past_end":
            b, end = e["data_offsets"]
            e["data_offsets"] = [b + 10**6, end + 10**6]
        elif case == "bad_shape":
            e["shape"] = [-1, 8]
        elif case == "metadata":
            h["__metadata__"] = {"format": 1}

    rewrite_header(shard, edit)
    status, err = merge(capsys, models, tmp_path / "out")
    assert_user_error(status, err, shard, needle)
    with pytest.raises(CheckpointError) as info:
        read_header(shard)
    assert info.value.path == str(shard)


def test_gap_in_data_is_rejected(tmp_path):
    path = tmp_path / "gap.safetensors"
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]},
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(16))
    with pytest.raises(CheckpointError, match="gap"):
        read_header(path)


def test_missing_tensor(models, tmp_path, capsys):
    tensors = dict(models["tensors"])
    del tensors["model.layers.1.mlp.up_proj.weight"]
    shutil.rmtree(models["ft2"])
    write_checkpoint(models["ft2"], tensors, shards=2)
    status, err = merge(capsys, models, tmp_path / "out")
    assert_user_error(status, err, "model.layers.1.mlp.up_proj.weight", "missing", "model 2", models["ft2"])


def test_extra_tensor_in_a_model(models, tmp_path, capsys):
    tensors = dict(models["tensors"])
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(3, 3)
    shutil.rmtree(models["ft1"])
    write_checkpoint(models["ft1"], tensors)
    status, err = merge(capsys, models, tmp_path / "out")
    assert_user_error(status, err, "model.layers.0.mlp.extra.weight", "model 1", "missing in base")


def test_mismatched_shapes(models, tmp_path, capsys):
    tensors = dict(models["tensors"])
    tensors["model.layers.0.mlp.down_proj.weight"] = torch.zeros(8, 13, dtype=torch.bfloat16)
    shutil.rmtree(models["ft1"])
    write_checkpoint(models["ft1"], tensors, shards=2)
    status, err = merge(capsys, models, tmp_path / "out")
    assert_user_error(
        status,
        err,
        "model.layers.0.mlp.down_proj.weight",
        "different shapes",
        "[8, 13]",
        "[8, 12]",
        "model 1",
        "base",
    )


def _rewrite(models, key, edit, **kw):
    tensors = dict(models["tensors"])
    edit(tensors)
    shutil.rmtree(models[key])
    write_checkpoint(models[key], tensors, shards=2, **kw)


@pytest.mark.parametrize("dtype", [torch.int64, torch.float64])
def test_copied_tensors_are_still_checked_for_presence_and_shape(models, tmp_path, capsys, dtype):
    """Int buffers (and float64 ones we only copy) must exist alike in every model (docs/SPEC.md §4)."""
    buf = "model.rotary_emb.buf"
    for key, n in (("base", 5), ("ft1", 7), ("ft2", 5)):
        _rewrite(models, key, lambda t, n=n: t.__setitem__(buf, torch.arange(n).to(dtype)))
    status, err = merge(capsys, models, tmp_path / "out")
    assert_user_error(status, err, buf, "different shapes", "model 1")
    _rewrite(models, "ft1", lambda t: t.pop(buf, None))
    status, err = merge(capsys, models, tmp_path / "out")
    assert_user_error(status, err, buf, "missing", "model 1")


def test_missing_head_of_an_untied_model_is_an_error(models, tmp_path, capsys):
    """A model whose config says tie_word_embeddings: false may not borrow its embedding as a head."""
    head = "lm_head.weight"
    if head not in models["tensors"]:
        pytest.skip("factory models have no separate head")
    _rewrite(models, "ft1", lambda t: t.pop(head), config={"tie_word_embeddings": False})
    status, err = merge(capsys, models, tmp_path / "out")
    assert_user_error(status, err, head, "missing", "model 1")


def test_vocab_rule_needs_equal_columns(models, tmp_path, capsys):
    tensors = dict(models["tensors"])
    tensors["lm_head.weight"] = torch.zeros(30, 9, dtype=torch.bfloat16)
    shutil.rmtree(models["ft1"])
    write_checkpoint(models["ft1"], tensors)
    status, err = merge(capsys, models, tmp_path / "out")
    assert_user_error(status, err, "lm_head.weight", "different shapes")


def test_index_names_a_missing_shard(models, tmp_path, capsys):
    shard = shard_of(models["ft1"], "model.norm.weight")
    shard.unlink()
    status, err = merge(capsys, models, tmp_path / "out")
    assert_user_error(status, err, shard.name, "missing")


def test_index_with_path_escape(models, tmp_path, capsys):
    index = models["ft1"] / "model.safetensors.index.json"
    obj = json.loads(index.read_text())
    obj["weight_map"]["model.norm.weight"] = "../base/" + obj["weight_map"]["model.norm.weight"]
    index.write_text(json.dumps(obj))
    status, err = merge(capsys, models, tmp_path / "out")
    assert_user_error(status, err, index, "plain relative path")


def test_missing_model_folder(models, tmp_path, capsys):
    shutil.rmtree(models["ft2"])
    status, err = merge(capsys, models, tmp_path / "out")
    assert_user_error(status, err, models["ft2"], "does not exist")


def test_bad_config_is_a_user_error(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("merge_method: slerp\nmodels: [{model: a}, {model: b}]\n")
    status, err = run(capsys, "merge", tmp_path / "bad.yaml", tmp_path / "out")
    assert_user_error(status, err, "slerp")


def test_verbose_shows_the_traceback(models, tmp_path, capsys):
    shutil.rmtree(models["ft2"])
    status, err = merge(capsys, models, tmp_path / "out", "--verbose")
    assert status == 2 and "Traceback" in err and "does not exist" in err


# ---------------------------------------------------------------------------------- the output
def test_existing_out_dir_needs_force(models, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    before = snapshot(out)
    status, err = merge(capsys, models, out)
    assert_user_error(status, err, out, "--force")
    assert snapshot(out) == before
    assert not list(tmp_path.glob(".out.m3k-*"))
    status, err = merge(capsys, models, out, "--force")
    assert status == 0, err
    assert not (out / "precious.txt").exists() and (out / "model.safetensors").exists()
    assert not list(tmp_path.glob(".out.m3k-*"))


def test_out_dir_may_not_be_an_input(models, capsys):
    before = snapshot(models["ft1"])
    status, err = merge(capsys, models, models["ft1"], "--force")
    assert_user_error(status, err, "would replace the input")
    assert snapshot(models["ft1"]) == before


def test_disk_full_keeps_existing_out_dir(models, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old merge")
    before = snapshot(out)
    real = writer._write_bytes
    calls = [0]

    def full_disk(f, data):
        calls[0] += 1
        if calls[0] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, data)

    monkeypatch.setattr(writer, "_write_bytes", full_disk)
    status, err = merge(capsys, models, out, "--force", "--out-shard-size", "1K")
    assert_user_error(status, err, "no space left", ".safetensors", "tensor '", "--resume")
    assert snapshot(out) == before
    # the unfinished merge is kept for --resume, and it completes once there is space again
    assert len(list(tmp_path.glob(".out.m3k-tmp-*"))) == 1
    monkeypatch.setattr(writer, "_write_bytes", real)
    status, err = merge(capsys, models, out, "--force", "--out-shard-size", "1K", "--resume")
    assert status == 0, err
    assert not list(tmp_path.glob(".out.m3k-tmp-*"))
    assert not (out / "old.txt").exists()


def test_dry_run_writes_nothing(models, tmp_path, capsys):
    before = sorted(p.name for p in tmp_path.iterdir())
    status = cli.main(
        ["merge", str(models["config"]), str(tmp_path / "out"), "--dry-run", "--out-shard-size", "2K"]
    )
    out = capsys.readouterr().out
    assert status == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert "model.layers.1.mlp.up_proj.weight" in out and "dry run: nothing written" in out
    assert "model-00001-of-" in out


def test_dry_run_reports_bad_inputs(models, tmp_path, capsys):
    tensors = dict(models["tensors"])
    tensors["model.layers.0.mlp.down_proj.weight"] = torch.zeros(8, 13, dtype=torch.bfloat16)
    shutil.rmtree(models["ft1"])
    write_checkpoint(models["ft1"], tensors)
    status, err = merge(capsys, models, tmp_path / "out", "--dry-run")
    assert_user_error(status, err, "model.layers.0.mlp.down_proj.weight")
