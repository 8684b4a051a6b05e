"""SAE checkpoints on disk in EleutherAI/sparsify's layout: `sae.safetensors` + `cfg.json`, no pickle.

Each library loads the other's checkpoints: the tensor names are sparsify's (`encoder.weight`,
`encoder.bias`, `W_dec`, `b_dec`) and cfg.json holds the `SAEConfig` fields sparsify also writes, plus
the `SAEMeta` that ties an SAE to its layer and model, so loading one for another site fails loudly.

`load_sae` also reads the SAEs a researcher brings, always from safetensors:

    SAELens directory   cfg.json + sae_weights.safetensors: W_enc (d_in, d_sae), W_dec (d_sae, d_in), b_enc,
                        b_dec; architecture `standard` (ReLU) or `topk` (k); `apply_b_dec_to_input`; the hook
                        `blocks.N.hook_resid_post` is residuals_N, `blocks.N.hook_resid_pre` residuals_{N-1}
    raw safetensors     one file of the same four tensors, the activation (and k) given by the caller

Both become the same `SparseAutoencoder`: f = act(W_enc (x - b_dec) + b_enc'), x_hat = W_dec^T f + b_dec. Where
SAELens does not subtract b_dec from the input, b_enc' = b_enc + W_enc b_dec gives the same pre-activations.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
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
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
log = logging.getLogger(__name__)
SAELENS_ARCHITECTURES = {"standard": "relu", "topk": "topk"}
"""SAELens architectures read here, and the activation each is; jumprelu, gated and the rest are refused."""


@dataclass
class PretrainedSAE:
    """An SAE brought from elsewhere for one layer (`analysis.saes`, `fit`'s `model.pretrained`), read by `load_sae`."""

    path: str
    """A SAELens directory, a refusal_sae or sparsify directory, or a safetensors file of W_enc, W_dec, b_enc, b_dec."""
    activation: str | None = None
    """For a safetensors file: relu or topk (the directories say it themselves)."""
    k: int | None = None
    """For a safetensors file with activation topk: active latents per token."""

    def load(self, layer: str, d_in: int, model: str | None) -> SparseAutoencoder:
        """The SAE, checked to read `layer` of width `d_in`; one that names another model than the run's `model`
        (a hub name beside a local one, say) is used as the user paired them, with a warning."""
        sae = load_sae(self.path, expected_layer=layer, expected_d_in=d_in, activation=self.activation, k=self.k)
        log.info("%s is the %s SAE of %s (%d latents)", layer, sae.cfg.activation, self.path, sae.cfg.width)
        if sae.meta.model not in (None, model):
            log.warning("the SAE of %s (%s) names model %r, this run's is %r; analysed as given", layer, self.path,
                        sae.meta.model, model)
            sae.meta = replace(sae.meta, model=None)
        return sae.eval()


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
    activation: str | None = None,
    k: int | None = None,
) -> SparseAutoencoder:
    """Load an SAE written by `save_sae` or by sparsify, a SAELens directory, or a raw safetensors file of
    W_enc, W_dec, b_enc, b_dec (then `activation`, "relu" or "topk", and `k` for topk say how it encodes), without
    pickle.

    The `expected_*` arguments guard against an SAE from another layer or model: a mismatch with
    what the SAE's config records raises UserError instead of producing meaningless features.
    """
    directory = Path(directory)
    if directory.is_file():
        cfg_path = weights_path = directory
        cfg, meta, tensors = _read_raw(directory, activation, k)
    elif (directory / SAELENS_WEIGHTS_FILE).is_file() and not (directory / WEIGHTS_FILE).is_file():
        cfg_path, weights_path = directory / CONFIG_FILE, directory / SAELENS_WEIGHTS_FILE
        cfg, meta, tensors = _read_saelens(cfg_path, weights_path)
    else:
        cfg_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (cfg_path, weights_path):
            if not path.is_file():
                raise UserError(f"SAE checkpoint file {path} does not exist; point to a directory made by save_sae() "
                                f"or sparsify, a SAELens directory ({CONFIG_FILE} + {SAELENS_WEIGHTS_FILE}) or a "
                                "safetensors file of W_enc, W_dec, b_enc, b_dec")
        cfg, meta = read_cfg(cfg_path)
        tensors = None
    for name, expected, actual in (
        ("layer", expected_layer, meta.layer),
        ("model", expected_model, meta.model),
        ("d_in", expected_d_in, cfg.d_in),
    ):
        if expected is not None and actual != expected and (actual is not None or tensors is None):
            raise UserError(  # (a loaded SAE that does not say its layer or model is taken where it is put)
                f"{cfg_path}: this SAE was trained for {name}={actual!r} but {expected!r} is expected; "
                f"use an SAE trained on {name} {expected!r}"
            )
    if tensors is None:
        tensors = _tensors(weights_path)
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


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except SafetensorError as e:
        raise UserError(f"{path} is corrupted or truncated ({e}); save or download it again") from e


