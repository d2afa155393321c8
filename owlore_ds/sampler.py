"""Layer sampling (DESIGN.md 1.2 and 3, "Sampler").

Every `interval_steps` optimizer steps, `num_active` decoder layers are drawn
without replacement with probabilities p. The draw for interval k is a pure
function of (seed, k): it does not depend on world size, on how often it was
called, or on any global RNG, so a resumed run (on any number of ranks) picks
the same layers. In distributed runs rank 0's draw is broadcast and every rank
verifies it matches its own, which catches ranks that disagree on the seed,
the ratios or the step count instead of silently training different layers.
"""

import hashlib

import torch
import torch.distributed as dist

MODES = ("uniform", "owl", "owl_reverse", "increase", "decrease")


def _owl_probabilities(num_layers: int, outlier_ratios: list[float] | None) -> torch.Tensor:
    if outlier_ratios is None:
        raise ValueError("owl sampling modes need outlier_ratios (one per layer)")
    d = torch.as_tensor(outlier_ratios, dtype=torch.float64)
    if d.shape != (num_layers,):
        raise ValueError(f"got {d.numel()} outlier ratios for {num_layers} layers")
    if not torch.isfinite(d).all() or (d < 0).any():
        raise ValueError("outlier ratios must be finite and >= 0")
    if d.sum() <= 0:
        raise ValueError("outlier ratios are all zero; owl sampling is undefined")
    return d / d.sum()


def layer_probabilities(mode: str, num_layers: int, outlier_ratios: list[float] | None = None) -> torch.Tensor:
    """p_l for layers 0..L-1 (float64, sums to 1). outlier_ratios are only used by owl modes."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if mode == "uniform":
        w = torch.ones(num_layers, dtype=torch.float64)
    elif mode == "owl":
        w = _owl_probabilities(num_layers, outlier_ratios)
    elif mode == "owl_reverse":
        p = _owl_probabilities(num_layers, outlier_ratios)
        w = p.max() - p
        if w.sum() <= 0:  # all layers equally outlier-heavy: nothing to reverse
            w = torch.ones(num_layers, dtype=torch.float64)
    elif mode == "increase":
        w = torch.arange(1, num_layers + 1, dtype=torch.float64)
    elif mode == "decrease":
        w = torch.arange(num_layers, 0, -1, dtype=torch.float64)
    else:
        raise ValueError(f"unknown layer sampling mode {mode!r}; expected one of {', '.join(MODES)}")
    return w / w.sum()


def _interval_seed(seed: int, k: int) -> int:
    return (seed * 1_000_003 + k) % (1 << 63)


def _collective_device() -> torch.device:
    backend = str(dist.get_backend()).lower()
    if "gloo" in backend or backend == "mpi":
        return torch.device("cpu")
    # nccl (and hccl, xccl, ...) only move accelerator tensors.
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


class LayerSampler:
    def __init__(
        self,
        num_layers: int,
        num_active: int,
        interval_steps: int,
        probabilities: torch.Tensor | list[float],
        seed: int,
    ):
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if num_active < 1:
            raise ValueError(f"num_active must be >= 1, got {num_active}")
        if interval_steps < 1:
            raise ValueError(f"interval_steps must be >= 1, got {interval_steps}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < (1 << 63):
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
        p = torch.as_tensor(probabilities, dtype=torch.float64).detach().cpu()
        if p.shape != (num_layers,):
            raise ValueError(f"probabilities must have shape ({num_layers},), got {tuple(p.shape)}")
        if not torch.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
            raise ValueError("probabilities must be finite, >= 0 and not all zero")
        nonzero = int((p > 0).sum())
        if num_active < num_layers and nonzero < num_active:
            raise ValueError(
                f"cannot draw {num_active} distinct layers: only {nonzero} of {num_layers} layers have probability > 0"
            )
        self.num_layers = num_layers
        self.num_active = num_active
        self.interval_steps = interval_steps
        self.probabilities = p / p.sum()
        self.seed = seed
        # Lets ranks compare probabilities with one int64 instead of L floats.
        digest = hashlib.sha256(self.probabilities.numpy().tobytes()).digest()
        self._prob_hash = int.from_bytes(digest[:7], "little")

    def interval_index(self, step: int) -> int:
        """Interval of an optimizer step (counted from 0)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return step // self.interval_steps

    def layers_for_interval(self, k: int) -> list[int]:
        """Sorted active layers of interval k; a pure function of (seed, k)."""
        if k < 0:
            raise ValueError(f"interval index must be >= 0, got {k}")
        if self.num_active >= self.num_layers:
            return list(range(self.num_layers))
        g = torch.Generator(device="cpu")
        g.manual_seed(_interval_seed(self.seed, k))
        picked = torch.multinomial(self.probabilities, self.num_active, replacement=False, generator=g)
        return sorted(picked.tolist())

    def synchronized_layers(self, k: int) -> list[int]:
        """Rank 0's draw for interval k, verified on every rank (collective: all ranks must call it).

        Raises RuntimeError on every rank if any rank's own draw or settings
        differ from rank 0's. Every rank runs the same collectives whatever the
        outcome, so a disagreeing rank cannot leave the others hanging.
        """
        local = self.layers_for_interval(k)
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
            return local
        device = _collective_device()
        rank, world = dist.get_rank(), dist.get_world_size()

        settings = [k, self.num_layers, self.num_active, self.seed, self._prob_hash, len(local)]
        ref_settings = torch.tensor(settings, dtype=torch.int64, device=device)
        dist.broadcast(ref_settings, src=0)
        ref_settings = ref_settings.tolist()

        # Sized from rank 0's settings so the broadcast matches even if this rank disagrees.
        ref_layers = torch.tensor(local if rank == 0 else [0] * ref_settings[-1], dtype=torch.int64, device=device)
        dist.broadcast(ref_layers, src=0)
        ref_layers = ref_layers.tolist()

        disagree = torch.zeros(world, dtype=torch.int64, device=device)
        disagree[rank] = int(settings != ref_settings or local != ref_layers)
        dist.all_reduce(disagree)
        bad = [r for r, flag in enumerate(disagree.tolist()) if flag]
        if bad:
            names = "(interval, num_layers, num_active, seed, probabilities hash)"
            mine = f"; this rank {rank} has {settings[:5]} and drew {local}" if rank != 0 else ""
            raise RuntimeError(
                f"LayerSampler: ranks {bad} disagree with rank 0 on the active layers of interval {k}: "
                f"rank 0 has {names} = {ref_settings[:5]} and drew {ref_layers}{mine}. "
                "All ranks must use the same seed, probabilities, num_active and optimizer step."
            )
        return ref_layers
