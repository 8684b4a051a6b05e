"""One loader for a causal LM and its tokenizer: safetensors, or GGUF dequantized to dense weights; never pickles.

Both the hooked model of the pipeline (`refusal_sae.model`) and the conversion of the embedded model's GGUF
into safetensors (`refusal_sae.embedded`) load through `load_causal_lm`, so a GGUF checkpoint becomes the
same plain dense module either way: transformers' GGUF reader dequantizes every block (asked for
explicitly where transformers >= 5 could keep them packed), the leftover quantizer is detached, and the
weights are cast to the requested dtype.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from refusal_sae.errors import UserError


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
        model = AutoModelForCausalLM.from_pretrained(source, **common, **model_kwargs)
    if gguf_file is not None:
        _detach_gguf_quantizer(model, gguf_file)
        model.to(dtype)
    return model, tokenizer


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