def _from_encoder_decoder(path: Path, tensors: dict[str, torch.Tensor], apply_b_dec_to_input: bool = True
                          ) -> dict[str, torch.Tensor]:
    """W_enc (d_in, d_sae), W_dec (d_sae, d_in), b_enc, b_dec (SAELens' names and shapes) as this package's tensors,
    in float32; the checks name `path` and the tensor."""
    names = ("W_enc", "W_dec", "b_enc", "b_dec")
    missing = [n for n in names if n not in tensors]
    if missing:
        raise UserError(f"{path}: no tensor {', '.join(missing)}; an SAE here needs {', '.join(names)}")
    w_enc, w_dec, b_enc, b_dec = (tensors[n].float() for n in names)
    d_in, d_sae = w_enc.shape if w_enc.ndim == 2 else (-1, -1)
    for name, t, shape in (("W_enc", w_enc, (d_in, d_sae)), ("W_dec", w_dec, (d_sae, d_in)), ("b_enc", b_enc, (d_sae,)),
                           ("b_dec", b_dec, (d_in,))):
        if tuple(t.shape) != shape or min(shape) < 1:
            raise UserError(f"{path}: {name} has shape {tuple(t.shape)}; W_enc {tuple(w_enc.shape)} implies "
                            f"{shape} (W_enc is (d_in, d_sae), W_dec (d_sae, d_in))")
    for name, t in zip(names, (w_enc, w_dec, b_enc, b_dec)):
        if not torch.isfinite(t).all():
            raise UserError(f"{path}: {name} holds {int((~torch.isfinite(t)).sum())} non-finite value(s) (NaN or inf); "
                            "the SAE diverged or the file is damaged: download it again")
    bias = b_enc + b_dec @ w_enc if not apply_b_dec_to_input else b_enc  # W_enc (x - b_dec) + b_enc' = x W_enc + b_enc
    return {"encoder.weight": w_enc.T.contiguous(), "encoder.bias": bias, "W_dec": w_dec, "b_dec": b_dec}


def _read_raw(path: Path, activation: str | None, k: int | None) -> tuple[SAEConfig, SAEMeta, dict]:
    """A safetensors file of W_enc, W_dec, b_enc, b_dec; the caller says how it encodes."""
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: an SAE file must be .safetensors (W_enc, W_dec, b_enc, b_dec); other formats are not "
                        "loaded (no pickle)")
    if activation not in SAELENS_ARCHITECTURES.values():
        raise UserError(f"{path}: a raw SAE file needs its activation: relu or topk (with k); got {activation!r}")
    tensors = _from_encoder_decoder(path, _tensors(path))
    d_sae, d_in = tensors["W_dec"].shape
    return _config(path, "activation", d_in=d_in, num_latents=d_sae, k=k, activation=activation), SAEMeta(), tensors


def _config(path: Path, field: str, **kwargs) -> SAEConfig:
    """The `SAEConfig` of a loaded SAE (never trained here, so its decoder rows keep their norms)."""
    try:
        return SAEConfig(normalize_decoder=False, **kwargs)
    except UserError as e:
        raise UserError(f"{path}: {field}: {e}") from e


def saelens_layer(hook_name: str) -> str:
    """The residual-stream site a SAELens hook reads: `blocks.N.hook_resid_post` is residuals_N (after block N),
    `blocks.N.hook_resid_pre` residuals_{N-1}; any other hook is a UserError."""
    match = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(pre|post)", hook_name)
    if match is None or (match[2] == "pre" and int(match[1]) == 0):
        raise UserError(f"hook_name {hook_name!r} reads no residual stream after a block; SAEs of "
                        "blocks.N.hook_resid_post (or blocks.N.hook_resid_pre, N >= 1) are read here")
    return f"residuals_{int(match[1]) - (match[2] == 'pre')}"


