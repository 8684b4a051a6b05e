"""Stage 2: residual-stream activations of every prompt token, collected once into an on-disk cache.

SAE training and circuit discovery read activations many times, and at real scale (a 7B model, eleven
layers of 4096 dims, thousands of prompts) they do not fit in memory. So `InferencePipeline` writes
them to a directory of shards that later stages memory-map:

    <cache_dir>/
      manifest.json                  what produced the cache (model, layers, prompts, template, dtype)
                                     and every complete shard with a sha256 per file
      shard_00000/
        residuals_<i>.npy            (tokens, d_model) activations of layer i, one row per real token
        tokens.npy                   per-token metadata (TOKEN_DTYPE): prompt index, position, ...
        prompt_offsets.npy           row where each of the shard's prompts starts, plus the end
        answer_residuals_<i>.npy     with `answer_tokens`: the model's greedy answer tokens after each prompt,
        answer_offsets.npy           (answer tokens, d_model), and the row where each prompt's answer starts

A shard holds the tokens of a fixed block of `shard_size` consecutive prompts, so shard boundaries do not
depend on when a run was interrupted. A shard is built in a temporary directory, hashed, renamed into
place and only then recorded in the manifest (itself replaced atomically). A killed run therefore
leaves at worst a temporary directory or an unrecorded shard, both deleted by the next run, which
collects every unrecorded shard (and every recorded one whose directory was deleted) and writes
exactly what an uninterrupted run would have. The directory is locked while it is written (a second
process stops at once), and the shard files' disk blocks are allocated before they are filled, so a
full disk is an error message, not a bus error.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from refusal_sae.data import DATASET_TYPES, PromptSample, Split
from refusal_sae.errors import UserError
from refusal_sae.io import LOCK_FILE, directory_lock, hold_shared, sha256_file, write_json
from refusal_sae.model import ModelWrapper
from refusal_sae.prefix import SharedPrefix
from refusal_sae.validate import non_negative_int, one_of, positive_int

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
# What a cache directory may hold: the manifest (and its temporary twin), shards, temporary shards, the lock.
CACHE_ENTRY = re.compile(
    rf"manifest\.json|\.manifest\.json\..*\.tmp|shard_\d{{5}}|\.shard_\d{{5}}\.tmp|{re.escape(LOCK_FILE)}"
)
SHARD_NAME = re.compile(r"shard_\d{5}")
PLAIN_NAME = re.compile(r"[A-Za-z0-9_]+")  # a layer name, which becomes a file name in every shard
SHARD_FILES = ("tokens.npy", "prompt_offsets.npy")  # beside one <layer>.npy per layer
ANSWER_OFFSETS = "answer_offsets.npy"  # beside one answer_<layer>.npy per layer, when answers are cached
ANSWER_PREFIX = "answer_"
SPLITS: tuple[Split, ...] = ("discovery", "evaluation")
TOKEN_DTYPE = np.dtype(
    [
        ("prompt_index", "<i4"),  # row of the prompt in the collected prompt list
        ("position", "<i4"),  # token position within the chat-formatted prompt
        ("is_last", "?"),  # the prompt's last token (where the model decides how to answer)
        ("refusal_label", "?"),
        ("category", "<i2"),  # index into manifest["categories"]
        ("dataset_type", "i1"),  # index into data.DATASET_TYPES
        ("split", "i1"),  # index into SPLITS
    ]
)
# numpy has no bfloat16: bf16 activations are stored as their raw 16 bits and viewed back by torch.
STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ActivationConfig:
    """What to collect and where (the `data.activations` options)."""

    layers: list[str | int]
    """Residual-stream sites to record: names like residuals_21 or block indices (negative counts from the end)."""
    cache_dir: str | None = None
    """Where the cache lives; null puts it in <run_dir>/activations."""
    batch_size: int = 8
    """Prompts per forward pass."""
    shard_size: int = 256
    """Prompts per shard: the unit of atomic writing and of resuming."""
    dtype: str = "auto"
    """Storage dtype: auto (bfloat16 on GPU, float32 on CPU), float32, float16 or bfloat16."""
    overwrite: bool = False
    """Delete a cache built by a different config instead of stopping with an error."""
    verify: bool = True
    """Check every shard's sha256 when the cache is opened (files' sizes are checked either way)."""
    answer_tokens: int = 0
    """Also cache the residuals of the model's own greedy answer to each prompt, up to this many tokens, for SAE
    training (in-distribution chat text that varies, where the prompts share a template); 0: prompts only."""

    def __post_init__(self) -> None:
        positive_int("data.activations.batch_size", self.batch_size, 8)
        non_negative_int("data.activations.answer_tokens", self.answer_tokens, 32)
        positive_int("data.activations.shard_size", self.shard_size, 256)
        one_of("data.activations.dtype", self.dtype, ("auto", *STORAGE))


def prompts_fingerprint(samples: Sequence[tuple[PromptSample, Split]]) -> str:
    """sha256 over the collected prompts in order with their labels and split: any change invalidates a cache."""
    digest = hashlib.sha256()
    for sample, split in samples:
        digest.update(json.dumps([*asdict(sample).values(), split]).encode())
    return digest.hexdigest()


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
    """The settings two cache configs differ in, as paths into nested ones: `dtype`, `model.commit`,
    `model.files['model.safetensors']`."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [] if old == new else [path]
    return [difference for key in sorted(old.keys() | new.keys())
            for difference in _differences(old.get(key), new.get(key),
                                           f"{path}.{key}".lstrip(".") if key.isidentifier() else f"{path}[{key!r}]")]


