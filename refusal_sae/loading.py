"""One loader for a causal LM and its tokenizer: safetensors, or GGUF dequantized to dense weights; never pickles.

Both the hooked model of the pipeline (`refusal_sae.model`) and the conversion of the embedded model's GGUF
into safetensors (`refusal_sae.embedded`) load through `load_causal_lm`, so a GGUF checkpoint becomes the
same plain dense module either way: transformers' GGUF reader dequantizes every block (asked for
explicitly where transformers >= 5 could keep them packed), the leftover quantizer is detached, and the
weights are cast to the requested dtype.

The `data.model` options are resolved here too (`resolve_source`, `resolve_device`, `resolve_dtype`), and a
local checkpoint is checked first (`check_model_dir`, `check_gguf_file`): transformers' own errors for a
damaged one name no file, or are tracebacks.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from refusal_sae.errors import UserError

GGUF_MAGIC = b"GGUF"
SAFETENSORS_WEIGHTS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def dtype_kwarg() -> str:
    """`dtype=` since transformers 4.56, `torch_dtype=` before."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


@contextlib.contextmanager
def _no_safetensors_conversion() -> Iterator[None]:
    """Stop transformers from fetching a bot-converted safetensors PR for a hub repo that has only pickles."""
    old = os.environ.get("DISABLE_SAFETENSORS_CONVERSION")
    os.environ["DISABLE_SAFETENSORS_CONVERSION"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DISABLE_SAFETENSORS_CONVERSION", None)
        else:
            os.environ["DISABLE_SAFETENSORS_CONVERSION"] = old


def load_causal_lm(
    source: str,
    dtype: torch.dtype,
    *,
    gguf_file: str | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """(model, tokenizer) from `source` (hub id or directory): its safetensors, or its `gguf_file` dequantized.

    The model has `dtype` weights and no quantizer attached (it can be moved and saved like any other).
    transformers' own errors (OSError for a missing or unreachable checkpoint) pass through for the caller
    to phrase; a GGUF whose blocks stay packed raises UserError.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision is not None:
        common["revision"] = revision
    if local_files_only:
        common["local_files_only"] = True
    if gguf_file is not None:
        common["gguf_file"] = gguf_file
    model_kwargs: dict[str, Any] = {dtype_kwarg(): dtype}
    if gguf_file is None:
        model_kwargs["use_safetensors"] = True
    else:
        with contextlib.suppress(ImportError):  # transformers >= 5 may keep GGUF blocks packed otherwise
            from transformers import GgufConfig

            model_kwargs["quantization_config"] = GgufConfig(dequantize=True)
    with _no_safetensors_conversion():
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
        model = AutoModelForCausalLM.from_pretrained(source, **common, **model_kwargs,
                                                     output_loading_info=gguf_file is None)
    if gguf_file is None:
        model, info = model
        _check_loading_info(source, info)
    else:
        _detach_gguf_quantizer(model, gguf_file)
        model.to(dtype)
    return model, tokenizer


def _check_loading_info(source: str, info: dict[str, Any]) -> None:
    """Refuse weights that do not fill the architecture config.json describes: transformers would initialise a
    missing weight at random (a warning only) and drop an unexpected one, and the model would still run."""
    for key, what in (("missing_keys", "has no weight for"), ("unexpected_keys", "holds weights its config.json "
                                                                                  "has no place for, e.g.")):
        names = sorted(info.get(key) or [])
        if names:
            raise UserError(f"{source}: the checkpoint {what} {names[0]} ({len(names)} such tensor(s)), so its "
                            "config.json and weights do not belong together; download or save the model again")


def _detach_gguf_quantizer(model: Any, gguf_file: str) -> None:
    """Check that no weight or module of a GGUF load is still packed, then drop the quantizer it leaves behind.

    The loader attaches a GGUF quantizer even when every weight is dense, and such a model refuses `.to()`
    and `save_pretrained`.
    """
    packed = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    packed += [n for n, m in model.named_modules() if "gguf" in type(m).__name__.lower()]
    if packed:
        raise UserError(
            f"data.model.gguf_file: {gguf_file!r} loaded with quantized weights left packed ({packed[0]}, ...); "
            "use a newer transformers or a safetensors checkpoint"
        )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for attr in ("quantization_config", "gguf_file"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)


# --------------------------------------------------------------------------------------------------
# Local checkpoints, checked before transformers reads them: its errors for a damaged file name no file
# (a safetensors header error) or are tracebacks (a missing config.json, a GGUF that is not one).


def check_model_dir(directory: Path) -> None:
    """A local safetensors checkpoint: config.json naming an architecture, and every weights file whole.

    Only the safetensors headers are parsed (the tensors stay on disk), which is enough to catch a
    truncated download or copy: a header that does not cover the file exactly is refused.
    """
    config = directory / "config.json"
    if not config.is_file():
        raise UserError(
            f"{directory}: no config.json (the model's architecture and sizes); give the whole directory "
            "save_pretrained wrote (config.json, tokenizer files, *.safetensors), not only its weights"
        )
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{config} is not valid JSON ({e}); replace it with the model's own config.json") from None
    if not isinstance(raw, dict) or not raw.get("model_type"):
        raise UserError(
            f"{config} names no model_type (e.g. \"llama\"); replace it with the model's own config.json"
        )
    for path in _safetensors_weights(directory):
        check_safetensors_file(path)


def _safetensors_weights(directory: Path) -> list[Path]:
    """The weights files transformers loads from `directory`: model.safetensors, else the index's shards."""
    single = directory / SAFETENSORS_WEIGHTS
    if single.is_file():
        return [single]
    index = directory / SAFETENSORS_INDEX
    if not index.is_file():
        return []
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise UserError(
            f"{index} is not a safetensors index (JSON with a weight_map; {type(e).__name__}: {e}); "
            "download or save the model again"
        ) from None
    missing = [shard for shard in shards if not (directory / shard).is_file()]
    if missing:
        raise UserError(
            f"{directory / missing[0]} not found ({len(missing)} of the {len(shards)} shards {index.name} lists are "
            "missing); download or copy the whole model again"
        )
    return [directory / shard for shard in shards]


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
"""safetensors dtypes a weight may have: an integer one is quantized (or not a weight), which a load in a float
dtype would turn into wrong values without a word."""


def check_safetensors_file(path: Path) -> None:
    """Parse the header of a safetensors file; UserError naming it if the file is truncated or corrupted, or holds
    a weight or bias in an integer dtype (a quantized checkpoint)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                dtype = f.get_slice(name).get_dtype()
                if name.endswith(("weight", "bias")) and dtype not in FLOAT_DTYPES:
                    raise UserError(f"{path}: {name} is stored as {dtype}, not a float dtype ({', '.join(FLOAT_DTYPES)})"
                                    "; give an unquantized checkpoint (or a GGUF file, which is dequantized)")
    except SafetensorError as e:
        raise UserError(f"{path} is truncated or corrupted ({e}); download or save the model again") from None


def check_gguf_file(path: Path) -> None:
    """A GGUF file: its magic bytes, then its header and tensor table (read, not loaded), which a truncated
    file cannot hold."""
    from gguf import GGUFReader

    with open(path, "rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise UserError(
            f"{path} is not a GGUF file (its first bytes are {magic!r}, not {GGUF_MAGIC!r}); give a GGUF model "
            "file, or a directory holding config.json and *.safetensors"
        )
    try:
        GGUFReader(path)
    except (ValueError, IndexError):  # numpy's views of a file shorter than its header says, or a bad type code
        raise UserError(
            f"{path} is a truncated or corrupted GGUF file: its header and tensor table do not fit its "
            f"{path.stat().st_size} bytes; download it again"
        ) from None


# --------------------------------------------------------------------------------------------------
# Resolving the `data.model` options

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}



def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda if available else cpu; otherwise the named device, which must exist here."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(
            f"data.model.device: unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"data.model.device: {device!r} asked for but CUDA is not available here; use auto or cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(
                f"data.model.device: {device!r} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
                f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}"
            )
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise UserError(f"data.model.device: {device!r} asked for but MPS is not available here; use auto or cpu")
    elif dev.type != "cpu":
        raise UserError(f"data.model.device: unsupported device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on CUDA (float16 where bf16 is unsupported), float32 elsewhere; or a named dtype."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return DTYPES[dtype.lower()]
    except (KeyError, AttributeError):
        raise UserError(
            f"data.model.dtype: unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16"
        ) from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _looks_like_path(name: str) -> bool:
    """A hub id is 'name' or 'org/name'; anything else with a path shape is meant as a local path."""
    return (
        name.startswith(("/", ".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or name.endswith(".gguf")
    )


def file_stamps(directory: Path) -> dict[str, list[int]]:
    """[size, mtime_ns] of every file of a local model directory (hidden ones aside). Cheap (nothing is read),
    and a rewritten, added or removed weights, config or tokenizer file changes it, so an activation cache of
    the old model is never reused for the new one."""
    stamps = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            stat = path.stat()
            stamps[path.name] = [stat.st_size, stat.st_mtime_ns]
    return stamps


def hub_commit(repo: str, filename: str, revision: str | None) -> str | None:
    """The commit a hub model was just loaded from: the snapshot its `filename` resolves to in the local hub
    cache (transformers 5 no longer records it on the config)."""
    from huggingface_hub import try_to_load_from_cache
    from transformers.utils.hub import extract_commit_hash

    found = try_to_load_from_cache(repo, filename, revision=revision)
    return extract_commit_hash(found if isinstance(found, str) else None, None)


def resolve_source(name: str, gguf_file: str | None) -> tuple[str, str | None, bool]:
    """(what to pass to from_pretrained, gguf_file, whether it is local) of the `data.model` options `name` and
    `gguf_file` (any but 'embedded'), after checking a local path."""
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if gguf_file is not None:
            raise UserError(
                f"data.model.gguf_file: {gguf_file!r} given although name {name!r} is a .gguf file; "
                f"set one of them only"
            )
        if not path.is_file():
            raise UserError(f"data.model.name: GGUF file {name!r} not found; check the path")
        check_gguf_file(path)
        return str(path.parent), path.name, True
    if path.exists():
        if not path.is_dir():
            raise UserError(
                f"data.model.name: {name!r} is a file; give a model directory, a hub id or a .gguf file"
            )
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                found = sorted(p.name for p in path.glob("*.gguf"))
                raise UserError(
                    f"data.model.gguf_file: {gguf_file!r} not found in {name!r} "
                    f"(GGUF files there: {', '.join(found) or 'none'}); check the file name"
                )
            check_gguf_file(path / gguf_file)
        else:
            _check_safetensors_dir(path, name)
            check_model_dir(path)
        return str(path), gguf_file, True
    if _looks_like_path(name):
        raise UserError(
            f"data.model.name: model directory {name!r} not found; give an existing local directory, "
            f"a .gguf file, a hub id like 'org/model', or 'embedded'"
        )
    return name, gguf_file, False


def _check_safetensors_dir(path: Path, name: str) -> None:
    if any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if pickles:
        raise UserError(
            f"data.model.name: {name!r} holds only pickle weights ({', '.join(pickles[:3])}); only safetensors "
            f"or GGUF checkpoints are loaded, so convert it to safetensors (save_pretrained) first"
        )
    if ggufs:
        raise UserError(
            f"data.model.name: {name!r} holds no safetensors but GGUF file(s) {', '.join(ggufs[:3])}; "
            f"set data.model.gguf_file to one of them"
        )
    raise UserError(
        f"data.model.name: {name!r} holds no model weights (*.safetensors); give a directory written by "
        f"save_pretrained, a .gguf file, a hub id, or 'embedded'"
    )
