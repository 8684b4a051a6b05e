"""C kernels for the two parts of a CPU training step that PyTorch's own operators do slowly.

After the encoder matmul, a top-k SAE step on a CPU spends most of its time in two places: `torch.topk`
over the (tokens, width) pre-activations, which sorts far more than the k it keeps, and the sparse weight
gradients, where MKL's CSR product zero-fills, copies and sorts around a little arithmetic. Together they
cost about a third of the matmul at the issue's shape (4096 tokens, 896 x 7168, k 32, two cores);
`cpu_kernels.c` does each in one pass: `topk_relu` (which also adds b_enc as it scans, so the biased
pre-activations are never written) and `sparse_outer`. Both are deterministic.

The C file is compiled on first use with the system C compiler (`$CC`, else `cc`) at `-O3 -march=native
-fopenmp` into `cache_root()/kernels/<key>/`, where the key hashes the source, the flags, the compiler's
version and the CPU, so a cache shared by different machines holds one build per CPU. The build's sha256 is
recorded beside it (`cpu_kernels.so.sha256`) and checked before every load: a library changed since it
was built is rebuilt (with a warning) and never loaded. A record kept beside the library guards against damage,
not against someone who can write there (they can replace both), so the build directory, the library and its
record must also be this user's and writable by no one else (no group or other write bit, no symbolic link):
otherwise nothing is built or loaded there. It is loaded with ctypes and runs on PyTorch's
OpenMP threads (`torch.get_num_threads()`). The kernels are used for float32 tensors on the CPU;
everything else (CUDA, bf16) takes the PyTorch path. Without a working compiler they
are skipped with one warning: the results are the same up to float rounding of the gradient sums, only
slower. `REFUSAL_SAE_CPU_KERNELS=0` turns them off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import stat
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from refusal_sae.io import atomic_open, cache_root, sha256_file
from refusal_sae.validate import one_of

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11")
ENV_SWITCH = "REFUSAL_SAE_CPU_KERNELS"


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU model and feature flags (Linux), else the platform's name."""
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(dict.fromkeys(wanted)) or f"{platform.machine()} {platform.processor()}"


def compile_kernels(directory: str | Path, flags: Sequence[str] = FLAGS, compiler: str | None = None) -> Path:
    """Compile cpu_kernels.c into `directory/<key>/cpu_kernels.so` unless that build exists; return its path.

    The library is written to a temporary name and renamed into place, so concurrent processes (DDP ranks)
    never load a half-written file; its sha256 is recorded first. A build that does not match its record
    (changed since, or built before records were kept) is built again. Raises RuntimeError with the
    compiler's message if compilation fails.
    """
    compiler = compiler or os.environ.get("CC") or "cc"
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except OSError as e:
        raise RuntimeError(f"no C compiler {compiler!r} ({e})") from e
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(encoding="utf-8"), " ".join(flags), version, _cpu_identity()]).encode()
    ).hexdigest()[:16]
    target = Path(directory) / key / "cpu_kernels.so"
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private(target)
    if target.is_file():
        if _matches_record(target):
            return target
        warnings.warn(f"refusal_sae: {target} is not the library recorded when it was built (its sha256 differs, "
                      "or there is no record); rebuilding it", stacklevel=2)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                                timeout=300)
        if result.returncode != 0:
            message = (result.stderr.strip().splitlines() or ["no output"])[0]
            raise RuntimeError(f"{compiler} {' '.join(flags)} failed: {message}")
        with atomic_open(_record(target)) as f:
            f.write(f"{sha256_file(tmp)}\n")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _record(library: Path) -> Path:
    """Where the sha256 of a build is recorded."""
    return library.with_name(f"{library.name}.sha256")


def _check_private(library: Path) -> None:
    """Refuse (RuntimeError) a build directory, library or record that is not this user's alone."""
    for path in (library.parent, library, _record(library)):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        why = None
        if stat.S_ISLNK(st.st_mode):
            why = "is a symbolic link"
        elif st.st_uid != os.getuid():
            why = f"belongs to uid {st.st_uid}, not to this user ({os.getuid()})"
        elif st.st_mode & 0o022:
            why = f"is writable by group or others (mode {st.st_mode & 0o777:o})"
        if why:
            raise RuntimeError(f"{path} {why}: whoever can write there can replace the library and its recorded "
                               "sha256 together; not building or loading it (remove it, or set REFUSAL_SAE_CACHE to "
                               "a directory only you can write)")


def _matches_record(library: Path) -> bool:
    """Whether `library` is the file whose sha256 `compile_kernels` recorded."""
    try:
        return _record(library).read_text(encoding="ascii").strip() == sha256_file(library)
    except (OSError, UnicodeDecodeError):
        return False


