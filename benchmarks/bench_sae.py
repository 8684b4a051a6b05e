"""SAE training throughput and quality: refusal_sae's top-k SAE vs EleutherAI's sparsify, in one run.

Both sides start from the same weights (sparsify's SparseCoder gets a copy of ours: same tensor names),
see the same batches and take the same training step: forward with FVU + AuxK loss, backward, decoder
gradient projection, Adam step, decoder rows back to unit norm, dead-latent bookkeeping. Reported:

  step ms        median wall time of one training step (after warm-up steps), and tokens per second;
  x floor        that time over the time of one dense encoder matmul (tokens x d_in x width), the
                 least any top-k SAE step must do (it has to score every latent for every token). The
                 matmul writes into a preallocated output, timed once after each pair of steps (same load);
                 `floor_new_output_ms` is the same matmul into a new tensor each time, which on a CPU adds
                 page faults (glibc maps blocks over 32 MB afresh each time);
  fvu            FVU of each SAE on held-out tokens after the same number of training tokens;
  dead           fraction of latents silent for the last `--dead-tokens` training tokens.

On a CPU a third side, "refusal_sae, PyTorch ops", is the same SAE stepped with its C kernels switched off
(REFUSAL_SAE_CPU_KERNELS=0, see refusal_sae/cpu_kernels.py): what the kernels save.

Data: sparse non-negative mixtures of a random dictionary (default), or a layer of an activation cache
(`--cache runs/default/activations --layer residuals_12`). Precision: fp32 on the CPU; on a GPU both
run under bf16 autocast, as `precision: bf16-mixed` does (sparsify always autocasts its forward there).

Both sides use torch.optim.Adam(fused=True), as SAEModule builds it by default (one kernel per parameter);
`--foreach-adam` gives both torch's default implementation instead (about ten elementwise passes over each
parameter: about 75 ms instead of 13 ms per step at width 7168 on two CPU cores). `--profile` prints where
refusal_sae's step spends its time.

    python -m benchmarks.bench_sae [--quick] [--d-in 896 --expansion 4 | --width N] [--k 32 --batch 1024 --steps 40]
                                   [--cache DIR --layer NAME] [--device auto] [--foreach-adam] [--profile]
                                   [--out result.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.common import median_seconds, report
from refusal_sae import cpu_kernels
from refusal_sae.sae import SAEConfig, SparseAutoencoder


def synthetic_batches(
    d_in: int, atoms: int, active: int, batch: int, seed: int, device: torch.device
) -> Callable[[int], torch.Tensor]:
    """batch(i): `batch` tokens, each a sum of `active` random dictionary rows with random positive weights
    plus a shared offset and a little noise; the same i always gives the same tokens."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(atoms, d_in, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    offset = torch.randn(d_in, generator=g)

    def make(i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        index = torch.randint(atoms, (batch, active), generator=g)
        weight = torch.rand(batch, active, 1, generator=g) * 4
        x = (weight * dictionary[index]).sum(1) + offset + 0.05 * torch.randn(batch, d_in, generator=g)
        return x.to(device)

    return make


def cached_batches(
    cache_dir: str, layer: str, batch: int, device: torch.device
) -> tuple[Callable[[int], torch.Tensor], torch.Tensor]:
    """Training batches cycling through the cache's shuffled tokens (epoch after epoch), and every cached
    token of the layer for evaluation."""
    from refusal_sae.activations import ActivationCache, TokenStream

    cache = ActivationCache(cache_dir, verify=False)
    everything = torch.cat([cache.to_torch(cache.activations(i, layer)) for i in range(len(cache.shards))]).float()
    stream = TokenStream(cache_dir, layers=[layer], batch_size=batch)
    epochs: list[list[torch.Tensor]] = []

    def make(i: int) -> torch.Tensor:
        while sum(map(len, epochs)) <= i:
            stream.set_epoch(len(epochs))
            epochs.append([b[layer].float() for b in stream.iterate(0, 1)])
            if not epochs[-1]:
                raise SystemExit(f"the cache holds fewer than --batch={batch} tokens of {layer}")
        flat = [b for e in epochs for b in e]
        return flat[i].to(device)

    return make, everything.to(device)


class Side:
    """One SAE implementation's training step, with the bookkeeping the trainers around them do."""

    def __init__(self, name: str, sae: torch.nn.Module, lr: float, dead_tokens: int, auxk_alpha: float,
                 autocast: Callable[[], contextlib.AbstractContextManager], fused_adam: bool = False) -> None:
        self.name, self.sae, self.autocast = name, sae, autocast
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=lr, **({"fused": True} if fused_adam else {}))
        self.dead_tokens, self.auxk_alpha = dead_tokens, auxk_alpha
        self.times: list[float] = []

    def step(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dead_fraction(self) -> float:
        raise NotImplementedError

    def timed_step(self, x: torch.Tensor) -> None:
        self.times.append(timed(self.step, x))


def timed(fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> float:
    """Wall time of fn(x) in seconds, the GPU's queue included."""
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


class Ours(Side):
    def step(self, x: torch.Tensor) -> None:
        sae: SparseAutoencoder = self.sae
        with self.autocast():
            out = sae(x)  # training mode: AuxK on dead latents
        out.loss.backward()
        sae.record_firing(out.fired, x.shape[0])
        sae.project_decoder_grad()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sae.renormalize_decoder()

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.sae.decode(self.sae.encode(x)).float()

    def dead_fraction(self) -> float:
        return self.sae.dead_latents().float().mean().item()


@contextlib.contextmanager
def kernels_off():
    """Run the block with refusal_sae's C kernels switched off, as REFUSAL_SAE_CPU_KERNELS=0 does."""
    before = os.environ.get(cpu_kernels.ENV_SWITCH)
    os.environ[cpu_kernels.ENV_SWITCH] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[cpu_kernels.ENV_SWITCH]
        else:
            os.environ[cpu_kernels.ENV_SWITCH] = before


class OursTorchOps(Ours):
    """The same SAE and step with the C kernels off: PyTorch's topk and CSR products instead."""

    def step(self, x: torch.Tensor) -> None:
        with kernels_off():
            super().step(x)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        with kernels_off():
            return super().reconstruct(x)


class Sparsify(Side):
    """sparsify.SparseCoder stepped as sparsify.Trainer does (fvu loss + auxk_alpha * AuxK on its dead mask)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tokens_since_fired = torch.zeros(self.sae.num_latents, dtype=torch.long, device=self.sae.device)

    def step(self, x: torch.Tensor) -> None:
        sae = self.sae
        with self.autocast():
            out = sae(x, dead_mask=self.tokens_since_fired >= self.dead_tokens)
        (out.fvu + self.auxk_alpha * out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()
        with torch.no_grad():
            fired = torch.zeros_like(self.tokens_since_fired, dtype=torch.bool)
            fired[out.latent_indices.flatten()] = True
            self.tokens_since_fired += x.shape[0]
            self.tokens_since_fired[fired] = 0

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.sae(x).sae_out.float()

    def dead_fraction(self) -> float:
        return (self.tokens_since_fired >= self.dead_tokens).float().mean().item()


def profile_steps(side: Side, xs: list[torch.Tensor]) -> None:
    """Print the operators that take the most time over training steps of a copy of `side` (which is left as it
    was, so the FVU comparison stays one of equal training)."""
    from torch.profiler import ProfilerActivity, profile

    side = copy.deepcopy(side)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if xs[0].is_cuda else [])
    with profile(activities=activities) as prof:
        for x in xs:
            side.step(x)
    key = "self_cuda_time_total" if xs[0].is_cuda else "self_cpu_time_total"
    print(f"\n{side.name}: {len(xs)} training steps, operators by self time")
    print(prof.key_averages().table(sort_by=key, row_limit=25))


def fvu(side: Side, x: torch.Tensor, chunk: int = 4096) -> float:
    """Fraction of variance unexplained on `x`, pooled over all its tokens."""
    sse = sum((c - side.reconstruct(c)).pow(2).sum().item() for c in x.split(chunk))
    return sse / (x - x.mean(0)).pow(2).sum().item()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=896, help="input width (896: the embedded Qwen model)")
    parser.add_argument("--expansion", type=int, default=4, help="latents per input dimension")
    parser.add_argument("--width", type=int, default=None, help="number of latents (overrides --expansion)")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024, help="tokens per training step")
    parser.add_argument("--steps", type=int, default=40, help="training steps per side (the same tokens)")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--dead-tokens", type=int, default=None, help="dead-latent threshold; default 5 steps' tokens")
    parser.add_argument("--cache", default=None, help="an activation cache directory: train on its tokens")
    parser.add_argument("--layer", default=None, help="the cache layer (default: its first)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--foreach-adam", action="store_true", help="torch's default Adam, not fused, for both sides")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of refusal_sae's step")
    parser.add_argument("--quick", action="store_true", help="small shapes and few steps: a smoke run in seconds")
    parser.add_argument("--out", default=None, help="write the JSON result here")
    args = parser.parse_args(argv)
    if args.quick:
        args.d_in, args.expansion, args.batch, args.steps, args.k = 128, 8, 256, 12, 16
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    bf16 = device.type == "cuda"

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    from sparsify import SparseCoder, SparseCoderConfig  # imported late: it prints which decoder it uses

    if args.cache:
        from refusal_sae.activations import ActivationCache

        layer = args.layer or ActivationCache(args.cache, verify=False).layers[0]
        batches, held_out = cached_batches(args.cache, layer, args.batch, device)
        args.d_in = held_out.shape[1]
        data = f"cache {args.cache} layer {layer} ({len(held_out)} tokens; evaluated on all of them)"
    else:
        width = args.width or args.d_in * args.expansion
        batches = synthetic_batches(args.d_in, atoms=width, active=args.k // 2, batch=args.batch, seed=args.seed,
                                    device=device)
        held_out = torch.cat([batches(10_000_000 + i) for i in range(4)])
        data = (f"synthetic: sums of {args.k // 2} of {width} random directions; "
                f"evaluated on {len(held_out)} fresh tokens")
    dead_tokens = args.dead_tokens or 5 * args.batch

    torch.manual_seed(args.seed)
    cfg = SAEConfig(d_in=args.d_in, expansion_factor=args.expansion, num_latents=args.width, k=args.k,
                    dead_tokens_threshold=dead_tokens)
    ours = SparseAutoencoder(cfg).to(device)
    ours.init_from_data(batches(0))
    theirs = SparseCoder(args.d_in, SparseCoderConfig(num_latents=cfg.width, k=args.k), device=device)
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if k != "tokens_since_fired"})
    fused = not args.foreach_adam
    sides = [Ours("refusal_sae", ours.train(), args.lr, dead_tokens, cfg.auxk_alpha, autocast, fused),
             Sparsify("sparsify", theirs.train(), args.lr, dead_tokens, cfg.auxk_alpha, autocast, fused)]
    if device.type == "cpu" and cpu_kernels.usable(batches(0)):
        sides.append(OursTorchOps("refusal_sae, PyTorch ops", copy.deepcopy(ours), args.lr, dead_tokens,
                                  cfg.auxk_alpha, autocast, fused))

    w = ours.encoder.weight.detach().to(torch.bfloat16 if bf16 else torch.float32).clone()
    x_floor = batches(0).to(w.dtype)
    floor_out = torch.empty(len(x_floor), len(w), dtype=w.dtype, device=device)
    floor_times = []

    fvu_before = fvu(sides[0], held_out)
    # Interleaved, step by step, so that every side (and the floor) sees the same machine load.
    for i in range(args.steps):
        x = batches(i)
        for side in sides:
            side.timed_step(x)
        floor_times.append(timed(lambda x: torch.mm(x, w.T, out=floor_out), x_floor))
    floor = statistics.median(floor_times[args.warmup:])
    floor_new_output = median_seconds(lambda: x_floor @ w.T, repeats=max(5, args.steps // 4), warmup=1)

    if args.profile:
        profile_steps(sides[0], [batches(i) for i in range(args.steps, args.steps + 3)])

    rows = []
    for side in sides:
        step = statistics.median(side.times[args.warmup:])
        rows.append({"side": side.name, "step_ms": 1e3 * step, "tokens_per_s": args.batch / step,
                     "x_floor": step / floor, "fvu": fvu(side, held_out), "dead": side.dead_fraction()})
    rows.append({"side": "dense encoder matmul (floor)", "step_ms": 1e3 * floor, "tokens_per_s": args.batch / floor,
                 "x_floor": 1.0, "fvu": float("nan"), "dead": float("nan")})
    extra = {
        "shape": {"d_in": args.d_in, "width": cfg.width, "k": args.k, "batch": args.batch},
        "steps": args.steps, "warmup": args.warmup, "tokens_trained": args.steps * args.batch, "lr": args.lr,
        "dead_tokens_threshold": dead_tokens, "device": str(device), "precision": "bf16 autocast" if bf16 else "fp32",
        "optimizer": "Adam" if args.foreach_adam else "Adam(fused=True)",
        "data": data, "fvu_at_init": fvu_before, "floor_new_output_ms": 1e3 * floor_new_output,
        "speedup_sparsify_over_ours": rows[0]["step_ms"] / rows[1]["step_ms"],
    }
    return report("SAE training step: refusal_sae vs sparsify", rows, extra, args.out)


if __name__ == "__main__":
    main()
