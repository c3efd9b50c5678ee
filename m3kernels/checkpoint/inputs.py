"""Opening a merge's inputs: the config (with a seed override) and the checkpoints it names.

Relative model paths are tried against the working directory, then the config file's folder;
a checkpoint listed twice is opened once. ``MODEL+ADAPTER`` opens the model seen through a PEFT
LoRA adapter (:class:`~m3kernels.checkpoint.lora.LoraCheckpoint`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from m3kernels.checkpoint.config import MergeConfig, load_config, parse_config, read_config_source
from m3kernels.checkpoint.lora import LoraCheckpoint, split_reference
from m3kernels.checkpoint.source import Checkpoint
from m3kernels.errors import CheckpointError

log = logging.getLogger("m3kernels")


def config_and_folder(config, seed: int | None) -> tuple[MergeConfig, Path | None]:
    """The config (with ``seed`` overriding its seed) and the folder relative paths may refer to."""
    cfg_dir = None
    if isinstance(config, (str, os.PathLike)) and "\n" not in os.fspath(config) and Path(config).is_file():
        cfg_dir = Path(config).resolve().parent
    if isinstance(config, MergeConfig):
        cfg = config
        if seed is not None:
            cfg = parse_config({**cfg.raw, "seed": seed})
    elif seed is not None:
        cfg = parse_config({**read_config_source(config), "seed": seed})
    else:
        cfg = load_config(config)
    if seed is not None and getattr(cfg, "base_only_note", None):  # (load_config says it itself)
        log.warning("%s", cfg.base_only_note)
    return cfg, cfg_dir


def _resolve_model_path(path: str, cfg_dir: Path | None) -> Path:
    if "\x00" in str(path):
        raise CheckpointError(f"model path {path!r} holds a NUL character", path=str(path))
    p = Path(path).expanduser()
    if not p.exists() and not p.is_absolute() and cfg_dir is not None and (cfg_dir / p).exists():
        return cfg_dir / p  # relative to the config file when not relative to the working directory
    return p


def open_inputs(cfg: MergeConfig, cfg_dir: Path | None, allow_bin: bool, follow_symlinks: bool = False):
    """(base checkpoint or None, [model checkpoints], [each opened once]); a path listed twice
    is opened once. ``follow_symlinks``: read links out of the model folders (see
    :class:`~m3kernels.checkpoint.source.Checkpoint`). On an error, what was opened is closed."""
    opened: dict = {}

    def get(path: str, role: str) -> Checkpoint:
        model, adapter = split_reference(path)  # MODEL+ADAPTER: a LoRA (m3kernels.checkpoint.lora)
        p = _resolve_model_path(model, cfg_dir)
        key = os.path.realpath(p)
        if adapter is not None:
            a = _resolve_model_path(adapter, cfg_dir)
            key = (key, os.path.realpath(a))
        if key not in opened:
            if adapter is None:
                opened[key] = Checkpoint(p, role=role, allow_bin=allow_bin, follow_symlinks=follow_symlinks)
            else:
                opened[key] = LoraCheckpoint.open(
                    p, a, role=role, allow_bin=allow_bin, follow_symlinks=follow_symlinks
                )
        return opened[key]

    try:
        base = get(cfg.base_model, "base") if cfg.base_model is not None else None
        models = [get(m, f"model {i + 1}") for i, m in enumerate(cfg.models)]
    except BaseException:
        for ck in opened.values():
            ck.close()
        raise
    return base, models, list(opened.values())
