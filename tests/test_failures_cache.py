"""The activation cache and the run directory under faults: a changed model, a full disk, two runs at once,
damaged or edited cache files, a replaced kernel library; each ends in the right result or one clear line.

Issue 14: a cache of a changed model was reused; a full disk killed collection with a bus error; two fits on
one run directory deleted each other's temporary shards; following the corrupted-shard advice ended in a
traceback, as did `verify: false` with a truncated shard; manifest names were used as paths unchecked; the
compiled kernels were loaded unchecked; report files were private (0600) while shards were not.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from refusal_sae import cpu_kernels
from refusal_sae.activations import MANIFEST, ActivationCache, TokenStream
from refusal_sae.data import PromptConfig, prepare_prompts, write_splits
from refusal_sae.errors import UserError
from refusal_sae.io import LOCK_FILE, write_json
from refusal_sae.model import ModelConfig, ModelWrapper
from tests.collection import collect, run_child, tree
from tests.conftest import ROOT
from tests.run_cli import one_line_error
from tests.tiny_model import TEST_PROMPTS, make_tiny_model, tiny_fit_options

pytestmark = pytest.mark.usefixtures("one_thread")


def one_line(error: pytest.ExceptionInfo[UserError]) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------------
# Case 2: the cache is keyed by the model that produced it


def test_changed_weights_in_a_local_model_directory_make_its_cache_stale(splits, tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path / "model", n_layers=3)
    collect(model_dir, tmp_path / "cache", splits)
    other = make_tiny_model(tmp_path / "other", n_layers=3, seed=1)
    shutil.copyfile(other / "model.safetensors", model_dir / "model.safetensors")  # other weights, same size
    with pytest.raises(UserError) as error:
        collect(model_dir, tmp_path / "cache", splits)
    message = one_line(error)
    assert f"cache {tmp_path / 'cache'} was built with a different model.files['model.safetensors'];" in message
    assert "data.activations.overwrite: true" in message

    cache = collect(model_dir, tmp_path / "cache", splits, overwrite=True)
    wrapper = ModelWrapper(ModelConfig(name=str(model_dir)))
    enc = wrapper.tokenize([splits["discovery"][0].prompt])
    fresh = wrapper.residuals(enc["input_ids"], enc["attention_mask"], cache.layers)
    for layer in cache.layers:  # the new model's activations, not the old one's
        torch.testing.assert_close(cache.prompt(0)[layer], fresh[layer][0], rtol=1e-4, atol=1e-5)


def test_a_new_commit_of_a_hub_model_makes_its_cache_stale(splits, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub cache laid out as huggingface_hub writes it, offline: `main` moves to a new commit."""
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    repo = hub / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    commits = ["a" * 40, "b" * 40]
    for seed, commit in enumerate(commits):
        make_tiny_model(repo / "snapshots" / commit, n_layers=3, seed=seed)

    (repo / "refs" / "main").write_text(commits[0])
    cache = collect("org/tiny", tmp_path / "cache", splits)
    assert cache.manifest["config"]["model"]["commit"] == commits[0]
    (repo / "refs" / "main").write_text(commits[1])
    with pytest.raises(UserError) as error:
        collect("org/tiny", tmp_path / "cache", splits)
    assert "was built with a different model.commit;" in one_line(error)


# ------------------------------------------------------------------------------------------------
# Case 6: a full disk


def shards_of(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name.startswith("shard_"))