def _read_saelens(cfg_path: Path, weights_path: Path) -> tuple[SAEConfig, SAEMeta, dict]:
    """A SAELens directory (the cfg.json of SAELens 3 to 6: the hook and model at the top or under `metadata`)."""
    if not cfg_path.is_file():
        raise UserError(f"{cfg_path} does not exist; a SAELens directory holds {CONFIG_FILE} beside "
                        f"{SAELENS_WEIGHTS_FILE}")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_path} is not valid JSON ({e}); download the SAE again") from e
    if not isinstance(raw, dict):
        raise UserError(f"{cfg_path} must be a JSON object (SAELens' cfg.json)")
    meta = {**raw, **(raw.get("metadata") or {})}
    architecture = raw.get("architecture", "standard")
    function = raw.get("activation_fn_str", raw.get("activation_fn"))  # SAELens before 6: standard + activation_fn
    kwargs = raw.get("activation_fn_kwargs") or {}
    if architecture == "standard" and function == "topk":
        architecture = "topk"
    elif function not in (None, "relu", "topk"):
        raise UserError(f"{cfg_path}: activation_fn {function!r} is not supported; standard (relu) and topk SAEs are")
    if architecture not in SAELENS_ARCHITECTURES:
        raise UserError(f"{cfg_path}: architecture {architecture!r} is not supported (its thresholds or gates are "
                        f"not read here); use a standard (ReLU) or topk SAE")
    for field, fine in (("normalize_activations", (None, "none")), ("finetuning_scaling_factor", (None, False)),
                        ("rescale_acts_by_decoder_norm", (None, False)), ("hook_head_index", (None,)),
                        ("reshape_activations", (None, "none"))):
        if meta.get(field) not in fine:
            raise UserError(f"{cfg_path}: {field} is {meta.get(field)!r}; only SAEs that read the raw residual "
                            f"({field}: {fine[-1]!r}) are supported")
    for field in ("d_in", "d_sae"):
        if not isinstance(raw.get(field), int):
            raise UserError(f"{cfg_path}: {field} is {raw.get(field)!r}; SAELens' cfg.json gives it as an integer")
    k = raw.get("k", kwargs.get("k")) if architecture == "topk" else None
    if architecture == "topk" and not isinstance(k, int):
        raise UserError(f"{cfg_path}: a topk SAE needs k (an integer); got {k!r}")
    apply = raw.get("apply_b_dec_to_input", True)
    tensors = _from_encoder_decoder(weights_path, _tensors(weights_path), bool(apply))
    if tuple(tensors["W_dec"].shape) != (raw["d_sae"], raw["d_in"]):
        raise UserError(f"{weights_path}: W_dec has shape {tuple(tensors['W_dec'].shape)} but {cfg_path} says d_sae "
                        f"{raw['d_sae']}, d_in {raw['d_in']}; the two files do not belong together")
    hook = meta.get("hook_name")
    try:
        layer = saelens_layer(hook) if hook is not None else None
    except UserError as e:
        raise UserError(f"{cfg_path}: {e}") from e
    cfg = _config(cfg_path, "architecture", d_in=raw["d_in"], num_latents=raw["d_sae"], k=k,
                  activation=SAELENS_ARCHITECTURES[architecture])
    return cfg, SAEMeta(layer=layer, model=meta.get("model_name")), tensors


def read_cfg(path: Path) -> tuple[SAEConfig, SAEMeta]:
    """Parse cfg.json (ours or sparsify's) into config and metadata; UserError naming `path` if unusable."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); save the SAE again") from e
    if not isinstance(raw, dict) or "d_in" not in raw or "k" not in raw:
        raise UserError(f"{path} must be a JSON object with at least d_in and k; save the SAE again")
    # sparsify variants this module does not implement: transcoders, skip connections, group-max.
    if raw.get("activation", "topk") not in ("topk", "relu") or raw.get("transcode") or raw.get("skip_connection"):
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
