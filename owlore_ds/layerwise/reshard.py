"""Restoring the layerwise optimizer from a checkpoint made on any number of ranks.

On the same number of ranks every rank reads its own file and keeps its items. On
another number, owners are planned anew (plan.assign_owners), each whole item's state
is found by name in whichever file holds it, and the flat chunks of always-trained
tensors are joined and cut again at the new ranks' bounds, growing or shrinking.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch

from owlore_ds.layerwise.plan import assign_owners

if TYPE_CHECKING:
    from owlore_ds.layerwise.optimizer import LayerwiseOptimizer


def restore(opt: "LayerwiseOptimizer", global_state: dict[str, Any],
            rank_states: list[Optional[dict[str, Any]]]) -> None:
    from owlore_ds.layerwise.optimizer import to_device

    same_world = global_state["world_size"] == opt.world
    opt.active, opt.item_state, opt.offloaded = [], {}, {}
    opt.owners = dict(global_state["owners"]) if same_world else {}
    opt.parked = {}
    opt.set_active_layers(global_state["active_layers"])
    if same_world:
        mine = rank_states[opt.rank]
        opt.item_state = {k: to_device(v, opt.device) for k, v in mine["items"].items()}
        opt.offloaded = dict(mine["offloaded"])
        opt.parked = dict(global_state["parked"])
        return
    whole = {k: v for s in rank_states for k, v in s["items"].items() if "@" not in k}
    for item in opt._layer_items():
        if item.owner == opt.rank and item.key in whole:
            opt.item_state[item.key] = to_device(whole[item.key], opt.device)
    for item in opt._always_items:
        if item.owner == opt.rank:
            state = _cut_from_chunks(item.name, item.lo, item.hi, rank_states)
            if state:
                opt.item_state[item.key] = {k: v.to(opt.device) if torch.is_tensor(v) else v for k, v in state.items()}
    # Offloaded state goes to the new ranks by the same greedy plan, after the active items.
    offloaded = {k: v for s in rank_states for k, v in s["offloaded"].items()}
    parked = assign_owners(opt.sizes, opt.world, existing=dict(opt.owners), names=sorted(offloaded))
    opt.parked = {name: parked[name] for name in offloaded}
    opt.offloaded = {name: state for name, state in offloaded.items() if opt.parked[name] == opt.rank}


def _cut_from_chunks(name: str, lo: int, hi: int, rank_states: list[dict[str, Any]]) -> dict[str, Any]:
    """Elements lo..hi of a chunked tensor's flat state, copied from the old chunks they overlap.

    The files are memory-mapped, so a rank reads only its new chunk's pages: the old chunks
    are never joined, which at 70B would put every embedding moment in every rank's memory."""
    chunks = sorted(((int(k.split("@")[1]), v) for s in rank_states for k, v in s["items"].items()
                     if "@" in k and k.split("@")[0] == name), key=lambda c: c[0])
    if not chunks:
        return {}
    cut = dict(chunks[0][1])
    for key, value in chunks[0][1].items():
        if torch.is_tensor(value) and value.dim() == 1:
            pieces = [state[key][max(lo, start) - start : min(hi, start + len(state[key])) - start]
                      for start, state in chunks if max(lo, start) < min(hi, start + len(state[key]))]
            cut[key] = torch.cat(pieces) if len(pieces) > 1 else (pieces or [value[:0]])[0].clone()
    return cut