def test_a_disk_that_fills_up_stops_collection_with_one_line_and_the_cache_resumes(
    tiny_dir: Path, splits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """statvfs reports the disk full once the first shard is written (the OS boundary; nothing of ours is
    replaced). The run stops naming the shard, the space needed and the space free; once space is free again
    the next run finishes the cache, identical to one collected without interruption."""
    cache = tmp_path / "cache"
    real_statvfs = os.statvfs

    def filling(path):
        result = real_statvfs(path)
        if cache.is_dir() and shards_of(cache):
            return os.statvfs_result((*result[:3], 0, 0, *result[5:]))
        return result

    monkeypatch.setattr(os, "statvfs", filling)
    with pytest.raises(UserError) as error:
        collect(tiny_dir, cache, splits)
    message = one_line(error)
    assert f"not enough disk space for activation shard {cache / 'shard_00001'}: it needs " in message
    assert f"MiB and {cache} has 0 MiB free; free space there" in message
    assert json.loads((cache / MANIFEST).read_text())["shards"][0]["name"] == "shard_00000"
    assert sorted(p.name for p in cache.iterdir()) == [MANIFEST, "shard_00000"]  # nothing half-written

    monkeypatch.undo()
    collect(tiny_dir, cache, splits)
    collect(tiny_dir, tmp_path / "whole", splits)
    assert tree(cache) == tree(tmp_path / "whole")
    ActivationCache(cache)  # every sha256 checks


def test_no_space_when_allocating_a_shard_file_is_one_line(
    tiny_dir: Path, splits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills between the free-space check and the allocation (another process wrote to it): the
    allocation's ENOSPC, not a bus error on a write to the memory map, stops the run."""

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(UserError) as error:
        collect(tiny_dir, tmp_path / "cache", splits)
    assert f"not enough disk space for activation shard {tmp_path / 'cache' / 'shard_00000'}" in one_line(error)
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.undo()
    assert collect(tiny_dir, tmp_path / "cache", splits).n_prompts == 40


# ------------------------------------------------------------------------------------------------
# Case 10: two runs on one directory


def holder_of(lock: Path) -> str:
    try:
        return lock.read_text().strip()
    except FileNotFoundError:
        return ""


def stop_once_locked(process: subprocess.Popen, lock: Path) -> None:
    """SIGSTOP `process` as soon as it holds `lock` (so it keeps holding it as long as the test needs)."""
    deadline = time.monotonic() + 300  # only so that a broken run cannot hang the suite
    while holder_of(lock) != str(process.pid) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert holder_of(lock) == str(process.pid), f"the first process never took {lock}"
    process.send_signal(signal.SIGSTOP)


@pytest.mark.slow
def test_a_second_fit_on_a_busy_run_directory_stops_naming_the_other_process(tmp_path: Path) -> None:
    """Two real `fit` processes on one run directory: the second stops at once with one line naming the
    directory and the first one's pid. The first is then killed: its lock dies with it, and the next fit
    finishes the run with a cache whose every checksum holds."""
    options = [*tiny_fit_options(tmp_path / "tiny"), "--model.sae.num_latents", "128", "--trainer.max_epochs", "1",
               "--run_dir", str(tmp_path / "run")]
    command = [sys.executable, "-m", "refusal_sae", "fit", *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        stop_once_locked(first, tmp_path / "run" / LOCK_FILE)
        second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    finally:
        first.kill()
        first.wait()
    assert one_line_error(second) == (f"error: run directory {tmp_path / 'run'} is in use by another refusal_sae "
                                      f"process (pid {first.pid}); wait for it to end or stop it, or give another "
                                      "--run_dir")

    third = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert third.returncode == 0, third.stderr[-3000:]
    ActivationCache(tmp_path / "run" / "activations")
    assert not (tmp_path / "run" / LOCK_FILE).exists()


@pytest.mark.slow
def test_two_collections_into_one_cache_directory(tiny_dir: Path, tmp_path: Path) -> None:
    """Two real processes collect into one cache (as two runs sharing data.activations.cache_dir would): the
    second stops naming the first; the first, resumed, finishes a cache whose every checksum holds."""
    prompts = tmp_path / "data" / "prompts.csv"
    prepare_prompts(PromptConfig(source=str(TEST_PROMPTS), balance="n_per_category", n_per_category=2, seed=0), prompts,
                    prompts.parent / "data_report", prompts.parent / "balanced_report")
    cache = tmp_path / "cache"
    first = run_child(str(tiny_dir), str(prompts), str(cache))
    try:
        stop_once_locked(first, cache / LOCK_FILE)
        second = run_child(str(tiny_dir), str(prompts), str(cache))
        assert second.wait(timeout=300) != 0
        assert (f"UserError: activation cache {cache} is in use by another refusal_sae process (pid {first.pid})"
                in second.stderr.read())
        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=300) == 0, first.stderr.read()
    finally:
        first.kill()
        first.wait()
    lock = cache / LOCK_FILE  # the writer removed its lock; a reader's (the child opened the cache it wrote) is empty
    assert not lock.exists() or lock.read_text() == ""
    assert ActivationCache(cache).n_prompts == 40


# ------------------------------------------------------------------------------------------------
# Damaged or edited cache files


REBUILD = """
import sys
from refusal_sae.activations import ActivationConfig, InferencePipeline
from refusal_sae.data import read_splits
from refusal_sae.model import ModelConfig, ModelWrapper
model_dir, prompts_csv, cache_dir = sys.argv[1:4]
cfg = ActivationConfig(layers=[1], shard_size=16, batch_size=5, overwrite=True)
InferencePipeline(ModelWrapper(ModelConfig(name=model_dir)), cfg, cache_dir).run(read_splits(prompts_csv))
"""
HOLD = """
import sys
from refusal_sae.io import directory_lock
with directory_lock(sys.argv[1], "activation cache", "data.activations.cache_dir"):
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_a_cache_being_read_is_not_rebuilt_and_one_being_written_is_not_read(tiny_dir: Path, splits,
                                                                             tmp_path: Path) -> None:
    """#30 case 12: readers of a cache hold a shared lock. Another process rebuilding it (`overwrite: true`, other
    layers) while this one reads it is refused before it deletes anything; a cache another process is writing is
    refused to a new reader, naming that process."""
    cache = collect(tiny_dir, tmp_path / "cache", splits)  # this process reads it from now on
    manifest = (cache.dir / MANIFEST).read_bytes()
    prompts = tmp_path / "prompts.csv"
    write_splits(splits, prompts)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    rebuild = subprocess.run([sys.executable, "-c", REBUILD, str(tiny_dir), str(prompts), str(cache.dir)], env=env,
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rebuild.returncode != 0
    assert f"activation cache {cache.dir.resolve()} is in use by another refusal_sae process (one or more reading it)" \
        in rebuild.stderr, rebuild.stderr
    assert (cache.dir / MANIFEST).read_bytes() == manifest and cache.activations(0, "residuals_0").shape[0] > 0
    other = Path(shutil.copytree(cache.dir, tmp_path / "other", ignore=shutil.ignore_patterns(LOCK_FILE)))
    writer = subprocess.Popen([sys.executable, "-c", HOLD, str(other)], env=env, cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "held"
        with pytest.raises(UserError) as e:
            ActivationCache(other)
        assert f"is being written by another refusal_sae process (pid {writer.pid})" in one_line(e)
    finally:
        writer.communicate("\n", timeout=60)
    assert ActivationCache(other).n_tokens == cache.n_tokens  # the writer gone, it reads


def test_following_the_corrupted_shard_advice_recollects_that_shard(tiny_dir: Path, splits, tmp_path: Path) -> None:
    """Collect, corrupt a file, do literally what the error says (delete the named shard, run again): the
    run recollects only that shard, and the cache is the one first collected, byte for byte."""
    cache = tmp_path / "cache"
    collect(tiny_dir, cache, splits)
    original = tree(cache)
    target = cache / "shard_00001" / "residuals_2.npy"
    data = bytearray(target.read_bytes())
    data[-7] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(UserError) as error:
        ActivationCache(cache)  # what `fit` opens after collection
    message = one_line(error)
    assert message.endswith(f"delete {cache / 'shard_00001'} and run `fit` again to recollect it")
    shutil.rmtree(cache / "shard_00001")
    stamp = (cache / "shard_00000" / "tokens.npy").stat().st_mtime_ns
    collect(tiny_dir, cache, splits)
    ActivationCache(cache)
    assert tree(cache) == original
    assert (cache / "shard_00000" / "tokens.npy").stat().st_mtime_ns == stamp  # the others were kept


def test_a_truncated_shard_is_one_line_without_verification(tiny_dir: Path, splits, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    collect(tiny_dir, cache, splits)
    target = cache / "shard_00002" / "residuals_0.npy"
    target.write_bytes(target.read_bytes()[:-100])
    for open_it in (lambda: ActivationCache(cache, verify=False), lambda: TokenStream(cache)):
        with pytest.raises(UserError) as error:
            open_it()
        assert f"activation cache file {target} is corrupted or truncated" in one_line(error)
        assert f"delete {cache / 'shard_00002'} and run `fit` again" in str(error.value)


@pytest.mark.parametrize("absolute", [False, True])
def test_shard_names_in_the_manifest_stay_inside_the_cache(tiny_dir: Path, splits, tmp_path: Path,
                                                           absolute: bool) -> None:
    """A manifest pointing a shard outside the cache is refused, even where the files there would check."""
    cache = tmp_path / "cache"
    collect(tiny_dir, cache, splits)
    outside = tmp_path / "outside"
    shutil.copytree(cache / "shard_00001", outside)
    name = str(outside) if absolute else "../outside"
    manifest = json.loads((cache / MANIFEST).read_text())
    manifest["shards"][1]["name"] = name
    write_json(cache / MANIFEST, manifest)
    with pytest.raises(UserError) as error:
        ActivationCache(cache)
    assert f"{cache / MANIFEST}: shard name {name!r} is not a shard of this cache" in one_line(error)
    with pytest.raises(UserError, match="is not a shard of this cache"):
        collect(tiny_dir, cache, splits)
    assert (outside / "tokens.npy").is_file()  # nothing outside was read as the cache's or deleted


def test_a_layer_name_in_the_manifest_cannot_name_a_path(tiny_dir: Path, splits, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    collect(tiny_dir, cache, splits)
    manifest = json.loads((cache / MANIFEST).read_text())
    manifest["config"]["layers"][1] = "../../residuals_2"
    write_json(cache / MANIFEST, manifest)
    with pytest.raises(UserError) as error:
        ActivationCache(cache, verify=False)
    assert "layer name '../../residuals_2' is not a plain name" in one_line(error)


# ------------------------------------------------------------------------------------------------
# The compiled kernels


@pytest.mark.slow
@pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler")
def test_a_replaced_kernel_library_is_never_loaded(tmp_path: Path) -> None:
    """Someone who can write the kernel cache swaps the library for one that runs code when loaded: it is
    refused before loading, and the next build replaces it with the real kernels."""
    library = cpu_kernels.compile_kernels(tmp_path / "kernels")
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.c"
    evil.write_text('#include <stdio.h>\n__attribute__((constructor)) static void run(void) '
                    f'{{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n')
    subprocess.run([os.environ.get("CC") or "cc", "-shared", "-fPIC", str(evil), "-o", str(library)], check=True)

    with pytest.raises(RuntimeError, match="does not match the sha256 recorded when it was built; not loading it"):
        cpu_kernels.Kernels(library)
    assert not marker.exists()
    with pytest.warns(UserWarning, match="is not the library recorded when it was built"):
        rebuilt = cpu_kernels.compile_kernels(tmp_path / "kernels")
    assert rebuilt == library
    kernels = cpu_kernels.Kernels(rebuilt)
    assert not marker.exists()
    values, indices = kernels.topk_relu(torch.tensor([[0.5, -1.0, 2.0, 1.0]]), torch.zeros(4), 2)
    assert indices.tolist() == [[2, 3]] and values.tolist() == [[2.0, 1.0]]


# ------------------------------------------------------------------------------------------------
# File modes


def test_atomically_written_files_get_the_mode_of_any_new_file(tiny_dir: Path, splits, tmp_path: Path) -> None:
    """Reports and manifests (written atomically) and shards (written by numpy) get the same mode: the umask's."""
    old = os.umask(0o022)
    try:
        collect(tiny_dir, tmp_path / "cache", splits)
        write_json(tmp_path / "report.json", {})
        os.umask(0o077)
        write_json(tmp_path / "private.json", {})
    finally:
        os.umask(old)
    mode = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "report.json", tmp_path / "private.json",
                                                       tmp_path / "cache" / MANIFEST)}
    assert mode == {"report.json": 0o644, "private.json": 0o600, MANIFEST: 0o644}
    assert (tmp_path / "cache" / "shard_00000" / "tokens.npy").stat().st_mode & 0o777 == 0o644


def test_a_lock_file_that_is_a_symbolic_link_is_refused_and_its_target_left_alone(tmp_path: Path) -> None:
    """The lock file is written (the holder's pid): a link planted at `.lock` would have that write truncate
    whatever it points to."""
    from refusal_sae.io import directory_lock

    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).symlink_to(target)
    with pytest.raises(UserError, match=r"\.lock is a symbolic link; a lock file never is: remove it"):
        with directory_lock(run_dir, "run directory", "--run_dir"):
            pass
    assert target.read_text() == "keep me\n"
