"""The C kernels (refusal_sae/cpu_kernels.c) against PyTorch's own operators on the same inputs."""

from __future__ import annotations

import os
import platform
import shutil

import pytest
import torch

from refusal_sae import cpu_kernels
from refusal_sae.errors import UserError
from refusal_sae.sae import SAEConfig, SparseAutoencoder

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler: the kernels cannot be built"
)


@pytest.fixture(scope="module")
def kernels() -> cpu_kernels.Kernels:
    built = cpu_kernels.kernels()
    assert built is not None, "a C compiler is installed but the kernels did not build (see the warning)"
    return built


def torch_topk(pre: torch.Tensor, bias: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, indices = (pre + bias).topk(k, dim=-1)
    indices, order = indices.sort(dim=-1)
    return values.gather(-1, order).relu(), indices


@pytest.mark.parametrize(("n", "width", "k"), [(37, 103, 5), (16, 64, 64), (9, 9, 1), (50, 1000, 32), (3, 17, 16)])
def test_topk_relu_selects_what_torch_topk_selects(kernels, n, width, k):
    g = torch.Generator().manual_seed(width + k)
    pre, bias = torch.randn(n, width, generator=g), torch.randn(width, generator=g)
    pre[::3] -= 3.0  # these rows have fewer than k positive entries: the ReLU zeroes part of their top k
    values, indices = kernels.topk_relu(pre, bias, k)
    expected_values, expected_indices = torch_topk(pre, bias, k)
    assert ((expected_values > 0).sum(-1) < k).any()
    assert torch.equal(indices, expected_indices)
    assert torch.equal(values, expected_values)


def test_topk_relu_turns_a_row_with_nan_into_nan(kernels):
    pre, bias = torch.randn(6, 200), torch.randn(200)
    pre[2, 150] = float("nan")
    pre[4, 199] = float("nan")
    values, indices = kernels.topk_relu(pre, bias, 8)
    expected_values, expected_indices = torch_topk(pre, bias, 8)
    for row in (2, 4):
        assert values[row].isnan().all() and (indices[row] == (150 if row == 2 else 199)).any()
        assert torch.equal(indices[row], indices[row].sort().values)
    clean = [0, 1, 3, 5]
    assert torch.equal(values[clean], expected_values[clean]) and torch.equal(indices[clean], expected_indices[clean])


def test_topk_relu_rejects_k_outside_the_width(kernels):
    with pytest.raises(ValueError, match="1 <= k <= width"):
        kernels.topk_relu(torch.randn(2, 5), torch.zeros(5), 6)


def test_sparse_outer_sums_rows_per_latent_the_same_with_any_thread_count(kernels):
    g = torch.Generator().manual_seed(0)
    width, n, d, entries = 300, 120, 37, 2000
    latents = torch.randint(width - 20, (entries,), generator=g)  # the last 20 latents get no entry
    tokens = torch.randint(n, (entries,), generator=g)
    weights, rows = torch.randn(entries, generator=g), torch.randn(n, d, generator=g)
    expected = torch.zeros(width, d, dtype=torch.float64).index_add_(
        0, latents, weights.double()[:, None] * rows.double()[tokens]
    )
    other = torch.randn(width, d, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, no_dots = kernels.sparse_outer(latents, tokens, weights, rows, width)
        torch.set_num_threads(2)
        two, dots = kernels.sparse_outer(latents, tokens, weights, rows, width, dot_with=other)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(one, two)  # each output row is summed by one thread in input order
    assert not one[-20:].any() and one[:-20].abs().sum(1).gt(0).all()
    assert no_dots is None
    torch.testing.assert_close(dots, (rows[tokens] * other[latents]).sum(1), rtol=1e-5, atol=1e-5)


def test_sparse_outer_rejects_indices_out_of_range(kernels):
    with pytest.raises(ValueError, match="out of range"):
        kernels.sparse_outer(torch.tensor([0, 5]), torch.tensor([0, 1]), torch.ones(2), torch.ones(2, 3), 5)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="-mno-avx2 is an x86 flag")
def test_portable_build_without_avx2_gives_the_same_results(kernels, tmp_path):
    portable = cpu_kernels.Kernels(
        cpu_kernels.compile_kernels(tmp_path, (*cpu_kernels.FLAGS, "-mno-avx2", "-mno-avx"))
    )
    pre, bias = torch.randn(64, 515), torch.randn(515) * 0.1
    for got, expected in zip(portable.topk_relu(pre, bias, 20), kernels.topk_relu(pre, bias, 20)):
        assert torch.equal(got, expected)
    latents, tokens = torch.randint(100, (800,)), torch.randint(64, (800,))
    weights, rows = torch.randn(800), torch.randn(64, 33)
    other = torch.randn(100, 33)
    for got, expected in zip(portable.sparse_outer(latents, tokens, weights, rows, 100, dot_with=other),
                             kernels.sparse_outer(latents, tokens, weights, rows, 100, dot_with=other)):
        torch.testing.assert_close(got, expected)


def test_compile_reuses_a_build_and_reports_compiler_errors(tmp_path):
    path = cpu_kernels.compile_kernels(tmp_path)
    stamp = path.stat().st_mtime_ns
    assert cpu_kernels.compile_kernels(tmp_path) == path and path.stat().st_mtime_ns == stamp
    with pytest.raises(RuntimeError, match="no C compiler"):
        cpu_kernels.compile_kernels(tmp_path / "a", compiler=str(tmp_path / "no-such-cc"))
    with pytest.raises(RuntimeError, match="failed"):
        cpu_kernels.compile_kernels(tmp_path / "b", flags=(*cpu_kernels.FLAGS, "-fno-such-flag"))
    assert not [p for p in (tmp_path / "b").rglob("*") if p.is_file()]  # nothing half-written left behind


def test_without_a_compiler_the_kernels_are_skipped_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("REFUSAL_SAE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.warns(UserWarning, match="CPU kernels unavailable"):
        assert cpu_kernels.kernels.__wrapped__() is None


def test_switch_and_dtypes_decide_where_the_kernels_run(kernels, monkeypatch):
    x = torch.zeros(2, 3)
    assert cpu_kernels.usable(x) is kernels
    assert cpu_kernels.usable(x, x.bfloat16()) is None
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    assert cpu_kernels.usable(x) is None
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "yes")
    with pytest.raises(UserError, match="environment variable REFUSAL_SAE_CPU_KERNELS: 'yes' is not a known value; use one of 0, 1"):
        cpu_kernels.usable(x)


def test_training_step_is_the_same_with_and_without_the_kernels(kernels, monkeypatch):
    """Same features and losses bit for bit (the same float sums select the same latents); gradients equal up
    to the summation order of the sparse weight gradients."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=24, num_latents=256, k=8, dead_tokens_threshold=1)).train()
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.3)
    dead = torch.zeros_like(sae.tokens_since_fired)
    dead[:100] = 5  # these latents are dead: AuxK runs too
    x = torch.randn(200, 24)
    results = {}
    for switch in ("1", "0"):
        monkeypatch.setenv(cpu_kernels.ENV_SWITCH, switch)
        sae.tokens_since_fired.copy_(dead)
        sae.zero_grad()
        out = sae(x)
        out.loss.backward()
        results[switch] = out, {name: p.grad.clone() for name, p in sae.named_parameters()}
    (on, on_grads), (off, off_grads) = results["1"], results["0"]
    assert torch.equal(on.indices, off.indices) and torch.equal(on.values, off.values)
    assert torch.equal(on.reconstruction, off.reconstruction) and torch.equal(on.loss, off.loss)
    assert on.auxk_loss > 0
    for name, grad in on_grads.items():
        torch.testing.assert_close(grad, off_grads[name], rtol=1e-5, atol=1e-7)


def test_a_library_anyone_else_could_have_replaced_is_never_loaded(tmp_path):
    """A library and its sha256 record both sit in the cache, so whoever can write there can replace both: a build
    directory, library or record writable by group or others (or a symbolic link) is refused, not loaded."""
    path = cpu_kernels.compile_kernels(tmp_path)
    assert path.parent.stat().st_mode & 0o077 == 0  # built into a directory only this user can write
    cpu_kernels.Kernels(path)
    for victim in (path.parent, path, path.with_name(f"{path.name}.sha256")):
        mode = victim.stat().st_mode
        victim.chmod(mode | 0o022)
        with pytest.raises(RuntimeError, match=r"writable by group or others .*not building or loading it"):
            cpu_kernels.Kernels(path)
        with pytest.raises(RuntimeError, match="writable by group or others"):
            cpu_kernels.compile_kernels(tmp_path)
        victim.chmod(mode)
    elsewhere = tmp_path / "elsewhere.so"
    path.rename(elsewhere)
    path.symlink_to(elsewhere)
    with pytest.raises(RuntimeError, match="is a symbolic link"):
        cpu_kernels.Kernels(path)