class ActivationCache:
    """Read access to a complete cache: memory-mapped per-shard arrays and per-prompt views."""

    def __init__(self, directory: str | Path, verify: bool = True) -> None:
        self.dir = Path(directory)
        path = self.dir / MANIFEST
        if not path.is_file():
            raise UserError(f"{path} not found: no activation cache there; run `fit` to collect activations")
        hold_shared(self.dir, "activation cache", "data.activations.cache_dir")  # no other process rewrites it now
        self.manifest = read_manifest(path)
        if not self.manifest.get("complete"):
            raise UserError(f"{path}: the cache is incomplete; run `fit` again to finish collecting")
        self.layers: list[str] = self.manifest["config"]["layers"]
        self.d_model: int = self.manifest["config"]["model"]["d_model"]
        self.model_name: str | None = self.manifest["config"]["model"].get("name")
        """The model the activations come from, as `data.model.name` gave it (hub id, directory or embedded)."""
        self.dtype: str = self.manifest["config"]["dtype"]
        self.shards: list[dict[str, Any]] = self.manifest["shards"]
        for shard in self.shards:
            check_shard(self.dir / shard["name"], shard, hashes=verify)
        self._offsets = [np.load(self.dir / s["name"] / "prompt_offsets.npy") for s in self.shards]

    @property
    def n_tokens(self) -> int:
        return sum(s["n_tokens"] for s in self.shards)

    @property
    def n_prompts(self) -> int:
        return self.manifest["config"]["n_prompts"]

    def activations(self, shard: int, layer: str) -> np.ndarray:
        """Memory-mapped (tokens, d_model) array of one shard and layer (raw uint16 bits for bfloat16)."""
        return np.load(self.dir / self.shards[shard]["name"] / f"{layer}.npy", mmap_mode="r")

    def changed_source(self, wrapper: ModelWrapper, splits: dict[Split, list[PromptSample]]) -> dict[str, list[str]]:
        """What differs between the model and prompts this cache was built from and `wrapper` / `splits` now, as
        {"model": [fields], "prompts": ["prompts_sha256"]} without the empty ones. The model's dtype aside: a run may
        be analysed on another device."""
        config = self.manifest["config"]
        then, now = ({k: v for k, v in model.items() if k != "dtype"} for model in (config["model"], wrapper.identity))
        changed = {"model": [f"model.{d}" for d in _differences(then, now)], "prompts": []}
        if config.get("prompts_sha256") not in (None, prompts_fingerprint(InferencePipeline.samples(splits))):
            changed["prompts"] = ["prompts_sha256"]
        return {kind: what for kind, what in changed.items() if what}

    @property
    def has_answers(self) -> bool:
        """The cache holds the model's greedy answer tokens after the prompts (`answer_tokens`)."""
        return bool(self.manifest["config"].get("answer_tokens"))

    def answer_activations(self, shard: int, layer: str) -> np.ndarray:
        """Memory-mapped (answer tokens, d_model) array of one shard and layer (`has_answers` only)."""
        return np.load(self.dir / self.shards[shard]["name"] / f"{ANSWER_PREFIX}{layer}.npy", mmap_mode="r")

    def answer_offsets(self, shard: int) -> np.ndarray:
        """Row of `answer_activations` where each of the shard's prompts' answer starts, plus the end."""
        return np.load(self.dir / self.shards[shard]["name"] / ANSWER_OFFSETS)

    def tokens(self, shard: int) -> np.ndarray:
        """Memory-mapped per-token metadata of one shard (TOKEN_DTYPE)."""
        return np.load(self.dir / self.shards[shard]["name"] / "tokens.npy", mmap_mode="r")

    def to_torch(self, array: np.ndarray) -> torch.Tensor:
        """A copy of (a slice of) a cache array as a torch tensor of the cache's dtype."""
        owned = np.require(array, requirements=("C_CONTIGUOUS", "WRITEABLE", "OWNDATA"))  # never the mmap itself
        return torch.from_numpy(owned).view(TORCH_DTYPES[self.dtype])

    def prompt(self, index: int, layers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """All tokens of prompt `index`: `{layer: (tokens, d_model)}`, in position order."""
        shard_size = self.manifest["config"]["shard_size"]
        if not 0 <= index < self.n_prompts:
            raise IndexError(f"prompt index {index} outside 0..{self.n_prompts - 1}")
        shard, local = divmod(index, shard_size)
        start, end = self._offsets[shard][local], self._offsets[shard][local + 1]
        return {layer: self.to_torch(self.activations(shard, layer)[start:end]) for layer in layers or self.layers}

    def prompt_metadata(self) -> np.ndarray:
        """Metadata of every prompt's last token, one row per prompt in prompt order (TOKEN_DTYPE)."""
        return np.concatenate([self.tokens(i)[self.tokens(i)["is_last"]] for i in range(len(self.shards))])


def read_manifest(path: Path) -> dict[str, Any]:
    """A cache manifest, checked before any name in it becomes a path: every shard is `shard_NNNNN` and holds
    exactly the files of the cache's layers, so an edited or damaged manifest cannot point outside the cache."""
    damaged = f"the manifest is damaged or was edited; delete {path.parent} and run `fit` again to collect it afresh"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        config = manifest["config"]
        layers, _, _ = config["layers"], config["model"]["d_model"], config["dtype"]  # what every reader uses
        bad = [layer for layer in layers if not (isinstance(layer, str) and PLAIN_NAME.fullmatch(layer))]
        if bad:
            raise UserError(f"{path}: layer name {bad[0]!r} is not a plain name (letters, digits, _); {damaged}")
        files = {f"{layer}.npy" for layer in layers} | set(SHARD_FILES)
        if config.get("answer_tokens"):
            files |= {f"{ANSWER_PREFIX}{layer}.npy" for layer in layers} | {ANSWER_OFFSETS}
        for shard in manifest["shards"]:
            name = shard["name"]
            if not (isinstance(name, str) and SHARD_NAME.fullmatch(name)):
                raise UserError(f"{path}: shard name {name!r} is not a shard of this cache (shard_NNNNN); {damaged}")
            if set(shard["sha256"]) != files:
                raise UserError(f"{path}: shard {name} lists the files {sorted(shard['sha256'])}, not the "
                                f"cache's {sorted(files)}; {damaged}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); {damaged}") from None
    except (KeyError, TypeError, IndexError) as e:
        raise UserError(f"{path} lacks an entry of an activation cache manifest ({type(e).__name__}: {e}); "
                        f"{damaged}") from None
    return manifest


def check_shard(directory: Path, record: dict[str, Any], hashes: bool) -> None:
    """Every file of a shard is there and exactly as long as its .npy header says (cheap: always checked, so
    a truncated file is named here, not hit as a numpy error or a bus error mid-training), and with `hashes`
    has the sha256 the manifest recorded; UserError naming the first bad file."""
    again = f"delete {directory} and run `fit` again to recollect it"
    for name, expected in record["sha256"].items():
        path = directory / name
        if not path.is_file():
            raise UserError(f"activation cache file {path} is missing; {again}")
        problem = _npy_problem(path)
        if problem:
            raise UserError(f"activation cache file {path} is corrupted or truncated ({problem}); {again}")
        if hashes and sha256_file(path) != expected:
            raise UserError(f"activation cache file {path} is corrupted or truncated (sha256 mismatch); {again}")


def _npy_problem(path: Path) -> str | None:
    """Why a file cannot be the .npy array its header describes (no header, or another size), else None."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            expected = f.tell() + math.prod(shape) * dtype.itemsize
    except (ValueError, OSError, SyntaxError) as e:
        return f"no .npy header: {e}"
    size = path.stat().st_size
    return None if size == expected else f"{size} bytes where its header needs {expected}"


class InferencePipeline:
    """Batched no-grad inference over the prompts, writing the activation cache shard by shard."""

    def __init__(self, wrapper: ModelWrapper, cfg: ActivationConfig, cache_dir: str | Path) -> None:
        self.wrapper = wrapper
        self.cfg = cfg
        self.layers = wrapper.resolve_layers(cfg.layers)
        self.dtype = self._storage_dtype(cfg.dtype, wrapper.device)
        self.dir = Path(cache_dir)

    @staticmethod
    def _storage_dtype(dtype: str, device: torch.device) -> str:
        if dtype == "auto":
            return "bfloat16" if device.type == "cuda" else "float32"
        return dtype

    def cache_config(self, samples: Sequence[tuple[PromptSample, Split]]) -> dict[str, Any]:
        """Everything that determines the cache's content; a cache is reused only if this matches exactly."""
        return {
            "format": CACHE_FORMAT,
            "model": self.wrapper.identity,
            "layers": self.layers,
            "dtype": self.dtype,
            "shard_size": self.cfg.shard_size,
            "batch_size": self.cfg.batch_size,
            "n_prompts": len(samples),
            "prompts_sha256": prompts_fingerprint(samples),
            **({"answer_tokens": self.cfg.answer_tokens} if self.cfg.answer_tokens else {}),  # older caches: none
        }

    @staticmethod
    def samples(splits: dict[Split, list[PromptSample]]) -> list[tuple[PromptSample, Split]]:
        """Every prompt to collect with its split, in cache order."""
        samples = [(s, split) for split in SPLITS for s in splits.get(split, [])]
        if not samples:
            raise UserError("data.activations: the prompt list is empty; nothing to collect")
        return samples

    def check(self, splits: dict[Split, list[PromptSample]]) -> None:
        """Refuse what `run` would refuse (a directory that is not a cache; without `overwrite`, a cache of
        another config) before anything is written, so a refused run leaves its run directory as it was."""
        self._manifest(self.cache_config(self.samples(splits)))

    def run(self, splits: dict[Split, list[PromptSample]]) -> ActivationCache:
        """Collect (or finish collecting) activations for every prompt of both splits; return the cache.

        The cache directory is locked meanwhile: a second process collecting into it stops at once."""
        samples = self.samples(splits)
        config = self.cache_config(samples)
        categories = sorted({s.category for s, _ in samples})
        self._prefix = template_prefix(self.wrapper, [s for s, _ in samples])
        n_shards = -(-len(samples) // self.cfg.shard_size)
        with directory_lock(self.dir, "activation cache", "data.activations.cache_dir"):
            done = self._resume(config)
            missing = [index for index in range(n_shards) if index not in done]
            bar = tqdm(total=len(samples), initial=sum(s["prompts"][1] - s["prompts"][0] for s in done.values()),
                       desc="collecting activations", unit="prompt")
            for index in missing:
                start = index * self.cfg.shard_size
                block = samples[start : start + self.cfg.shard_size]
                done[index] = self._write_shard(index, start, block, categories, bar)
                self._write_manifest(config, categories, [done[i] for i in sorted(done)],
                                     complete=len(done) == n_shards)
            bar.close()
        return ActivationCache(self.dir, verify=False)

    def _manifest(self, config: dict[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
        """The cache's manifest (None if there is none yet) and the config keys it differs in; refuses a
        directory holding other files and, without `overwrite`, a cache built by another config."""
        if not self.dir.is_dir():
            return None, []
        foreign = sorted(p.name for p in self.dir.iterdir() if not CACHE_ENTRY.fullmatch(p.name))
        if foreign:
            raise UserError(
                f"data.activations.cache_dir: {self.dir} holds files that are not part of an activation cache "
                f"({', '.join(foreign[:3])}); choose an empty or new directory"
            )
        path = self.dir / MANIFEST
        if not path.is_file():
            return None, []
        manifest = read_manifest(path)
        changed = _differences(manifest["config"], config)
        if changed and not self.cfg.overwrite:
            listed = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
            raise UserError(
                f"activation cache {self.dir} was built with a different {listed}; "
                "delete it, choose another data.activations.cache_dir, or set data.activations.overwrite: true"
            )
        return manifest, changed

    def _resume(self, config: dict[str, Any]) -> dict[int, dict[str, Any]]:
        """Shards already complete for this exact config, by index; every other cache file in the directory is
        removed. A recorded shard whose directory was deleted (as a corrupted shard's error advises) is
        collected again."""
        self.dir.mkdir(parents=True, exist_ok=True)
        manifest, changed = self._manifest(config)
        done: dict[int, dict[str, Any]] = {}
        if manifest is not None:
            if changed:
                log.warning("rebuilding activation cache %s (changed: %s)", self.dir, ", ".join(changed))
            else:
                deleted = [s["name"] for s in manifest["shards"] if not (self.dir / s["name"]).is_dir()]
                done = {int(s["name"].removeprefix("shard_")): s
                        for s in manifest["shards"] if s["name"] not in deleted}
                if deleted:
                    state = f"{', '.join(deleted)} deleted; collecting {'it' if len(deleted) == 1 else 'them'} again"
                elif manifest.get("complete"):
                    state = "complete; reusing it"
                else:
                    state = f"resuming after {len(done)} shards"
                log.info("activation cache %s: %s", self.dir, state)
        keep = {s["name"] for s in done.values()} | ({MANIFEST} if done else set()) | {LOCK_FILE}
        for entry in self.dir.iterdir():  # partial shards of a killed run, or a cache being rebuilt
            if entry.name not in keep:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        return done

    def _write_manifest(self, config: dict[str, Any], categories: list[str],
                        shards: list[dict[str, Any]], complete: bool) -> None:
        try:
            write_json(self.dir / MANIFEST, {"config": config, "categories": categories, "splits": list(SPLITS),
                                             "shards": shards, "complete": complete, "template_prefix": self._prefix})
        except OSError as e:
            raise UserError(
                f"writing {self.dir / MANIFEST} failed ({e.strerror or e}); free disk space or set "
                "data.activations.cache_dir elsewhere; the shards recorded so far are kept and the next run resumes"
            ) from e

    def _write_shard(self, index: int, start: int, block: list[tuple[PromptSample, Split]],
                     categories: list[str], bar: tqdm) -> dict[str, Any]:
        name = f"shard_{index:05d}"
        tmp = self.dir / f".{name}.tmp"
        try:
            tmp.mkdir()
            record = self._fill_shard(tmp, start, block, categories, bar)
            tmp.rename(self.dir / name)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(
                f"writing activation shard {self.dir / name} failed ({e.strerror or e}); free disk space or "
                "set data.activations.cache_dir elsewhere; complete shards are kept and the next run resumes"
            ) from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return {"name": name, **record}

    def _fill_shard(self, tmp: Path, start: int, block: list[tuple[PromptSample, Split]],
                    categories: list[str], bar: tqdm) -> dict[str, Any]:
        """Tokenize the block, preallocate memory-mapped files, fill them batch by batch, hash them.

        The files are memory maps, and a write to a map the disk cannot back kills the process with SIGBUS: so
        the free space is checked first and every file's blocks are allocated before anything is written to
        it, which turns a full disk into a UserError while the shard is still a temporary directory."""
        prompts = [s.prompt for s, _ in block]
        lengths = np.array([len(ids) for ids in self.wrapper.encode(prompts)], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        n_tokens = int(offsets[-1])
        arrays = self._allocate(tmp, "", n_tokens, n_tokens * TOKEN_DTYPE.itemsize + offsets.nbytes)
        tokens = np.zeros(n_tokens, TOKEN_DTYPE)
        row, prompt = 0, 0
        shared = SharedPrefix(self.wrapper, "activation collection")
        prefix: dict[str, torch.Tensor] = {}
        for pb in shared.batches(prompts, self.cfg.batch_size):
            batch = [block[i] for i in pb.rows]
            mask = pb.mask.bool().cpu()
            residuals = self.wrapper.residuals(pb.run_ids, pb.mask, self.layers, past=pb.past)
            if pb.offset:  # the template prefix's states are every prompt's: computed once, copied to each row
                if not prefix:
                    prefix = self.wrapper.residuals(shared.ids, torch.ones_like(shared.ids), self.layers)
                residuals = {layer: torch.cat([prefix[layer].expand(len(acts), -1, -1), acts], 1)
                             for layer, acts in residuals.items()}
            n = int(mask.sum())
            for layer, acts in residuals.items():
                self._store(arrays[layer], row, acts[mask.to(acts.device)], layer, start, offsets)  # padding dropped
            for (sample, split), length in zip(batch, mask.sum(1).tolist()):
                t = tokens[offsets[prompt] : offsets[prompt] + length]
                t["prompt_index"] = start + prompt
                t["position"] = np.arange(length)
                t["is_last"][-1] = True
                t["refusal_label"] = sample.refusal_label
                t["category"] = categories.index(sample.category)
                t["dataset_type"] = DATASET_TYPES.index(sample.dataset_type)
                t["split"] = SPLITS.index(split)
                prompt += 1
            row += n
            bar.update(len(batch))
        for array in arrays.values():
            array.flush()
        del arrays
        np.save(tmp / "tokens.npy", tokens)
        np.save(tmp / "prompt_offsets.npy", offsets)
        if self.cfg.answer_tokens:
            self._fill_answers(tmp, start, prompts)
        return {
            "prompts": [start, start + len(block)],
            "n_tokens": n_tokens,
            "sha256": {p.name: sha256_file(p) for p in sorted(tmp.iterdir())},
        }


    def _allocate(self, tmp: Path, prefix: str, n_tokens: int, extra: int) -> dict[str, np.memmap]:
        """One `(n_tokens, d_model)` memory map per layer, `<prefix><layer>.npy` in `tmp`, its disk blocks allocated
        (`extra`: the bytes the caller writes beside them, counted in the free-space check)."""
        storage = np.dtype(STORAGE[self.dtype])
        need = n_tokens * len(self.layers) * self.wrapper.d_model * storage.itemsize + extra
        if need > _free_bytes(tmp):
            raise _no_space(tmp, need)
        try:
            return {layer: _allocated_memmap(tmp / f"{prefix}{layer}.npy", storage, (n_tokens, self.wrapper.d_model))
                    for layer in self.layers}
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise _no_space(tmp, need) from e

    def _store(self, array: np.memmap, row: int, real: torch.Tensor, layer: str, start: int,
               offsets: np.ndarray) -> None:
        """`real` (tokens, d_model) into `array` from `row` on, in the storage dtype; NaN/inf is one line naming the
        prompt (`offsets`: where each of the shard's prompts starts in `array`)."""
        bad = ~torch.isfinite(real).all(-1)
        if bad.any():
            first = int(np.searchsorted(offsets, row + int(bad.nonzero()[0, 0]), side="right")) - 1
            raise UserError(f"NaN/inf activations at layer {layer} for prompt {start + first}; use a wider dtype "
                            "(data.model.dtype: float32 or bfloat16) or check the model weights")
        stored = real.to(TORCH_DTYPES[self.dtype]).cpu()
        if self.dtype == "bfloat16":
            stored = stored.view(torch.int16)
        array[row : row + len(real)] = stored.numpy().view(STORAGE[self.dtype])

    def _fill_answers(self, tmp: Path, start: int, prompts: list[str]) -> None:
        """The model's greedy answers to the block's prompts (at most `answer_tokens` each, up to its end-of-turn
        token), run again after their prompts: the residuals at the answer's tokens, stored beside the prompts'.
        Right padding leaves every real token's positions and attention as in the prompt alone."""
        from refusal_sae.generation import generate

        answers = generate(self.wrapper, prompts, self.cfg.answer_tokens, self.cfg.batch_size,
                           desc="answers to cache").tokens
        ids = self.wrapper.encode(prompts)
        lengths = np.array([len(a) for a in answers], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        arrays = self._allocate(tmp, ANSWER_PREFIX, int(offsets[-1]), offsets.nbytes)
        pad = self.wrapper.tokenizer.pad_token_id or 0
        for first in range(0, len(prompts), self.cfg.batch_size):
            rows = range(first, min(first + self.cfg.batch_size, len(prompts)))
            width = max(len(ids[i]) + len(answers[i]) for i in rows)
            run = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros_like(run)
            for j, i in enumerate(rows):
                run[j, : len(ids[i]) + len(answers[i])] = torch.tensor(ids[i] + answers[i])
                mask[j, : len(ids[i]) + len(answers[i])] = 1
            residuals = self.wrapper.residuals(run, mask, self.layers)
            for layer, acts in residuals.items():
                real = torch.cat([acts[j, len(ids[i]) : len(ids[i]) + len(answers[i])] for j, i in enumerate(rows)])
                self._store(arrays[layer], int(offsets[first]), real, layer, start, offsets)
        for array in arrays.values():
            array.flush()
        del arrays
        np.save(tmp / ANSWER_OFFSETS, offsets)


def _allocated_memmap(path: Path, dtype: np.dtype, shape: tuple[int, int]) -> np.memmap:
    """A new .npy memory map whose disk blocks are allocated now (posix_fallocate), so that no later write to
    the map can find the disk full; ENOSPC is raised here as an OSError."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    if hasattr(os, "posix_fallocate"):  # not on macOS, where a full disk stays a bus error
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    return array


def _free_bytes(directory: Path) -> int:
    """Bytes an unprivileged process may still write to the filesystem of `directory`."""
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize


def _no_space(tmp: Path, need: int) -> UserError:
    """The one-line report of a full disk while writing the shard being built in `tmp`."""
    cache, shard = tmp.parent, tmp.name.strip(".").removesuffix(".tmp")
    return UserError(
        f"not enough disk space for activation shard {cache / shard}: it needs {need / 2**20:.3g} MiB and "
        f"{cache} has {_free_bytes(tmp) / 2**20:.3g} MiB free; free space there (or set data.activations.cache_dir "
        "to a larger disk) and run `fit` again: the complete shards are kept and collection resumes"
    )


def template_prefix(wrapper: ModelWrapper, samples: Sequence[PromptSample]) -> int:
    """Tokens every chat-formatted prompt of `samples` starts with (`refusal_sae.positions`): the same hidden states
    in every prompt, which the analysis never edits and SAE training leaves out by default."""
    from refusal_sae.positions import position_scheme

    return position_scheme(wrapper, list(samples), "positional").prefix


class TokenStream(torch.utils.data.IterableDataset):
    """Shuffled batches `{layer: (batch_size, d_model)}` of the same tokens for every layer, from a cache.

    Memory stays bounded whatever the cache size: shards are memory-mapped and visited one at a time in a
    seeded random order, and each batch gathers only its own rows. Under DDP (and across DataLoader
    workers) every shard's shuffled tokens are cut into equal disjoint parts, one per process, so the
    ranks see disjoint tokens and the same number of batches (the remainder and the last partial batch
    are dropped). Call `set_epoch` before each epoch for a new order. With `answers` (a cache with
    `answer_tokens`), the model's answer tokens after the chosen splits' prompts are drawn beside the prompts'.
    """

    def __init__(self, cache_dir: str | Path, layers: Sequence[str] | None = None, batch_size: int = 4096,
                 seed: int = 0, splits: Sequence[Split] = SPLITS, shuffle: bool = True,
                 with_index: bool = False, min_position: int = 0, answers: bool = False) -> None:
        super().__init__()
        self.dir = Path(cache_dir)
        cache = ActivationCache(self.dir, verify=False)
        self.layers = list(layers or cache.layers)
        unknown = [layer for layer in self.layers if layer not in cache.layers]
        if unknown:
            raise UserError(f"layer {unknown[0]} is not in activation cache {self.dir}; cached: {', '.join(cache.layers)}")
        self.batch_size = batch_size
        self.seed = seed
        self.split_codes = [SPLITS.index(s) for s in splits]
        self.shuffle = shuffle
        self.with_index = with_index  # also yield "index": each token's row in the whole cache
        self.min_position = min_position  # tokens before it (the shared template prefix) are left out
        if answers and not cache.has_answers:
            raise UserError(f"activation cache {self.dir} holds no answer tokens; collect it with "
                            "data.activations.answer_tokens > 0")
        if answers and with_index:
            raise ValueError("with_index numbers the prompt tokens only; it cannot be combined with answers")
        self.answers = answers
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def tokens_per_part(self, parts: int) -> int:
        """Tokens each of `parts` processes reads per epoch, the same every epoch: `// batch_size` is its
        number of batches, so 0 batches means training would take no optimiser step."""
        cache = ActivationCache(self.dir, verify=False)
        return sum(len(self._rows(cache, shard)) // parts for shard in range(len(cache.shards)))

    def _rows(self, cache: ActivationCache, shard: int) -> np.ndarray:
        """The rows of `shard` whose tokens belong to the chosen splits, from `min_position` on; with `answers`,
        then the answer tokens of those splits' prompts, numbered on after the shard's prompt tokens."""
        tokens = cache.tokens(shard)
        rows = np.flatnonzero(np.isin(tokens["split"], self.split_codes) & (tokens["position"] >= self.min_position))
        if not self.answers:
            return rows
        offsets = cache.answer_offsets(shard)
        split = np.repeat(tokens["split"][tokens["is_last"]], np.diff(offsets))  # each answer token's prompt's
        return np.concatenate([rows, len(tokens) + np.flatnonzero(np.isin(split, self.split_codes))])

    @staticmethod
    def _part() -> tuple[int, int]:
        """(this process's part, number of parts) over DDP ranks x DataLoader workers."""
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return rank * workers + worker, world * workers

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.iterate(*self._part())

    def iterate(self, part: int, parts: int) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of one of `parts` disjoint parts of this epoch's tokens."""
        cache = ActivationCache(self.dir, verify=False)
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(cache.shards)) if self.shuffle else range(len(cache.shards))
        keys = [*self.layers, *(["index"] if self.with_index else [])]
        first_row = np.cumsum([0] + [s["n_tokens"] for s in cache.shards])
        pending: list[dict[str, torch.Tensor]] = []
        n_pending = 0
        for shard in order:
            rows = self._rows(cache, shard)
            if self.shuffle:
                rows = rng.permutation(rows)
            share = len(rows) // parts
            mine = rows[part * share : (part + 1) * share]
            arrays = {layer: cache.activations(shard, layer) for layer in self.layers}  # unmapped after the shard
            answers = {layer: cache.answer_activations(shard, layer) for layer in self.layers} if self.answers else {}
            n_prompt_rows = cache.shards[shard]["n_tokens"]
            for start in range(0, len(mine), self.batch_size):
                chunk = np.sort(mine[start : start + self.batch_size])  # sorted: sequential reads
                if answers:  # prompt rows, then answer rows (numbered after the prompt tokens)
                    cut = np.searchsorted(chunk, n_prompt_rows)
                    batch = {layer: cache.to_torch(np.concatenate([array[chunk[:cut]],
                                                                   answers[layer][chunk[cut:] - n_prompt_rows]]))
                             for layer, array in arrays.items()}
                else:
                    batch = {layer: cache.to_torch(array[chunk]) for layer, array in arrays.items()}
                if self.with_index:
                    batch["index"] = torch.from_numpy(first_row[shard] + chunk)
                pending.append(batch)
                n_pending += len(chunk)
                while n_pending >= self.batch_size:
                    merged = {key: torch.cat([p[key] for p in pending]) for key in keys}
                    yield {key: x[: self.batch_size] for key, x in merged.items()}
                    rest = {key: x[self.batch_size :] for key, x in merged.items()}
                    n_pending -= self.batch_size
                    pending = [rest] if n_pending else []


class PromptActivations(torch.utils.data.Dataset):
    """Per-prompt views of a cache, for sequence-level analysis (circuit discovery aggregates over tokens).

    Item i is the i-th prompt of the chosen splits: `{"activations": {layer: (tokens, d_model)},
    "prompt_index", "category", "refusal_label", "split"}`.
    """

    def __init__(self, cache: ActivationCache, splits: Sequence[Split] = SPLITS,
                 layers: Sequence[str] | None = None) -> None:
        last = cache.prompt_metadata()
        self.rows = last[np.isin(last["split"], [SPLITS.index(s) for s in splits])]
        self.cache = cache
        self.layers = list(layers or cache.layers)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        return {
            "activations": self.cache.prompt(int(row["prompt_index"]), self.layers),
            "prompt_index": int(row["prompt_index"]),
            "category": self.cache.manifest["categories"][row["category"]],
            "refusal_label": bool(row["refusal_label"]),
            "split": SPLITS[row["split"]],
        }
