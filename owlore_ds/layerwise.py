"""A ZeRO-style optimizer for layer-sampled training (lisa, owlore) and GaLore.

Written by hand because DeepSpeed's ZeRO-1/2 optimizers fix their flat parameter
groups and gradient hooks at `deepspeed.initialize`: a layer frozen later still gets
Adam updates from stale moments, one unfrozen later is never updated, and the state
of every layer is kept, so layer sampling saves nothing. They also flatten matrices
into 1-D partitions, which GaLore's SVD cannot use. Here:

- The trainable tensors are cut into *items*. A tensor of an active decoder layer is
  one item, owned whole by one rank (so GaLore sees a full 2-D gradient). A tensor that
  is always trained (embeddings, final norm, lm_head) is cut into one contiguous flat
  chunk per rank, so its Adam state is partitioned 1/N as in ZeRO.
- At a step, each item's gradient is reduced to its owner (ZeRO-2 semantics); owners
  clip by the global norm (one all-reduce of squared norms), update their items, and
  broadcast the new weights.
- Only owners hold state (fp32 master when the weights are not fp32, Adam moments,
  GaLore projector), and only for items of active layers: when a layer leaves the
  active set its state is freed, or kept on the CPU with `inactive_state="offload"`.

DeepSpeed still drives it: the engine runs forward/backward, gradient accumulation,
the step boundary, the LR schedule and checkpoint files; its own gradient all-reduce
is switched off since the reduction happens here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.distributed as torch_dist

from owlore_ds import galore
from owlore_ds.config import MASTER_POLICIES

INACTIVE_POLICIES = ("free", "offload")


_NORM_ROW = 1 << 16


def _squared_norm(grad: torch.Tensor) -> torch.Tensor:
    """The float64 sum of squares of `grad`, from norms of 64K-element rows (each accumulated
    in fp32 by torch, in the gradient's dtype): within ~1e-5 of an exact sum, where one
    norm over a 131M-element bf16 or fp32 tensor is off by 1%, and with no fp32/fp64 copy."""
    flat = grad.reshape(-1)
    whole = flat.numel() - flat.numel() % _NORM_ROW
    rows = torch.linalg.vector_norm(flat[:whole].view(-1, _NORM_ROW), dim=1).double()
    rest = torch.linalg.vector_norm(flat[whole:]).double()
    return rows.pow(2).sum() + rest.pow(2)


@dataclass(frozen=True)
class GaloreSettings:
    rank: int
    update_proj_gap: int
    scale: float
    proj_type: str
    svd: str = "exact"
    canonical_signs: bool = True
    spread_refreshes: bool = False


@dataclass
class _Item:
    key: str  # parameter name, plus "@lo" for a chunk of an always-trained tensor
    name: str
    param: torch.nn.Parameter
    lo: int
    hi: int
    owner: int
    low_rank: bool  # GaLore rule (whole 2-D layer matrices when GaLore is on)
    position: int = 0  # index of the tensor within its layer

    @property
    def numel(self) -> int:
        return self.hi - self.lo


def _world() -> tuple[int, int]:
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank(), torch_dist.get_world_size()
    return 0, 1


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(-1)


def _to_device(state: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in state.items()}


class LayerwiseOptimizer(torch.optim.Optimizer):
    def __init__(self, layers: list[list[tuple[str, torch.nn.Parameter]]], always: list[tuple[str, torch.nn.Parameter]],
                 *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float, max_grad_norm: float,
                 inactive_state: str = "free", galore_settings: Optional[GaloreSettings] = None,
                 master_weights: str = "fp32"):
        if inactive_state not in INACTIVE_POLICIES:
            raise ValueError(f"inactive_state must be one of {INACTIVE_POLICIES}, got {inactive_state!r}")
        params = [p for layer in layers for _, p in layer] + [p for _, p in always]
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.layers = layers
        self.max_grad_norm = max_grad_norm
        self.inactive_state = inactive_state
        self.galore_settings = galore_settings
        if master_weights not in MASTER_POLICIES:
            raise ValueError(f"master_weights must be one of {MASTER_POLICIES}, got {master_weights!r}")
        self.master_weights = master_weights
        self.rank, self.world = _world()
        self.active: list[int] = []
        self.owners: dict[str, int] = {}  # layer tensor name -> owning rank (sticky while it stays active)
        self.parked: dict[str, int] = {}  # inactive tensor name -> rank holding its offloaded state
        self.item_state: dict[str, dict[str, Any]] = {}  # this rank's state of its owned items
        self.offloaded: dict[str, dict[str, Any]] = {}  # state of items of inactive layers, on CPU
        self.global_grad_norm: Optional[float] = None
        self._always_items = [item for name, p in always for item in self._chunks(name, p)]
        for layer in layers:
            for _, p in layer:
                p.requires_grad_(False)

    # ------------------------------------------------------------------ items and owners

    def _chunks(self, name: str, param: torch.nn.Parameter) -> list[_Item]:
        size = math.ceil(param.numel() / self.world)
        return [_Item(f"{name}@{r * size}", name, param, r * size, min((r + 1) * size, param.numel()), r, False)
                for r in range(self.world) if r * size < param.numel()]

    def _layer_items(self) -> list[_Item]:
        items = []
        for index in self.active:
            for position, (name, p) in enumerate(self.layers[index]):
                low_rank = self.galore_settings is not None and p.dim() == 2
                items.append(_Item(name, name, p, 0, p.numel(), self.owners[name], low_rank, position))
        return items

    def items(self) -> list[_Item]:
        """Every item trained at this step, in the same order on every rank."""
        return self._always_items + self._layer_items()

    def _assign_owners(self, names: Iterable[str], sizes: dict[str, int]) -> None:
        """Greedy, largest first, to the least-loaded rank; identical on every rank."""
        load = [0] * self.world
        for name, owner in self.owners.items():
            load[owner] += sizes[name]
        for name in sorted(names, key=lambda n: (-sizes[n], n)):
            owner = min(range(self.world), key=lambda r: (load[r], r))
            self.owners[name] = owner
            load[owner] += sizes[name]

    def set_active_layers(self, active: list[int]) -> None:
        """Switches the trained layers at an optimizer-step boundary (collective-free, same on every rank)."""
        for index in sorted(set(self.active) - set(active)):
            for name, p in self.layers[index]:
                p.requires_grad_(False)
                p.grad = None
                owner = self.owners.pop(name)
                state = self.item_state.pop(name, None)
                if self.inactive_state == "offload":
                    self.parked[name] = owner
                    if state is not None:
                        self.offloaded[name] = _to_device(state, torch.device("cpu"))
        sizes = {name: p.numel() for index in active for name, p in self.layers[index]}
        arriving = [name for index in sorted(set(active) - set(self.active)) for name, _ in self.layers[index]]
        for name in arriving:  # an offloaded item returns to the rank that holds its state
            if name in self.parked:
                self.owners[name] = self.parked.pop(name)
        self._assign_owners([n for n in arriving if n not in self.owners], sizes)
        for index in active:
            for name, p in self.layers[index]:
                p.requires_grad_(True)
                if name in self.offloaded and self.owners[name] == self.rank:
                    self.item_state[name] = _to_device(self.offloaded.pop(name), p.device)
        self.active = sorted(active)

    # ------------------------------------------------------------------ the step

    def _reduce_gradients(self, items: list[_Item]) -> dict[str, torch.Tensor]:
        """Sums each item's gradient over ranks onto its owner; returns the owner's mean (fp32
        on several ranks; on one rank the .grad itself, made fp32 one item at a time in step)."""
        owned = {}
        for item in items:
            p = item.param
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grad = _flat(p.grad)[item.lo : item.hi]
            if self.world > 1:
                # Reduced in fp32: a bf16 sum over many ranks would drop the small gradients.
                grad = grad.float()
                torch_dist.reduce(grad, dst=item.owner)
                grad.div_(self.world)  # the engine's convention: mean over ranks
            if item.owner == self.rank:
                owned[item.key] = grad
        return owned

    def _clip_coefficient(self, grads: dict[str, torch.Tensor]) -> float:
        device = next(iter(self.param_groups[0]["params"])).device
        squares = torch.zeros((), dtype=torch.float64, device=device)
        for grad in grads.values():
            squares += _squared_norm(grad)
        if self.world > 1:
            torch_dist.all_reduce(squares)
        self.global_grad_norm = float(squares.sqrt())
        if self.max_grad_norm > 0 and self.global_grad_norm > self.max_grad_norm:
            return self.max_grad_norm / (self.global_grad_norm + 1e-6)
        return 1.0

    def _new_state(self, item: _Item) -> dict[str, Any]:
        state: dict[str, Any] = {"step": 0}
        if item.param.dtype != torch.float32 and self.master_weights == "fp32":
            state["master"] = _flat(item.param.detach())[item.lo : item.hi].float().clone()
        return state

    def _adamw(self, weight: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """torch.optim.AdamW's update (decay first, bias-corrected moments), on one fp32 tensor."""
        beta1, beta2 = group["betas"]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(weight)
            state["exp_avg_sq"] = torch.zeros_like(weight)
        state["step"] += 1
        step = state["step"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if group["weight_decay"]:
            weight.mul_(1 - group["lr"] * group["weight_decay"])
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = exp_avg_sq.sqrt().div_(math.sqrt(1 - beta2**step)).add_(group["eps"])
        weight.addcdiv_(exp_avg, denom, value=-group["lr"] / (1 - beta1**step))

    def _update(self, item: _Item, grad: torch.Tensor, coefficient: float, group: dict[str, Any]) -> None:
        """Steps one owned item with its (rank-mean) gradient times the clip coefficient."""
        state = self.item_state.get(item.key)
        if state is None:
            state = self.item_state[item.key] = self._new_state(item)
        weights = _flat(item.param.data)[item.lo : item.hi]
        if self.master_weights == "pure_bf16":  # moments follow the weights' dtype (_adamw, galore)
            weight, grad = weights, grad.to(weights.dtype)
        else:  # on one rank, the only fp32 copy of a bf16 gradient alive
            weight, grad = state.get("master"), grad.float()
            if weight is None:  # without a master copy, bf16 weights are updated in fp32 and rounded back
                weight = weights if weights.dtype == torch.float32 else weights.float()
        if coefficient != 1.0:
            grad = grad.mul_(coefficient)
        if item.low_rank:
            settings = self.galore_settings
            beta1, beta2 = group["betas"]
            galore.galore_adamw_step(
                weight.view(item.param.shape), grad.view(item.param.shape), state, lr=group["lr"],
                betas=(beta1, beta2), eps=group["eps"], weight_decay=group["weight_decay"], rank=settings.rank,
                update_proj_gap=settings.update_proj_gap, scale=settings.scale, proj_type=settings.proj_type,
                svd=settings.svd, canonical_signs=settings.canonical_signs, refresh_offset=self._refresh_offset(item))
        else:
            self._adamw(weight, grad, state, group)
        if weight.data_ptr() != weights.data_ptr():
            weights.copy_(weight)

    def _refresh_offset(self, item: _Item) -> int:
        """With spread refreshes, the tensors of a layer refresh at evenly staggered steps."""
        settings = self.galore_settings
        if not settings.spread_refreshes:
            return 0
        count = len(self.layers[0])
        return (item.position * settings.update_proj_gap) // count

    @torch.no_grad()
    def step(self, closure=None) -> None:
        group = self.param_groups[0]
        items = self.items()
        grads = self._reduce_gradients(items)
        coefficient = self._clip_coefficient(grads)
        if not math.isfinite(self.global_grad_norm):  # the same value on every rank: all stop together
            raise RuntimeError(f"the gradient norm is {self.global_grad_norm}; stopping before the weights take it")
        for item in items:
            if item.owner == self.rank:
                self._update(item, grads.pop(item.key), coefficient, group)
            if self.world > 1:
                torch_dist.broadcast(_flat(item.param.data)[item.lo : item.hi], src=item.owner)

    # ------------------------------------------------------------------ memory and checkpoints

    def state_bytes(self) -> tuple[int, int]:
        """(bytes on the training device, bytes kept on the CPU) of the state this rank holds."""
        def size(states: Iterable[dict[str, Any]]) -> int:
            return sum(v.numel() * v.element_size() for s in states for v in s.values() if torch.is_tensor(v))

        return size(self.item_state.values()), size(self.offloaded.values())

    def global_state(self) -> dict[str, Any]:
        """What every rank agrees on; stored in the checkpoint's trainer state."""
        return {"active_layers": self.active, "owners": dict(sorted(self.owners.items())),
                "parked": dict(sorted(self.parked.items())), "world_size": self.world}

    def rank_state(self) -> dict[str, Any]:
        """This rank's tensors (plain tensors and ints, loadable with weights_only=True)."""
        return {"items": self.item_state, "offloaded": self.offloaded}

    def load(self, global_state: dict[str, Any], rank_states: list[dict[str, Any]]) -> None:
        """Restores from the per-rank states of a checkpoint made on any number of ranks.

        On the same number of ranks every rank keeps its items. Otherwise owners are
        planned anew and each item's state is found by name; the flat chunks of
        always-trained tensors are joined and cut again for the new ranks.
        """
        same_world = global_state["world_size"] == self.world
        self.active, self.item_state, self.offloaded = [], {}, {}
        self.owners = dict(global_state["owners"]) if same_world else {}
        self.parked = {}
        self.set_active_layers(global_state["active_layers"])
        if same_world:
            mine = rank_states[self.rank]
            device = self.param_groups[0]["params"][0].device
            self.item_state = {k: _to_device(v, device) for k, v in mine["items"].items()}
            self.offloaded = dict(mine["offloaded"])
            self.parked = dict(global_state["parked"])
            return
        whole = {k: v for s in rank_states for k, v in s["items"].items() if "@" not in k}
        for item in self._layer_items():
            if item.owner == self.rank and item.key in whole:
                self.item_state[item.key] = _to_device(whole[item.key], item.param.device)
        for item in self._always_items:
            joined = self._join_chunks(item.name, rank_states)
            if item.owner == self.rank and joined:
                self.item_state[item.key] = {
                    k: (v[item.lo : item.hi].clone().to(item.param.device) if torch.is_tensor(v) else v)
                    for k, v in joined.items()}
        # Offloaded state goes to new ranks by the same greedy plan, after the active items.
        offloaded = {k: v for s in rank_states for k, v in s["offloaded"].items()}
        sizes = {name: p.numel() for layer in self.layers for name, p in layer}
        active_owners = dict(self.owners)
        self._assign_owners(sorted(offloaded), sizes)
        self.parked = {name: self.owners[name] for name in offloaded}
        self.offloaded = {name: state for name, state in offloaded.items() if self.parked[name] == self.rank}
        self.owners = active_owners

    @staticmethod
    def _join_chunks(name: str, rank_states: list[dict[str, Any]]) -> dict[str, Any]:
        chunks = sorted(((int(k.split("@")[1]), v) for s in rank_states for k, v in s["items"].items()
                         if k.split("@")[0] == name and "@" in k), key=lambda c: c[0])
        if not chunks:
            return {}
        joined = dict(chunks[0][1])
        for key, value in chunks[0][1].items():
            if torch.is_tensor(value) and value.dim() == 1:
                joined[key] = torch.cat([c[1][key] for c in chunks])
        return joined
