"""The mergekit config corpus (issue 9's measure of done): real mergekit configs, kept verbatim in
tests/data/mergekit_configs/ (first line ``# source: ...``), each run unchanged but for its model
names through ``m3kernels merge --dry-run`` and a real merge.

Only the model references are rewritten (``models[].model``, ``slices[].sources[].model``,
``modules.*.slices``, ``base_model``, ``tokenizer_source`` / ``tokenizer.source`` and the token
sources when they name a model; ``MODEL+LORA`` on both sides of the ``+``); everything else is
the config as published. Each name becomes a generated stand-in checkpoint
(:mod:`m3kernels.synthetic`: a tiny Llama, hidden size 8, seeded by the name, with a real tiny
BPE tokenizer) with the right layer count: the largest ``layer_range`` end that config uses
the model with, else 32 (the layer count of the 7B/8B models most configs name); a LoRA name
becomes a PEFT adapter for its base's shapes. The names of earlier documents of a multi-document
file (mergekit-multi) are left as they are.

Configs that cannot run yet are listed in :data:`EXPECTED_FAILURES` with the reason (a substring
of the error): the test fails when a listed config starts to run (shrink the table) or an
unlisted one fails. ``python tests/test_mergekit_corpus.py`` runs the corpus and rewrites
docs/MERGEKIT_CORPUS.md (the table and the share that runs unchanged).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from m3kernels import synthetic
from m3kernels.cli import main

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "data" / "mergekit_configs"
DOC = ROOT / "docs" / "MERGEKIT_CORPUS.md"
DEFAULT_LAYERS = 32
TINY = dict(hidden=8, intermediate=12, heads=2, kv_heads=1)
KEYWORDS = ("base", "union")  # tokenizer sources that are not model names

# config file stem -> (reason, substring of the error it stops with, whether mergekit 0.1.5 runs it:
# checked once by running mergekit-yaml / mergekit-multi on the same stand-ins)
_SLERP_BASE = (
    "slerp whose base_model is not one of the slice's two sources (three inputs); mergekit 0.1.5 "
    "fails too ('Base input is not present in merge inputs'); older mergekit ran it",
    "method 'slerp' takes exactly 1 model(s) besides the base model, got 2",
    False,
)
EXPECTED_FAILURES: dict[str, tuple[str, str, bool]] = {
    "hf__Dr_Samantha-7B": _SLERP_BASE,
    "hf__OpenHermes-2.5-neural-chat-v3-3-Slerp": _SLERP_BASE,
    "hf__SauerkrautLM-UNA-SOLAR-Instruct": _SLERP_BASE,
    "hf__Seraph-7B": _SLERP_BASE,
    "hf__Seraph-openchat-3.5-1210-Slerp": _SLERP_BASE,
    "hf__mistral-ft-optimized-1218": _SLERP_BASE,
    "hf__openchat-3.5-1210-Seraph-Slerp": _SLERP_BASE,
    "hf__Nous-Hermes-2-SUS-Chat-34B-Slerp": (
        "slerp with a base outside the slice's sources (mergekit 0.1.5 fails too); its `t` is written "
        "at the top level under an empty `parameters:` (an unknown key: ignored, as mergekit does)",
        "method 'slerp' takes exactly 1 model(s) besides the base model, got 2",
        False,
    ),
}


def corpus_files() -> list[Path]:
    return sorted(CORPUS.glob("*.yaml"))


def source_of(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# source: "), f"{path.name}: the first line must be '# source: ...'"
    return first[len("# source: ") :]


def documents(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# ----------------------------------------------------------------------------- model references


def _slices_refs(slices, out: list) -> None:
    for sl in slices or []:
        for src in (sl or {}).get("sources") or []:
            if isinstance(src, dict) and isinstance(src.get("model"), str):
                lr = src.get("layer_range")
                out.append((src["model"], lr[1] if isinstance(lr, list) and len(lr) == 2 else None))


def references(doc: dict) -> list:
    """(model reference, layer_range end or None) for every place a config names a model."""
    out = []
    if isinstance(doc.get("base_model"), str):
        out.append((doc["base_model"], None))
    for m in doc.get("models") or []:
        if isinstance(m, dict) and isinstance(m.get("model"), str):
            out.append((m["model"], None))
    _slices_refs(doc.get("slices"), out)
    for mod in (doc.get("modules") or {}).values():
        if isinstance(mod, dict):
            _slices_refs(mod.get("slices"), out)
    ts = doc.get("tokenizer_source")
    if isinstance(ts, str) and ts not in KEYWORDS:
        out.append((ts, None))
    tok = doc.get("tokenizer")
    if isinstance(tok, dict):
        if isinstance(tok.get("source"), str) and tok["source"] not in KEYWORDS:
            out.append((tok["source"], None))
        for spec in (tok.get("tokens") or {}).values():
            src = spec.get("source") if isinstance(spec, dict) else None
            if isinstance(src, str):
                out.append((src, None))
            elif isinstance(src, dict) and isinstance(src.get("model"), str):
                out.append((src["model"], None))
    return out


def _split(ref: str) -> tuple[str, str | None]:
    parts = ref.split("+")
    return (parts[0], parts[1]) if len(parts) == 2 else (ref, None)


def layer_counts(docs: list) -> dict:
    """{model name: layers of its stand-in} for a config (LoRA references count for their base)."""
    intermediate = {d.get("name") for d in docs if isinstance(d.get("name"), str)}
    need: dict = {}
    for doc in docs:
        for ref, end in references(doc):
            model, _ = _split(ref)
            if ref in intermediate or model in intermediate:
                continue
            need[model] = max(need.get(model, 0), end or 0)
    return {m: (n or DEFAULT_LAYERS) for m, n in need.items()}


def rewrite(docs: list, paths: dict, adapters: dict) -> list:
    """The documents with every model name replaced by its stand-in's path (nothing else changed)."""
    intermediate = {d.get("name") for d in docs if isinstance(d.get("name"), str)}

    def sub(ref):
        if not isinstance(ref, str) or ref in intermediate or ref in KEYWORDS:
            return ref
        model, lora = _split(ref)
        if model in intermediate:
            return ref
        return str(paths[model]) + (f"+{adapters[(model, lora)]}" if lora is not None else "")

    out = []
    for doc in copy.deepcopy(docs):
        if "base_model" in doc:
            doc["base_model"] = sub(doc["base_model"])
        for m in doc.get("models") or []:
            if isinstance(m, dict) and "model" in m:
                m["model"] = sub(m["model"])
        groups = [doc.get("slices")] + [
            mod.get("slices") for mod in (doc.get("modules") or {}).values() if isinstance(mod, dict)
        ]
        for slices in groups:
            for sl in slices or []:
                for src in (sl or {}).get("sources") or []:
                    if isinstance(src, dict) and "model" in src:
                        src["model"] = sub(src["model"])
        if isinstance(doc.get("tokenizer_source"), str):
            doc["tokenizer_source"] = sub(doc["tokenizer_source"])
        tok = doc.get("tokenizer")
        if isinstance(tok, dict):
            if isinstance(tok.get("source"), str):
                tok["source"] = sub(tok["source"])
            for spec in (tok.get("tokens") or {}).values():
                if isinstance(spec, dict) and isinstance(spec.get("source"), str):
                    spec["source"] = sub(spec["source"])
                elif isinstance(spec, dict) and isinstance(spec.get("source"), dict):
                    spec["source"]["model"] = sub(spec["source"].get("model"))
        out.append(doc)
    return out