class Kernels:
    """The compiled library, with tensor-level wrappers that check what the C code assumes."""

    def __init__(self, path: str | Path) -> None:
        """Load the library at `path` after checking that it and its record are private to this user and that it
        matches its recorded sha256: loading runs its code, so a file changed since it was built (damaged, or
        replaced in a shared cache) is refused (RuntimeError)."""
        _check_private(Path(path))
        if not _matches_record(Path(path)):
            raise RuntimeError(f"{path} does not match the sha256 recorded when it was built; not loading it")
        lib = ctypes.CDLL(str(path))
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.topk_relu.argtypes = [p, p, i64, i64, i64, p, p, p, p, ctypes.c_int]
        lib.topk_relu.restype = None
        lib.sparse_outer.argtypes = [p, p, p, i64, p, i64, i64, p, p, p, p, p, p, ctypes.c_int]
        lib.sparse_outer.restype = None
        self.lib = lib

    def topk_relu(self, pre: Tensor, bias: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The k largest entries of each row of `pre + bias` as (ReLU'd values, latents ascending); float32 (n, w).

        A row with a NaN gets NaN values, at latents that include a NaN one. Same selection as `torch.topk` of
        `pre + bias` wherever values do not tie.
        """
        pre, bias = pre.contiguous(), bias.contiguous()
        n, w = pre.shape
        if not 1 <= k <= w or bias.shape != (w,):
            raise ValueError(f"topk_relu needs 1 <= k <= width and a bias of shape ({w},); got k={k}, {bias.shape}")
        threads = max(1, min(torch.get_num_threads(), n))
        values = pre.new_empty(n, k)
        indices = torch.empty(n, k, dtype=torch.long)
        scratch_v = pre.new_empty(threads, w + k)
        scratch_i = torch.empty(threads, w + k, dtype=torch.long)
        self.lib.topk_relu(pre.data_ptr(), bias.data_ptr(), n, w, k, values.data_ptr(), indices.data_ptr(),
                           scratch_v.data_ptr(), scratch_i.data_ptr(), threads)
        return values, indices

    def sparse_outer(
        self, latents: Tensor, tokens: Tensor, weights: Tensor, rows: Tensor, width: int, dot_with: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """(width, d) float32 matrix whose row j sums weights[e] * rows[tokens[e]] over the e with latents[e] == j;
        with `dot_with` (width, d), also the e dot products <rows[tokens[e]], dot_with[latents[e]]>, else None.

        The decoder's backward pass needs both (its weight gradient and the gradient of each selected value):
        computing them from the same gathered row reads `rows` once instead of twice.
        """
        latents, tokens = latents.contiguous().long(), tokens.contiguous().long()
        weights, rows = weights.contiguous().float(), rows.contiguous()
        e, d = len(latents), rows.shape[1]
        if len(tokens) != e or len(weights) != e:
            raise ValueError(f"sparse_outer needs as many tokens and weights as latents ({e})")
        if e and not (0 <= int(latents.min()) and int(latents.max()) < width
                      and 0 <= int(tokens.min()) and int(tokens.max()) < len(rows)):
            raise ValueError("sparse_outer got a latent or token index out of range")
        if dot_with is not None and (dot_with.shape != (width, d) or dot_with.dtype != torch.float32):
            raise ValueError(f"sparse_outer needs dot_with as float32 ({width}, {d}); got {dot_with.dtype} "
                             f"{tuple(dot_with.shape)}")
        out = rows.new_empty(width, d)
        dots = rows.new_empty(e) if dot_with is not None else None
        dot_with = dot_with.contiguous() if dot_with is not None else None
        start = torch.zeros(width + 1, dtype=torch.long)
        cursor, order = torch.empty(width, dtype=torch.long), torch.empty(e, dtype=torch.long)
        self.lib.sparse_outer(latents.data_ptr(), tokens.data_ptr(), weights.data_ptr(), e, rows.data_ptr(), d,
                              width, out.data_ptr(), None if dot_with is None else dot_with.data_ptr(),
                              None if dots is None else dots.data_ptr(), start.data_ptr(), cursor.data_ptr(),
                              order.data_ptr(), max(1, torch.get_num_threads()))
        return out, dots


def enabled() -> bool:
    """Whether `REFUSAL_SAE_CPU_KERNELS` allows the kernels (unset or 1: yes; 0: no)."""
    value = os.environ.get(ENV_SWITCH, "1")
    one_of(f"environment variable {ENV_SWITCH}", value, ("0", "1"))
    return value == "1"


@functools.cache
def kernels() -> Kernels | None:
    """The kernels, compiled on first call; None (after one warning) if they cannot be built or loaded."""
    try:
        return Kernels(compile_kernels(cache_root() / "kernels"))
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        warnings.warn(f"refusal_sae: CPU kernels unavailable ({e}); SAE steps on the CPU use slower PyTorch "
                      f"operators instead (same results up to rounding). Install a C compiler with OpenMP "
                      f"(e.g. gcc) to enable them, or set {ENV_SWITCH}=0 to silence this.", stacklevel=2)
        return None


def usable(*tensors: Tensor) -> Kernels | None:
    """The kernels if they are enabled, built, and every tensor is a float32 CPU tensor; else None."""
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) or not enabled():
        return None
    return kernels()
