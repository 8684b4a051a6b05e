"""SAE checkpoints on disk in EleutherAI/sparsify's layout: `sae.safetensors` + `cfg.json`, no pickle.

Each library loads the other's checkpoints: the tensor names are sparsify's (`encoder.weight`,
`encoder.bias`, `W_dec`, `b_dec`) and cfg.json holds the `SAEConfig` fields sparsify also writes, plus
the `SAEMeta` that ties an SAE to its layer and model, so loading one for another site fails loudly.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from refusal_sae.errors import UserError
from refusal_sae.io import atomic_open, write_json
from refusal_sae.sae import SAEConfig, SAEMeta, SparseAutoencoder

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "cfg.json"


def save_sae(sae: SparseAutoencoder, directory: str | Path) -> None:
    """Write `sae.safetensors` and `cfg.json` into `directory`, each atomically (sparsify's layout)."""
    directory = Path(directory)
    tensors = {name: p.detach().to("cpu", torch.float32).contiguous() for name, p in sae.named_parameters()}
    with atomic_open(directory / WEIGHTS_FILE, "wb") as f:
        f.write(safetensors_bytes(tensors))
    resolved = replace(sae.cfg, num_latents=sae.cfg.width, k=sae.cfg.k_active, k_percent=None)
    write_json(directory / CONFIG_FILE, {**asdict(resolved), **asdict(sae.meta)})


def export_saes(saes: Mapping[str, SparseAutoencoder], directory: str | Path) -> None:
    """Make `directory` hold exactly `saes`, one `save_sae` subdirectory per layer (its key).

    The set is written beside `directory` and then renamed into its place, so an SAE an earlier run
    trained for a layer this run does not have never survives next to the new ones, and a crash while
    writing leaves the previous set whole.
    """
    directory = Path(directory)
    partial = directory.with_name(f".{directory.name}.partial")
    replaced = directory.with_name(f".{directory.name}.replaced")
    for leftover in (partial, replaced):  # of an export killed before it finished
        if leftover.exists():
            shutil.rmtree(leftover)
    partial.mkdir(parents=True)
    for layer, sae in saes.items():
        save_sae(sae, partial / layer)
    if directory.exists():
        os.replace(directory, replaced)
    os.replace(partial, directory)
    if replaced.exists():
        shutil.rmtree(replaced)


def load_sae(
    directory: str | Path,
    device: str | torch.device = "cpu",
    *,
    expected_layer: str | None = None,
    expected_model: str | None = None,
    expected_d_in: int | None = None,
) -> SparseAutoencoder:
    """Load an SAE written by `save_sae` or by sparsify, without pickle.

    The `expected_*` arguments guard against an SAE from another layer or model: a mismatch with
    what cfg.json records raises UserError instead of producing meaningless features.
    """
    directory = Path(directory)
    cfg_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise UserError(f"SAE checkpoint file {path} does not exist; point to a directory made by save_sae()")
    cfg, meta = read_cfg(cfg_path)
    for name, expected, actual in (
        ("layer", expected_layer, meta.layer),
        ("model", expected_model, meta.model),
        ("d_in", expected_d_in, cfg.d_in),
    ):
        if expected is not None and actual != expected:
            raise UserError(
                f"{cfg_path}: this SAE was trained for {name}={actual!r} but {expected!r} is expected; "
                f"use an SAE trained on {name} {expected!r}"
            )
    try:
        tensors = load_file(weights_path)
    except SafetensorError as e:
        raise UserError(f"{weights_path} is corrupted or truncated ({e}); save or download it again") from e
    sae = SparseAutoencoder(cfg, meta)
    params = dict(sae.named_parameters())
    if tensors.keys() != params.keys():
        raise UserError(f"{weights_path} holds tensors {sorted(tensors)}; expected {sorted(params)}")
    with torch.no_grad():
        for name, param in params.items():
            if tensors[name].shape != param.shape:
                raise UserError(
                    f"{weights_path}: {name} has shape {tuple(tensors[name].shape)} but {cfg_path} "
                    f"(d_in={cfg.d_in}, num_latents={cfg.width}) implies {tuple(param.shape)}; "
                    "the two files do not belong together"
                )
            if not torch.isfinite(tensors[name]).all():
                bad = int((~torch.isfinite(tensors[name])).sum())
                raise UserError(f"{weights_path}: {name} holds {bad} non-finite value(s) (NaN or inf); this SAE "
                                "diverged or the file is damaged: train it again (or restore it)")
            param.copy_(tensors[name])
    return sae.to(device)


def read_cfg(path: Path) -> tuple[SAEConfig, SAEMeta]:
    """Parse cfg.json (ours or sparsify's) into config and metadata; UserError naming `path` if unusable."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); save the SAE again") from e
    if not isinstance(raw, dict) or "d_in" not in raw or "k" not in raw:
        raise UserError(f"{path} must be a JSON object with at least d_in and k; save the SAE again")
    # sparsify variants this module does not implement: transcoders, skip connections, group-max.
    if raw.get("activation", "topk") != "topk" or raw.get("transcode") or raw.get("skip_connection"):
        raise UserError(
            f"{path} describes activation={raw.get('activation')!r}, transcode={raw.get('transcode')!r}, "
            f"skip_connection={raw.get('skip_connection')!r}; only plain top-k SAEs are supported"
        )
    kwargs = {f.name: raw[f.name] for f in fields(SAEConfig) if f.name in raw}
    kwargs["num_latents"] = kwargs.get("num_latents") or None  # sparsify writes 0 for "use expansion_factor"
    try:
        cfg = SAEConfig(**kwargs)
    except UserError as e:
        raise UserError(f"{path}: {e}") from e
    meta = SAEMeta(**{f.name: raw.get(f.name) for f in fields(SAEMeta)})
    return cfg, meta