# ----------------------------------------------------------------------------- stand-ins


class StandIns:
    """Stand-in checkpoints and adapters under ``root``, made once per (name, layers)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._tok_dir = None

    def _tokenizer_dir(self) -> Path:
        if self._tok_dir is None:
            sys.path.insert(0, str(ROOT / "tests"))
            from tokenizer_models import make_tokenizer

            self._tok_dir = self.root / "_tokenizer"
            tok = make_tokenizer()
            tok.save_pretrained(self._tok_dir)
            self.vocab = len(tok.get_vocab())
        return self._tok_dir

    @staticmethod
    def _seed(name: str) -> int:
        return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")

    def shapes(self, layers: int) -> synthetic.LlamaShapes:
        self._tokenizer_dir()
        return synthetic.LlamaShapes(vocab=self.vocab, layers=layers, **TINY)

    def model(self, name: str, layers: int) -> Path:
        folder = (
            self.root / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name)[-80:]}-{self._seed(name):08x}-L{layers}"
        )
        if not folder.exists():
            shapes = self.shapes(layers)
            tensors = synthetic.random_tensors(shapes, self._seed(name), torch.bfloat16)
            tmp = folder.with_name(folder.name + ".tmp")
            synthetic.write_checkpoint(tmp, tensors, config=shapes.config("bfloat16"), tokenizer=False)
            for f in self._tokenizer_dir().iterdir():
                shutil.copy(f, tmp / f.name)
            tmp.rename(folder)
        return folder

    def adapter(self, name: str, base: str, layers: int) -> Path:
        folder = self.root / f"lora-{self._seed(name + '+' + base):08x}-L{layers}"
        if not folder.exists():
            synthetic.write_lora_adapter(
                folder, self.shapes(layers).shapes(), targets=("q_proj", "v_proj"), seed=self._seed(name)
            )
        return folder


def prepare(path: Path, stand: StandIns, work: Path) -> Path:
    """The config with its model names rewritten, written to ``work``."""
    docs = documents(path)
    counts = layer_counts(docs)
    paths = {m: stand.model(m, n) for m, n in counts.items()}
    adapters = {}
    for doc in docs:
        for ref, _ in references(doc):
            model, lora = _split(ref)
            if lora is not None and model in paths:
                adapters[(model, lora)] = stand.adapter(lora, model, counts[model])
    work.mkdir(parents=True, exist_ok=True)
    out = work / path.name
    out.write_text(yaml.safe_dump_all(rewrite(docs, paths, adapters), sort_keys=False))
    return out


def run_config(path: Path, stand: StandIns, work: Path) -> tuple[bool, str]:
    """(ran, reason): ``--dry-run`` then a real merge; the reason is the error line when it did not."""
    cfg = prepare(path, stand, work)
    for args in (["--dry-run"], ["-q"]):
        out = work / ("dry" if args == ["--dry-run"] else "out")
        err, sink = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(sink):
            rc = main(["merge", str(cfg), str(out), *args])
        if rc != 0:
            lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
            reason = next(
                (ln for ln in reversed(lines) if "error" in ln), lines[-1] if lines else f"exit {rc}"
            )
            return False, reason.replace(str(stand.root) + "/", "").replace(str(work) + "/", "")
    if not list((work / "out").glob("*.safetensors")):
        return False, "the merge wrote no safetensors file"
    return True, ""


# ----------------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def stand(tmp_path_factory):
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    return StandIns(tmp_path_factory.mktemp("standins"))


def test_corpus_files_are_sourced_and_parse():
    files = corpus_files()
    assert len(files) >= 40
    for p in files:
        assert source_of(p)
        assert documents(p), p.name
    assert set(EXPECTED_FAILURES) <= {p.stem for p in files}, "EXPECTED_FAILURES names a missing config"


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.stem)
def test_config_runs_unchanged(path, stand, tmp_path):
    ran, reason = run_config(path, stand, tmp_path)
    expected = EXPECTED_FAILURES.get(path.stem)
    if expected is None:
        assert ran, f"{path.name} ({source_of(path)}) does not run: {reason}"
    else:
        why, needle, _ = expected
        assert not ran, f"{path.name} runs now: remove it from EXPECTED_FAILURES ({why})"
        assert needle in reason, f"{path.name} fails for another reason than listed ({why}): {reason}"


# ----------------------------------------------------------------------------- the document


def features(docs: list) -> list:
    """What a config uses, for the table."""
    out = []
    text = yaml.safe_dump_all(docs)
    if len(docs) > 1:
        out.append("multi-doc")
    if any(d.get("slices") for d in docs):
        out.append("slices")
    if any(d.get("modules") for d in docs):
        out.append("modules")
    if any(d.get("tokenizer_source") not in (None,) or d.get("tokenizer") for d in docs):
        out.append("tokenizer")
    if any(d.get("chat_template") for d in docs):
        out.append("chat_template")
    if any("+" in ref for d in docs for ref, _ in references(d)):
        out.append("LoRA")
    if "filter:" in text:
        out.append("filters")
    if re.search(r"^\s*(weight|density|t|epsilon|lambda): \[", text, re.M) or re.search(
        r"value:\n(\s*- [-0-9.]+\n){2,}", text
    ):
        out.append("gradients")
    return out


def write_doc() -> None:
    import tempfile

    rows, ran_count, mk_runs = [], 0, 0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        stand = StandIns(Path(tmp) / "standins")
        for p in corpus_files():
            ran, reason = run_config(p, stand, Path(tmp) / p.stem)
            ran_count += ran
            mk_runs += EXPECTED_FAILURES.get(p.stem, (0, 0, True))[2]
            docs = documents(p)
            methods = ", ".join(dict.fromkeys(str(d.get("merge_method")) for d in docs))
            expected = EXPECTED_FAILURES.get(p.stem)
            status = "runs" if ran else ("expected failure" if expected else "**FAILS**")
            why = expected[0] if expected and not ran else reason
            mk = "runs" if EXPECTED_FAILURES.get(p.stem, (0, 0, True))[2] else "fails"
            rows.append((p.name, source_of(p), methods, ", ".join(features(docs)), status, mk, why))
    n = len(rows)
    lines = [
        "# The mergekit config corpus",
        "",
        "Real mergekit configs, kept verbatim in [`tests/data/mergekit_configs/`](../tests/data/mergekit_configs/)",
        "(first line: `# source: ...`), run by `tests/test_mergekit_corpus.py` with only their model",
        "names rewritten to generated stand-in checkpoints (tiny Llamas with a real tiny tokenizer, the",
        "layer count the config's `layer_range`s need, else 32; a `MODEL+LORA` name gets a PEFT adapter),",
        "through `m3kernels merge --dry-run` and a real merge. Sources: mergekit's own `examples/` and",
        "`docs/`, and configs published on Hugging Face model cards (through a GitHub collection of model",
        "cards, repositories of merge experiments and the search tool's page index). Five more configs",
        "found were left out because they are not valid YAML (mergekit cannot read them either).",
        "",
        f"**{ran_count} of {n} configs ({100.0 * ran_count / n:.1f}%) run unchanged; {ran_count} of the "
        f"{mk_runs} that mergekit 0.1.5 itself runs ({100.0 * ran_count / mk_runs:.1f}%).** The others",
        "are listed in the test's `EXPECTED_FAILURES` with the reason (the test fails when one of them",
        "starts to run or an unlisted one fails); whether mergekit 0.1.5 runs a config was checked once",
        "by running `mergekit-yaml` (`mergekit-multi` for several documents) on the same stand-ins.",
        f"Generated by `python tests/test_mergekit_corpus.py` ({time.perf_counter() - t0:.0f} s on a "
        "2-vCPU Xeon, shared).",
        "",
        "LoRA references against mergekit 0.1.5 (measured once, on these stand-ins, `dtype: float32`):",
        "for `hf__HuatuoGPT-o1-8B-LoRA-model_stock.yaml` (a model_stock merge of seven `base+LoRA`",
        "references) the adapted inputs are bit-identical to the copies mergekit merges with PEFT into",
        "its `--lora-merge-cache` (7 adapters, 2,037 tensors), and the merged output is within 0.90",
        "tensor-scale float32 ulps of mergekit's `dtype: float64` result (mergekit's own float32 result:",
        "0.98); `tests/test_lora_inputs.py` checks a task_arithmetic merge with a LoRA input bit for bit",
        "against mergekit when `M3K_MERGEKIT_VENV` is set.",
    ]
    counts: dict = {}
    for _, _, methods, feats, _, _, _ in rows:
        for key in [m.strip() for m in methods.split(",")] + [f.strip() for f in feats.split(",") if f]:
            counts[key] = counts.get(key, 0) + 1
    lines += ["", "Coverage (configs using each method or feature):", ""]
    lines.append(", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))))
    lines += [
        "",
        "| config | source | method | features | status | mergekit 0.1.5 | reason |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, src, methods, feats, status, mk, why in rows:
        url = src.split(" ")[0]
        rest = src[len(url) :].strip()
        if "github.com/" in url and "/blob/" in url:
            repo, path = url.split("github.com/")[1].split("/blob/")
            text = f"{repo}: …/{'/'.join(path.split('/')[-2:])}"
        else:
            text = url.split("//")[-1].split("/blob/")[0][:70]
        cell = f"[{text}]({url})" + (f" {rest}" if rest else "")
        lines.append(
            f"| `{name}` | {cell.replace('|', '/')} | {methods} | {feats} | {status} | {mk} | "
            f"{why.replace('|', '/')} |"
        )
    DOC.write_text("\n".join(lines) + "\n")
    print(f"{ran_count}/{n} run unchanged; wrote {DOC}")


if __name__ == "__main__":
    write_doc()
