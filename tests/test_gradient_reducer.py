"""The layerwise optimizer's gradient path (owlore_ds/layerwise/comm.py, rules.py) on its own:
what an owner receives against sums computed here, and the bytes a rank holds on the way.
The multi-rank case runs real gloo process groups."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from owlore_ds.layerwise import rules
from owlore_ds.layerwise.comm import GradientReducer
from owlore_ds.layerwise.plan import Item, always_items


def _item(key: str, numel: int, owner: int) -> Item:
    return Item(key, key, torch.nn.Parameter(torch.zeros(numel)), 0, numel, owner, False)


def test_one_micro_batch_keeps_the_gradient_as_it_came_and_a_second_sums_in_fp32():
    item = _item("w", 1000, owner=0)
    first = torch.randn(1000).bfloat16()
    reducer = GradientReducer(rank=0, world=1, reduce_dtype=torch.float32, bucket_bytes=1 << 20)
    reducer.add(item, first)
    assert reducer.peak_held_bytes == 2 * 1000  # bf16, no fp32 copy
    taken = reducer.take(item, torch.device("cpu"))
    assert taken.dtype == torch.bfloat16 and torch.equal(taken, first)

    second = torch.randn(1000).bfloat16()
    reducer.add(item, first.clone())
    reducer.add(item, second)
    summed = reducer.take(item, torch.device("cpu"))
    assert summed.dtype == torch.float32
    assert torch.equal(summed, first.float() + second.float())


def test_squared_norm_of_a_bf16_gradient_is_fp32_accurate(monkeypatch):
    """Against a float64 sum: the row norms are accumulated and returned in fp32, a slab at a
    time. Tolerance: an fp32 sum of 64K squares errs by up to about log2(64K) * 2^-24 ~ 1e-6
    per pairwise level, ~1e-5 in all; a bf16 result (the norm's dtype by default) would round
    each row norm to 2^-8 relative, ~4e-3."""
    monkeypatch.setattr(rules, "NORM_SLAB", 3 * rules._NORM_ROW)  # several slabs and a tail
    torch.manual_seed(0)
    grad = (torch.randn(10 * rules._NORM_ROW + 123) * 1e-3).bfloat16()
    exact = grad.double().pow(2).sum()
    assert rules.squared_norm(grad).item() == pytest.approx(exact.item(), rel=2e-5)
    # Through a kept slab: the same sum, bit for bit, and the slab is what was last upcast.
    workspace = torch.full((rules.norm_workspace_numel(grad.numel()),), float("nan"))
    assert workspace.numel() == 3 * rules._NORM_ROW
    assert torch.equal(rules.squared_norm(grad, workspace), rules.squared_norm(grad))
    assert torch.equal(workspace[: rules._NORM_ROW], grad[9 * rules._NORM_ROW : 10 * rules._NORM_ROW].float())
    fp32 = grad.float()
    assert rules.squared_norm(fp32).item() == pytest.approx(exact.item(), rel=2e-5)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_step_in_passes_equals_torch_adamw(monkeypatch, dtype):
    """rules.adamw_step updates a large tensor ADAMW_CHUNK elements at a time (a bounded
    temporary); elementwise, so bit-equal to torch.optim.AdamW's single-tensor update over 3
    steps, in fp32 and in bf16 (pure_bf16: weights, moments and gradient all bf16)."""
    monkeypatch.setattr(rules, "ADAMW_CHUNK", 1000)  # 7 passes, the last one short
    torch.manual_seed(0)
    weight = torch.randn(6543).to(dtype)
    reference = torch.nn.Parameter(weight.clone())
    torch_adamw = torch.optim.AdamW([reference], lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1,
                                    foreach=False)
    group = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.1}
    state = {"step": 0}
    for _ in range(3):
        grad = torch.randn(6543).to(dtype)
        reference.grad = grad.clone()
        torch_adamw.step()
        rules.adamw_step(weight, grad, state, group)
    assert torch.equal(weight, reference.detach())
    assert torch.equal(state["exp_avg_sq"], torch_adamw.state[reference]["exp_avg_sq"])

WORLD = 3
BUCKET_BYTES = 4 * 1000  # fp32: 500-element halves, so gradients are cut into pieces


def _items() -> list[Item]:
    # Whole items owned by different ranks, larger and smaller than a half bucket, plus the
    # chunks of an always-trained tensor (one per rank).
    items = [_item("a", 1700, 0), _item("b", 64, 1), _item("c", 900, 2), _item("d", 30, 1)]
    return items + always_items("emb", torch.nn.Parameter(torch.zeros(1234)), WORLD)


def _gradient(item: Item, index: int, rank: int, micro_batch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * micro_batch + 100 * rank + index)
    return torch.randn(item.numel, generator=generator)


def _rank_main(rank: int, init_file: str, results: dict) -> None:
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    reducer = GradientReducer(rank, WORLD, torch.float32, BUCKET_BYTES)
    items = _items()
    for micro_batch in range(2):
        for index, item in enumerate(items):
            reducer.add(item, _gradient(item, index, rank, micro_batch))
        reducer.finish()
    owned = {item.key: reducer.take(item, torch.device("cpu")) for item in items if item.owner == rank}
    results[rank] = (owned, reducer.peak_held_bytes)
    torch_dist.destroy_process_group()


def test_owners_receive_the_sum_over_ranks_and_micro_batches_holding_at_most_one_bucket(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_rank_main, args=(str(tmp_path / "init"), results), nprocs=WORLD)
    items = _items()
    owned_bytes = [0] * WORLD
    for index, item in enumerate(items):
        expected = sum(_gradient(item, index, rank, micro_batch).double()
                       for micro_batch in range(2) for rank in range(WORLD))
        got = results[item.owner][0][item.key]
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)
        owned_bytes[item.owner] += 4 * item.numel
    for rank in range(WORLD):
        peak = results[rank][1]
        assert owned_bytes[rank] <= peak <= owned_bytes[rank] + BUCKET_BYTES, (rank, peak, owned_bytes[rank])
        assert set(results[rank][0]) == {item.key for item in items if item.owner == rank}


def _galore_optimizer(inactive_state: str):
    from owlore_ds.layerwise import GaloreSettings, LayerwiseOptimizer

    torch.manual_seed(0)
    layers = [[(f"layers.{i}.w", torch.nn.Parameter(torch.randn(12, 8)))] for i in range(2)]
    settings = GaloreSettings(rank=3, update_proj_gap=4, scale=0.5, proj_type="std")
    optimizer = LayerwiseOptimizer(layers, [], lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                   max_grad_norm=0.0, inactive_state=inactive_state, galore_settings=settings)
    return optimizer, [layer[0][1] for layer in layers]


def _train_step(optimizer, params, layer: int, seed: int) -> None:
    optimizer.set_active_layers([layer])
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(seed))
    (params[layer] @ x).pow(2).sum().backward()
    optimizer.finish_backward()
    optimizer.step()


@pytest.mark.parametrize("inactive_state", ["free", "projectors"])
def test_a_returning_layer_reuses_its_projector_only_with_the_projectors_policy(inactive_state):
    """Layer 0, then 1, then 0 again. With "projectors" layer 0 comes back with the projector it
    left with (kept on the CPU, nothing else), fresh moments and its own refresh schedule, so
    no SVD; with "free" it starts from nothing and computes one."""
    from owlore_ds import galore

    optimizer, params = _galore_optimizer(inactive_state)
    _train_step(optimizer, params, 0, seed=1)
    _train_step(optimizer, params, 1, seed=2)
    assert optimizer.projector_refreshes == 2
    kept = optimizer.offloaded.get("layers.0.w")
    if inactive_state == "projectors":
        assert set(kept) == {"projector", "proj_step", "lifetime_step"} and kept["projector"].device.type == "cpu"
    else:
        assert kept is None

    # The expected third step, from galore's rule on the state the policy says layer 0 returns with.
    weight = params[0].detach().clone()
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(3))
    w = weight.clone().requires_grad_(True)
    (w @ x).pow(2).sum().backward()
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in kept.items()} if kept else {}
    galore.galore_adamw_step(weight, w.grad, state, lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                             rank=3, update_proj_gap=4, scale=0.5, proj_type="std", canonical_signs=True)

    _train_step(optimizer, params, 0, seed=3)
    assert optimizer.projector_refreshes == (2 if inactive_state == "projectors" else 3)
    assert torch.equal(params[0].detach(), weight)
    assert optimizer.item_state["layers.0.w"]["step"] == 1  # moments started again
    assert optimizer.item_state["layers.0.w"]["lifetime_step"] == (2 if inactive_state == "projectors" else 1)
