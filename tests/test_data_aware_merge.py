"""Fisher-weighted averaging and RegMean: the tensor functions against their float64 references and
against first principles (equal Fisher = weighted average; the RegMean layer minimises
Σᵢ‖XᵢWᵀ − XᵢWᵢᵀ‖², identity Grams = average, one model = that model), bad inputs, and the
streamed checkpoint merge on a tiny Llama with statistics computed from data."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from m3kernels.merge.data_aware import (  # noqa: E402
    SingularSystemError,
    fisher_merge,
    fisher_merge_reference,
    fisher_norm_scales,
    regmean_merge,
    regmean_merge_reference,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}  # relative to max |θ|


def poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def assert_close(got, want, dtype, scale=None):
    scale = float(want.abs().max()) if scale is None else scale
    err = float((got.double() - want.double()).abs().max())
    assert err <= TOL[dtype] * max(scale, 1e-30), (err, scale)


# ------------------------------------------------------------------------------------ fisher
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("floor_mode", ["max", "add"])
def test_fisher_matches_float64_reference(gen, dtype, n, floor_mode):
    shape = (37, 53)  # odd sizes, several chunks of 500
    models = [torch.randn(shape, generator=gen).to(dtype) for _ in range(n)]
    fishers = [
        (torch.rand(shape, generator=gen) ** 4 * 1e-3).to(dtype if dtype != torch.float16 else torch.float32)
        for _ in range(n)
    ]
    fishers[0].view(-1)[:50] = 0  # the floor decides there
    kw = dict(
        weights=[0.5 + i for i in range(n)],
        mix_ratios=[1.0 / (i + 1) for i in range(n)],
        model_scales=[1.0 + 0.1 * i for i in range(n)],
        floor=1e-5,
        floor_mode=floor_mode,
    )
    out = poisoned(shape, dtype)
    got = fisher_merge(models, fishers, out=out, chunk=500, **kw)
    assert got is out and not torch.isnan(out).any()
    assert_close(got, fisher_merge_reference(models, fishers, **kw), dtype)


def test_fisher_with_equal_f_is_the_weighted_average(gen):
    models = [torch.randn(101, generator=gen) for _ in range(3)]
    f = torch.rand(101, generator=gen) + 0.1
    w = [0.2, 1.0, 3.0]
    got = fisher_merge(models, [f, f, f], weights=w)
    want = sum(wi * m.double() for wi, m in zip(w, models)) / sum(w)
    assert_close(got, want, torch.float32)


def test_fisher_floor_and_zero_fisher(gen):
    a, b = torch.randn(64, generator=gen), torch.randn(64, generator=gen)
    fa, fb = torch.zeros(64), torch.full((64,), 1e-3)
    # floor 0: model b alone where only it has Fisher; both zero -> plain (weighted) average
    assert_close(fisher_merge([a, b], [fa, fb], floor=0.0), b, torch.float32)
    got = fisher_merge([a, b], [fa, fa], floor=0.0, weights=[1.0, 3.0])
    assert_close(got, (a.double() + 3 * b.double()) / 4, torch.float32)
    # a large floor turns it into the average
    assert_close(
        fisher_merge([a, b], [fa, fb], floor=1e3), (a.double() + b.double()) / 2, torch.float32, scale=1.0
    )


def test_fisher_norm_scales_fusionbench_rule():
    s = fisher_norm_scales([1.0, 3.0], eps=0.0)
    assert s == pytest.approx([0.75, 0.25])


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(floor=-1.0), "floor must be a finite number >= 0"),
        (dict(floor_mode="min"), "floor_mode must be"),
        (dict(weights=[0.0, 0.0]), "all 0"),
        (dict(weights=[1.0, -1.0]), "finite and >= 0"),
        (dict(chunk=0), "chunk"),
    ],
)
def test_fisher_bad_parameters(kwargs, words):
    m = [torch.zeros(4), torch.ones(4)]
    with pytest.raises(ValueError, match=words):
        fisher_merge(m, [torch.ones(4), torch.ones(4)], **kwargs)


def test_fisher_bad_tensors():
    m = [torch.zeros(4), torch.ones(4)]
    with pytest.raises(ValueError, match=r"fishers\[1\] has shape \(5,\), expected \(4,\)"):
        fisher_merge(m, [torch.ones(4), torch.ones(5)])
    with pytest.raises(ValueError, match="1 given for 2 models"):
        fisher_merge(m, [torch.ones(4)])
    with pytest.raises(ValueError, match="dtype"):
        fisher_merge([torch.zeros(4, dtype=torch.int32)], [torch.ones(4)])


# ------------------------------------------------------------------------------------ regmean
def layer_data(gen, n, tokens=(60, 45, 80), d_in=13, d_out=7, dtype=torch.float32):
    xs = [torch.randn(tokens[i % len(tokens)], d_in, generator=gen, dtype=torch.float64) for i in range(n)]
    ws = [torch.randn(d_out, d_in, generator=gen).to(dtype) for _ in range(n)]
    return xs, ws, [x.T @ x for x in xs]


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("n", [2, 3])
def test_regmean_minimises_the_regression_loss(gen, precision, n):
    """α = 1: W = argmin Σᵢ cᵢ‖XᵢWᵀ − XᵢWᵢᵀ‖²: a least-squares solve on the stacked, √c-scaled data."""
    xs, ws, grams = layer_data(gen, n)
    c = [1.0 + i for i in range(n)]
    x = torch.cat([ci**0.5 * xi for ci, xi in zip(c, xs)])
    y = torch.cat([ci**0.5 * xi @ wi.double().T for ci, xi, wi in zip(c, xs, ws)])
    lstsq = torch.linalg.lstsq(x, y).solution.T
    got = regmean_merge(ws, grams, weights=c, alpha=1.0, precision=precision, out_dtype=torch.float32)
    assert_close(got, lstsq, torch.float32 if precision == "float64" else torch.float16)
    assert_close(regmean_merge_reference(ws, grams, weights=c, alpha=1.0), lstsq, torch.float32)

    def loss(w):
        return sum(
            ci * float(((xi @ w.double().T - xi @ wi.double().T) ** 2).sum()) for ci, xi, wi in zip(c, xs, ws)
        )

    best = loss(lstsq)
    for _ in range(3):
        assert loss(lstsq + 1e-3 * torch.randn(lstsq.shape, generator=gen, dtype=torch.float64)) > best


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [0.9, 0.3, 0.0])
def test_regmean_matches_float64_reference(gen, dtype, alpha):
    xs, ws, grams = layer_data(gen, 3, dtype=dtype)
    grams = [g.float() for g in grams]
    kw = dict(mix_ratios=[0.5, 0.3, 0.2], weights=[1.0, 2.0, 1.0], alpha=alpha, ridge=1e-3)
    got = regmean_merge(ws, grams, **kw)
    assert got.dtype == dtype
    assert_close(got, regmean_merge_reference(ws, grams, **kw), dtype)


def test_regmean_identity_grams_is_the_average_and_one_model_is_itself(gen):
    _, ws, grams = layer_data(gen, 3)
    eye = [torch.eye(13) for _ in range(3)]
    assert_close(regmean_merge(ws, eye), sum(w.double() for w in ws) / 3, torch.float32)
    for dtype in DTYPES:
        w = ws[0].to(dtype)
        got = regmean_merge([w], [grams[0]])
        assert got.dtype == dtype
        assert_close(got, w, torch.float32 if dtype == torch.float32 else dtype)


def test_regmean_transposed_convention(gen):
    _, ws, grams = layer_data(gen, 2)
    a = regmean_merge(ws, grams, alpha=0.5)
    b = regmean_merge([w.T.contiguous() for w in ws], grams, alpha=0.5, transposed=True)
    assert_close(b.T, a.double(), torch.float32)


def test_regmean_singular_system_names_the_layer(gen):
    _, ws, grams = layer_data(gen, 2)
    x = torch.randn(5, 13, generator=gen, dtype=torch.float64)  # 5 tokens for 13 features: rank 5
    low = [x.T @ x, x.T @ x]
    with pytest.raises(
        SingularSystemError, match="layer model.layers.3.mlp.down_proj.weight.*lower alpha.*ridge"
    ):
        regmean_merge(ws, low, alpha=1.0, name="model.layers.3.mlp.down_proj.weight")
    regmean_merge(ws, low, alpha=0.9)  # the off-diagonal scaling regularises it
    dead = [g.clone() for g in grams]
    for g in dead:  # one input feature never active: alpha cannot help, ridge does
        g[4, :] = 0
        g[:, 4] = 0
    with pytest.raises(SingularSystemError, match="layer q"):
        regmean_merge(ws, dead, alpha=0.5, name="q", precision="float32")
    got = regmean_merge(ws, dead, alpha=0.5, ridge=1e-4)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(alpha=1.5), r"alpha must be a number in \[0.0, 1.0\]"),
        (dict(ridge=-1.0), "ridge must be"),
        (dict(precision="float16"), "precision"),
    ],
)
def test_regmean_bad_parameters(gen, kwargs, words):
    _, ws, grams = layer_data(gen, 2)
    with pytest.raises(ValueError, match=words):
        regmean_merge(ws, grams, **kwargs)
    with pytest.raises(ValueError, match=r"grams\[1\] has shape \(7, 7\), expected \(13, 13\)"):
        regmean_merge(ws, [grams[0], torch.eye(7)])


# ------------------------------------------------------------------------------- checkpoints
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from safetensors.torch import load_file, save_file  # noqa: E402

from m3kernels.datastats import compute_fisher, compute_regmean, merge_checkpoints_data_aware  # noqa: E402
from m3kernels.datastats.tiny import fine_tune, make_tiny_llama, sample_texts  # noqa: E402
from m3kernels.errors import M3KError  # noqa: E402


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_family")
    make_tiny_llama(root / "base", sample_texts(48), steps=6, vocab_size=120)
    for i in (1, 2):
        fine_tune(root / "base", root / f"ft{i}", sample_texts(48, seed=10 + i), steps=3, seed=i)
        (root / f"d{i}.txt").write_text("\n".join(sample_texts(6, seed=20 + i)) + "\n")
        compute_fisher(root / f"ft{i}", root / f"d{i}.txt", root / f"fisher{i}", batch_size=3, progress=False)
        compute_regmean(root / f"ft{i}", root / f"d{i}.txt", root / f"gram{i}", batch_size=3, progress=False)
    return root


def folder_tensors(path):
    return load_file(str(path / "model.safetensors"))


def test_checkpoint_fisher_merge_equals_the_reference(fam, tmp_path):
    out = tmp_path / "merged"
    rec = merge_checkpoints_data_aware(
        "fisher",
        [fam / "ft1", fam / "ft2"],
        [fam / "fisher1", fam / "fisher2"],
        out,
        weights=[1.0, 2.0],
        mix_ratios=[0.7, 0.3],
        normalize="l2",
        progress=False,
    )
    got = folder_tensors(out)
    ms = [folder_tensors(fam / f"ft{i}") for i in (1, 2)]
    fs = [load_file(str(fam / f"fisher{i}" / "fisher-00001.safetensors")) for i in (1, 2)]
    norms = [sum(float(t.double().square().sum()) for t in f.values()) ** 0.5 for f in fs]
    scales = fisher_norm_scales(norms)
    assert rec["options"]["model_scales"] == pytest.approx(scales)
    assert set(got) == set(ms[0])
    for name in ms[0]:
        want = fisher_merge_reference(
            [m[name] for m in ms],
            [f[name] for f in fs],
            weights=[1.0, 2.0],
            mix_ratios=[0.7, 0.3],
            model_scales=scales,
        )
        assert_close(got[name], want, torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 7]])).logits).all()
    assert json.loads((out / "m3kernels_merge.json").read_text())["merge_method"] == "fisher"


def test_checkpoint_regmean_merge_equals_the_reference(fam, tmp_path):
    out = tmp_path / "merged"
    rec = merge_checkpoints_data_aware(
        "regmean",
        [fam / "ft1", fam / "ft2"],
        [fam / "gram1", fam / "gram2"],
        out,
        mixup_alpha=2.0,
        seed=4,
        shard_size=20_000,
        progress=False,
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    got = {}
    for f in sorted(set(index.values())):
        got.update(load_file(str(out / f)))
    ms = [folder_tensors(fam / f"ft{i}") for i in (1, 2)]
    mans = [json.loads((fam / f"gram{i}" / "manifest.json").read_text()) for i in (1, 2)]
    gs = [load_file(str(fam / f"gram{i}" / "regmean-00001.safetensors")) for i in (1, 2)]
    r = rec["mix_ratios"]
    assert len(r) == 2 and rec["regmean_layers"] == len(mans[0]["layers"]) == 15
    for name in ms[0]:
        if name in mans[0]["layers"]:
            want = regmean_merge_reference(
                [m[name] for m in ms], [g[man["layers"][name]] for g, man in zip(gs, mans)], mix_ratios=r
            )
        else:
            want = sum(ri * m[name].double() for ri, m in zip(r, ms)) / sum(r)
        assert_close(got[name], want, torch.float32)
    transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)


def test_checkpoint_merge_bad_inputs(fam, tmp_path):
    models = [fam / "ft1", fam / "ft2"]
    with pytest.raises(M3KError, match="statistics 0: .*fisher2 was computed from another model"):
        merge_checkpoints_data_aware(
            "fisher", models, [fam / "fisher2", fam / "fisher1"], tmp_path / "a", progress=False
        )
    with pytest.raises(M3KError, match="holds regmean statistics, fisher ones are needed"):
        merge_checkpoints_data_aware(
            "fisher", models, [fam / "gram1", fam / "gram2"], tmp_path / "b", progress=False
        )
    # a statistics file without one parameter, then with one of the wrong shape
    import shutil

    bad = tmp_path / "fisher2"
    shutil.copytree(fam / "fisher2", bad)
    t = load_file(str(bad / "fisher-00001.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    save_file({k: v for k, v in t.items() if k != name}, str(bad / "fisher-00001.safetensors"))
    with pytest.raises(M3KError, match=f"statistics 1: .*has no Fisher tensor '{name}'"):
        merge_checkpoints_data_aware("fisher", models, [fam / "fisher1", bad], tmp_path / "c", progress=False)
    t[name] = torch.zeros(3, 3)
    save_file(t, str(bad / "fisher-00001.safetensors"))
    with pytest.raises(M3KError, match=f"Fisher tensor '{name}' has shape \\(3, 3\\), expected"):
        merge_checkpoints_data_aware("fisher", models, [fam / "fisher1", bad], tmp_path / "d", progress=False)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folder left
    with pytest.raises(M3KError, match="1 statistics folders for 2 models"):
        merge_checkpoints_data_aware("regmean", models, [fam / "gram1"], tmp_path / "e", progress=False)
    with pytest.raises(M3KError, match="alpha must be"):
        merge_checkpoints_data_aware(
            "regmean", models, [fam / "gram1", fam / "gram2"], tmp_path / "f", alpha=2.0, progress=False
        )
    (tmp_path / "g").mkdir()
    with pytest.raises(M3KError, match="exists"):
        merge_checkpoints_data_aware(
            "regmean", models, [fam / "gram1", fam / "gram2"], tmp_path / "g", progress=False
        )
    for out in (fam / "ft2", fam / "gram1" / "sub", fam):
        with pytest.raises(M3KError, match="would be inside, equal to or a parent of the"):
            merge_checkpoints_data_aware(
                "regmean", models, [fam / "gram1", fam / "gram2"], out, force=True, progress=False
            )
    assert (fam / "ft2" / "model.safetensors").exists()
    with pytest.raises(M3KError, match="no manifest.json"):
        merge_checkpoints_data_aware(
            "regmean", models, [fam / "gram1", tmp_path / "g"], tmp_path / "h", progress=False
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_against_the_reference(gen):
    models = [torch.randn(333, 77, generator=gen).bfloat16() for _ in range(3)]
    fishers = [torch.rand(333, 77, generator=gen) * 1e-2 for _ in range(3)]
    want = fisher_merge_reference(models, fishers, weights=[1.0, 2.0, 0.5])
    got = fisher_merge(
        [m.cuda() for m in models], [f.cuda() for f in fishers], weights=[1.0, 2.0, 0.5], chunk=4096
    )
    assert got.is_cuda
    assert_close(got.cpu(), want, torch.bfloat16)
    xs, ws, grams = layer_data(gen, 3)
    want = regmean_merge_reference(ws, grams, alpha=0.9)
    got = regmean_merge(
        [w.cuda() for w in ws], [g.float().cuda() for g in grams], alpha=0.9, precision="float32"
    )
    assert got.is_cuda
    assert_close(got.cpu(), want, torch.float16)


def test_checkpoint_regmean_named_fallback_goes_through_merge_tensors(fam, tmp_path):
    """fallback='task_arithmetic' with a base: the non-linear tensors are merge_tensors' result."""
    import m3kernels

    out = tmp_path / "merged"
    merge_checkpoints_data_aware(
        "regmean",
        [fam / "ft1", fam / "ft2"],
        [fam / "gram1", fam / "gram2"],
        out,
        weights=[0.6, 0.9],
        base=fam / "base",
        fallback="task_arithmetic",
        fallback_kwargs={"lambda_": 0.8},
        progress=False,
    )
    got = folder_tensors(out)
    base = folder_tensors(fam / "base")
    ms = [folder_tensors(fam / f"ft{i}") for i in (1, 2)]
    layers = json.loads((fam / "gram1" / "manifest.json").read_text())["layers"]
    others = [n for n in base if n not in layers]
    assert others and "model.embed_tokens.weight" in others
    for name in others:
        want = m3kernels.merge_tensors(
            base[name],
            [m[name] for m in ms],
            method="task_arithmetic",
            weights=[0.6, 0.9],
            lambda_=0.8,
            name=name,
        )
        assert torch.equal(got[name], want), name
