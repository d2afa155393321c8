"""A ZeRO-style optimizer for layer-sampled training (lisa, owlore) and GaLore, at every ZeRO stage.

Written by hand because DeepSpeed's ZeRO optimizers fix their flat parameter groups and
gradient hooks at `deepspeed.initialize`: a layer frozen later still gets Adam updates
from stale moments, one unfrozen later is never updated (under stage 3 it gets zero
gradients, DeepSpeed issue 5639), and the state of every layer is kept, so layer
sampling saves nothing. They also flatten matrices into 1-D partitions, which GaLore's
SVD cannot use. DeepSpeed here only partitions and fetches the weights (stage 3) or
does nothing (stage 0); this optimizer owns the rest:

- plan.py: the items of a step (a whole tensor of an active layer; a 1/N chunk of an
  always-trained tensor, ZeRO-3's own partition) and their owners;
- comm.py: each item's gradient reduced to its owner inside backward, bucketed, and
  the updated weights written back into every rank's copy or ZeRO-3 partition;
- rules.py and galore.py: AdamW and GaLore on the owner's fp32 (or bf16) tensors;
- reshard.py: checkpoints of this rank's state, loadable on another number of ranks.

Only owners hold state (fp32 master when the weights are not fp32, Adam moments, GaLore
projector), and only for items of active layers: when a layer leaves the active set its
state is freed, kept on the CPU with `inactive_state="offload"`, or reduced to its GaLore
projectors on the CPU with `inactive_state="projectors"` (r/min(m,n) of a matrix), so a
returning layer's projectors are refreshed on their own schedule, not by a new SVD.

With `update_in_backward` (no clipping) an item is updated, and its gradient freed, as soon
as its reduction is complete in the last micro-batch's backward, as GaLore 2 and LOMO do:
the owned share of the gradients then never exists at once. The updates are the same as
at `step()` (the same rules, gradients and order per item), so the weights are too. Backward
makes no host sync for it (under ZeRO-3 one, for the matrices' gather flags); the gradient
norm, and a non-finite gradient, are checked at `step()` (see _update_completed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.distributed as torch_dist

from owlore_ds import galore
from owlore_ds.config import MASTER_POLICIES
from owlore_ds.layerwise import comm, reshard
from owlore_ds.layerwise.plan import Item, always_items, assign_owners, full_numel
from owlore_ds.layerwise.rules import adamw_step, norm_workspace_numel, squared_norm

INACTIVE_POLICIES = ("free", "offload", "projectors")
# What inactive_state="projectors" keeps of a matrix's GaLore state (galore.galore_adamw_step).
PROJECTOR_STATE = ("projector", "proj_step", "lifetime_step")
DEFAULT_BUCKET_BYTES = 1 << 26  # 64 MiB of gradients per reduction, as DeepSpeed's reduce_bucket_size order


@dataclass(frozen=True)
class GaloreSettings:
    rank: int
    update_proj_gap: int
    scale: float
    proj_type: str
    svd: str = "exact"
    canonical_signs: bool = True
    spread_refreshes: bool = False


def _world() -> tuple[int, int]:
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank(), torch_dist.get_world_size()
    return 0, 1


def to_device(state: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in state.items()}


Named = list[tuple[str, torch.nn.Parameter]]


class LayerwiseOptimizer(torch.optim.Optimizer):
    def __init__(self, layers: list[Named], always: Named, *, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, max_grad_norm: float, inactive_state: str = "free",
                 galore_settings: Optional[GaloreSettings] = None, master_weights: str = "fp32",
                 zero3: bool = False, device: Optional[torch.device] = None, reduce_dtype: str = "fp32",
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, update_in_backward: bool = False):
        if inactive_state not in INACTIVE_POLICIES:
            raise ValueError(f"inactive_state must be one of {INACTIVE_POLICIES}, got {inactive_state!r}")
        if master_weights not in MASTER_POLICIES:
            raise ValueError(f"master_weights must be one of {MASTER_POLICIES}, got {master_weights!r}")
        if update_in_backward and max_grad_norm > 0:
            raise ValueError("update_in_backward needs max_grad_norm 0: clipping needs every gradient first")
        params = [p for layer in layers for _, p in layer] + [p for _, p in always]
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.layers = layers
        self.max_grad_norm = max_grad_norm
        self.inactive_state = inactive_state
        self.galore_settings = galore_settings
        self.master_weights = master_weights
        self.zero3 = zero3
        self.device = device or params[0].device
        self.rank, self.world = _world()
        self.reducer = comm.GradientReducer(self.rank, self.world, comm.REDUCE_DTYPES[reduce_dtype], bucket_bytes)
        self.update_in_backward = update_in_backward
        self.final_micro_batch = True  # set by the caller before each backward
        self._updated: set[str] = set()  # items already updated in this step's backward
        self._backward_gather: Optional[dict[str, bool]] = None  # ZeRO-3 gather flags of this backward
        self.projector_refreshes = 0  # SVDs this rank ran since the counter was last read
        self._backward_squares = torch.zeros(1, dtype=torch.float64, device=self.device)
        self._norm_workspace: Optional[torch.Tensor] = None  # fp32 slab for bf16 gradients' norms
        if update_in_backward:
            self.reducer.on_complete = self._update_completed
        self.active: list[int] = []
        self.owners: dict[str, int] = {}  # layer tensor name -> owning rank (sticky while it stays active)
        self.parked: dict[str, int] = {}  # inactive tensor name -> rank holding its offloaded state
        self.item_state: dict[str, dict[str, Any]] = {}  # this rank's state of its owned items
        self.offloaded: dict[str, dict[str, Any]] = {}  # state of items of inactive layers, on CPU
        self.global_grad_norm: Optional[float] = None
        self.sizes = {name: full_numel(p) for layer in layers for name, p in layer}
        self._always_items = [item for name, p in always for item in always_items(name, p, self.world)]
        self._index_items()
        self._names = {p: name for layer in layers for name, p in layer} | {p: name for name, p in always}
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_gradient)
        for layer in layers:
            for _, p in layer:
                p.requires_grad_(False)

    # ------------------------------------------------------------------ items and owners

    def _layer_items(self) -> list[Item]:
        items = []
        for index in self.active:
            for position, (name, p) in enumerate(self.layers[index]):
                low_rank = self.galore_settings is not None and len(getattr(p, "ds_shape", p.shape)) == 2
                items.append(Item(name, name, p, 0, self.sizes[name], self.owners[name], low_rank, position))
        return items

    def items(self) -> list[Item]:
        """Every item trained at this step, in the same order on every rank."""
        return self._always_items + self._layer_items()

    def set_active_layers(self, active: list[int]) -> None:
        """Switches the trained layers at an optimizer-step boundary (collective-free, same on every rank)."""
        for index in sorted(set(self.active) - set(active)):
            for name, p in self.layers[index]:
                p.requires_grad_(False)
                p.grad = None
                owner = self.owners.pop(name)
                state = self.item_state.pop(name, None)
                if self.inactive_state == "projectors" and state is not None:
                    state = {k: v for k, v in state.items() if k in PROJECTOR_STATE} or None
                if self.inactive_state != "free":
                    self.parked[name] = owner
                    if state is not None:
                        self.offloaded[name] = to_device(state, torch.device("cpu"))
        arriving = [name for index in sorted(set(active) - set(self.active)) for name, _ in self.layers[index]]
        for name in arriving:  # an offloaded item returns to the rank that holds its state
            if name in self.parked:
                self.owners[name] = self.parked.pop(name)
        sizes = {name: self.sizes[name] for index in active for name, _ in self.layers[index]}
        self.owners.update(assign_owners(sizes, self.world, existing=self.owners,
                                         names=[n for n in arriving if n not in self.owners]))
        for index in active:
            for name, p in self.layers[index]:
                p.requires_grad_(True)
                if name in self.offloaded and self.owners[name] == self.rank:
                    self.item_state[name] = to_device(self.offloaded.pop(name), self.device)
        self.active = sorted(active)
        self._index_items()

    def _index_items(self) -> None:
        """The items of each parameter and each item's position in items(), rebuilt only when the
        active layers change (not per bucket in backward)."""
        self._items_of = {}
        self._order: dict[str, int] = {}
        for position, item in enumerate(self.items()):
            self._items_of.setdefault(item.param, []).append(item)
            self._order[item.key] = position

    # ------------------------------------------------------------------ backward

    @torch.no_grad()
    def _on_gradient(self, p: torch.nn.Parameter) -> None:
        """Hands each item of `p` to the reducer as soon as autograd has p's gradient, and drops it."""
        grad, p.grad = p.grad, None
        if grad is None:
            return
        flat = grad.reshape(-1)
        if flat.numel() != full_numel(p):
            raise RuntimeError(f"{self._names[p]}: the gradient is not of the whole tensor (weights not gathered)")
        for item in self._items_of.get(p, ()):
            self.reducer.add(item, flat[item.lo : item.hi])

    def finish_backward(self) -> None:
        """Call after each backward: the last bucket is reduced and every reduction completed."""
        self.reducer.finish()

    # ------------------------------------------------------------------ the step

    def _needs_current_weights(self, item: Item) -> bool:
        """Whether this rank, owning `item`, must gather the matrix under ZeRO-3 before updating:
        not when it holds a master copy, which is what it updates (the weights are its rounding)."""
        state = self.item_state.get(item.key)
        return item.owner == self.rank and (state is None or "master" not in state)

    def _reduce_squares_and_flags(self, squares: torch.Tensor, items: list[Item]) -> list[float]:
        """[global squared norm, then per item whether its owner gathers the matrix (> 0)]: one
        all-reduce of this rank's squares and flags, and one host sync."""
        flags = torch.tensor([float(self.zero3 and self._needs_current_weights(item)) for item in items],
                             dtype=torch.float64, device=self.device)
        reduced = torch.cat([squares, flags])
        if self.world > 1:
            torch_dist.all_reduce(reduced)
        return reduced.tolist()

    def _squared_norms(self, grads: Iterable[torch.Tensor]) -> torch.Tensor:
        """The float64 sum of the gradients' squares; bf16 ones are upcast through one fp32
        slab kept for the run (rules.NORM_SLAB: at most 4 MiB), grown to the largest needed."""
        grads = list(grads)
        need = max((norm_workspace_numel(g.numel()) for g in grads if g.dtype != torch.float32), default=0)
        if need > (0 if self._norm_workspace is None else self._norm_workspace.numel()):
            self._norm_workspace = torch.empty(need, dtype=torch.float32, device=self.device)
        squares = torch.zeros(1, dtype=torch.float64, device=self.device)
        for grad in grads:
            squares += squared_norm(grad, self._norm_workspace)
        return squares

    def _clip_and_plan(self, items: list[Item], grads: dict[str, torch.Tensor],
                       squares: Optional[torch.Tensor] = None) -> tuple[float, list[bool]]:
        """(clip coefficient, per item whether its owner gathers the matrix), from the step's one
        all-reduce and host sync. `squares`: of gradients already applied in backward, which
        count in the norm."""
        squares = torch.zeros(1, dtype=torch.float64, device=self.device) if squares is None else squares.clone()
        squares += self._squared_norms(grads.values())
        reduced = self._reduce_squares_and_flags(squares, items)
        self.global_grad_norm = math.sqrt(reduced[0])
        gather = [flag > 0 for flag in reduced[1:]]
        if self.max_grad_norm > 0 and self.global_grad_norm > self.max_grad_norm:
            return self.max_grad_norm / (self.global_grad_norm + 1e-6), gather
        return 1.0, gather

    def _new_state(self, item: Item, weights: torch.Tensor) -> dict[str, Any]:
        state: dict[str, Any] = {"step": 0}
        if item.param.dtype != torch.float32 and self.master_weights == "fp32":
            state["master"] = weights.float().clone()
        return state

    def _update(self, item: Item, weights: Optional[torch.Tensor], grad: torch.Tensor, coefficient: float,
                group: dict[str, Any]) -> torch.Tensor:
        """Steps one owned item with its summed gradient; returns its new flat weights (`weights`
        updated in place, or, when the matrix was not gathered, the rounded master copy)."""
        state = self.item_state.get(item.key)
        if state is None:
            state = self.item_state[item.key] = self._new_state(item, weights)
        elif "step" not in state:  # back from inactive_state="projectors": new moments and master
            state.update({**self._new_state(item, weights), **state})
        if self.master_weights == "pure_bf16":  # moments follow the weights' dtype (adamw_step, galore)
            weight, grad = weights, grad.to(weights.dtype)
        else:
            weight = state.get("master")
            if weight is None:  # without a master copy, bf16 weights are updated in fp32 and rounded back
                weight = weights if weights.dtype == torch.float32 else weights.float()
            grad = grad.float()  # a single micro-batch's bf16 gradient: one item's fp32 copy at a time
        if coefficient != 1.0:
            grad = grad.mul_(coefficient)
        if item.low_rank:
            settings = self.galore_settings
            self.projector_refreshes += galore.galore_adamw_step(
                weight.view(item.shape), grad.view(item.shape), state, lr=group["lr"], betas=group["betas"],
                eps=group["eps"], weight_decay=group["weight_decay"], rank=settings.rank,
                update_proj_gap=settings.update_proj_gap, scale=settings.scale, proj_type=settings.proj_type,
                svd=settings.svd, canonical_signs=settings.canonical_signs, refresh_offset=self._refresh_offset(item))
        else:
            adamw_step(weight, grad, state, group)
        if weights is None:
            return weight.to(item.param.dtype)
        if weight.data_ptr() != weights.data_ptr():
            weights.copy_(weight)
        return weights

    def _refresh_offset(self, item: Item) -> int:
        """With spread refreshes, the tensors of a layer refresh at evenly staggered steps."""
        settings = self.galore_settings
        if not settings.spread_refreshes:
            return 0
        return (item.position * settings.update_proj_gap) // len(self.layers[0])

    def _apply(self, items: list[Item], grads: dict[str, torch.Tensor], coefficient: float,
               gather: list[bool]) -> None:
        """Updates `items` (a collective: every rank calls it with the same items, in order)."""
        group = self.param_groups[0]
        for item, gather_item in zip(items, gather):
            weights = comm.read_weights(item, self.zero3, self.rank, self.device, gather_item)
            if item.owner == self.rank:
                weights = self._update(item, weights, grads.pop(item.key), coefficient, group)
            comm.write_weights(item, weights, self.zero3, self.rank, self.device)

    def _gather_flags(self) -> dict[str, bool]:
        """Under ZeRO-3, whether each item's owner gathers its matrix, for every item of the step
        at once: the one all-reduce and host sync of a backward. An item's flag depends only on
        its owner's state of it, which only its own update (later in this backward) changes."""
        if self._backward_gather is None:
            items = self.items()
            zero = torch.zeros(1, dtype=torch.float64, device=self.device)
            flags = self._reduce_squares_and_flags(zero, items)[1:]
            self._backward_gather = {item.key: flag > 0 for item, flag in zip(items, flags)}
        return self._backward_gather

    @torch.no_grad()
    def _update_completed(self, completed: list[Item]) -> None:
        """The reducer's callback in backward: updates the items whose gradient is complete,
        without a host sync (ZeRO-3: one per backward, _gather_flags) or a collective beyond
        the weights' own. A non-finite gradient must not reach the weights, nor raise on one
        rank while the others wait in a collective: its bucket's gradients are zeroed on the
        device and its squares kept in the norm, so at step() every rank stops together."""
        if not self.final_micro_batch:
            return
        items = sorted(completed, key=lambda item: self._order[item.key])
        grads = {item.key: self.reducer.take(item, self.device) for item in items if item.owner == self.rank}
        squares = self._squared_norms(grads.values())
        non_finite = ~torch.isfinite(squares)  # on the device: masked_fill_ below needs no sync
        for grad in grads.values():
            grad.masked_fill_(non_finite, 0)
        self._backward_squares += squares
        if self.zero3:
            flags = self._gather_flags()
            gather = [flags[item.key] for item in items]
        else:
            gather = [False] * len(items)
        self._apply(items, grads, 1.0, gather)
        self._updated.update(item.key for item in items)

    @torch.no_grad()
    def step(self, closure=None) -> None:
        self.reducer.finish()
        # Items updated in backward are done; the rest (every item by default, and with
        # update_in_backward those that got no gradient) are updated here.
        items = [item for item in self.items() if item.key not in self._updated]
        grads = {item.key: self.reducer.take(item, self.device) for item in items if item.owner == self.rank}
        coefficient, gather = self._clip_and_plan(items, grads, self._backward_squares)
        self._updated.clear()
        self._backward_gather = None
        self._backward_squares.zero_()
        if not math.isfinite(self.global_grad_norm):  # the same value on every rank: all stop together
            raise RuntimeError(f"the gradient norm is {self.global_grad_norm}; stopping before the weights take it")
        self._apply(items, grads, coefficient, gather)

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

    def load(self, global_state: dict[str, Any], rank_states: list[Optional[dict[str, Any]]]) -> None:
        """Restores from the per-rank states of a checkpoint made on any number of ranks (reshard.py)."""
        reshard.restore(self, global_state, rank_states)
