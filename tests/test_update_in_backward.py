"""--update_in_backward: each owned tensor updated as soon as its reduced gradient is complete.

Without clipping the update of an item depends only on its own summed gradient and state,
and a tensor's weights are not used again in the backward that produced its gradient, so
updating in backward must give the same weights as updating at the step, bit for bit.
"""

from __future__ import annotations

import time

import pytest

from conftest import ROOT, common_args, final_weights, run_training
from owlore_ds.metrics import read_metrics

ZERO2 = ROOT / "ds_configs" / "zero2.json"
ZERO3 = ROOT / "ds_configs" / "zero3.json"
SAMPLING = dict(lisa_activated_layers=2, lisa_interval_steps=2, owl_nsamples=4)
GALORE = dict(galore_rank=8, galore_update_proj_gap=3, galore_scale=0.5)

CASES = [
    # (method, DeepSpeed config, ranks, micro-batches per step, extra flags)
    ("owlore", ZERO2, 2, 2, {}),
    ("lisa", ZERO3, 2, 1, {}),
    ("galore", ZERO2, 1, 1, {"bf16": True}),
    # bf16 under ZeRO-3: an owner gathers a matrix until it holds its fp32 master, then not, so
    # the gather flags (one all-reduce per backward) change between steps
    ("owlore", ZERO3, 2, 1, {"bf16": True}),
    # fp32 on 1 and 2 ranks under ZeRO-2 and ZeRO-3, one micro-batch: the bound on the gradients
    ("owlore", ZERO2, 1, 1, {}),
    ("owlore", ZERO3, 1, 1, {}),
    ("owlore", ZERO2, 2, 1, {"freeze_embeddings": True}),
    ("owlore", ZERO3, 2, 1, {}),
]
HIDDEN, INTERMEDIATE, VOCAB = 64, 128, 512  # conftest.make_model's llama
BUCKET_ELEMENTS = HIDDEN * HIDDEN  # reduce_bucket_size "auto" (ds_config.fill)


@pytest.fixture(scope="module")
def four_layers(make_tiny_model):
    return make_tiny_model("llama", num_layers=4)


@pytest.mark.parametrize("method,config,nproc,accumulation,extra", CASES,
                         ids=[f"{m}-{c.stem}-{n}rank-gas{a}" for m, c, n, a, _ in CASES])
def test_update_in_backward_equals_the_update_at_the_step(tmp_path, four_layers, task_data, method, config, nproc,
                                                          accumulation, extra):
    args = dict(method=method, deepspeed=config, max_steps=4, max_grad_norm=0, gradient_accumulation_steps=accumulation,
                per_device_train_batch_size=4 // (nproc * accumulation), **SAMPLING, **extra,
                **(GALORE if method != "lisa" else {}))
    run_training(common_args(four_layers, task_data, tmp_path / "step", **args), nproc=nproc)
    run_training(common_args(four_layers, task_data, tmp_path / "backward", update_in_backward=True, **args),
                 nproc=nproc)
    at_step, in_backward = read_metrics(tmp_path / "step"), read_metrics(tmp_path / "backward")
    assert [m["loss"] for m in in_backward] == [m["loss"] for m in at_step]
    assert [m["grad_norm"] for m in in_backward] == pytest.approx([m["grad_norm"] for m in at_step], rel=1e-6)
    a, b = final_weights(tmp_path / "step"), final_weights(tmp_path / "backward")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    # What it is for: with one micro-batch per step the owned share of the gradients never
    # exists at once (with more, the earlier micro-batches' sums must be kept anyway).
    held, held_at_step = (max(m["peak_gradient_bytes"] for m in metrics) for metrics in (in_backward, at_step))
    assert held < held_at_step if accumulation == 1 else held <= held_at_step
    if accumulation == 1 and not extra.get("bf16"):
        # At most one bucket (none on one rank, where nothing is reduced) and the largest
        # item a rank owns: a layer's largest matrix, or an always-trained tensor's 1/N
        # chunk (here the embeddings' and lm_head's, larger than a layer matrix unless frozen).
        layer_largest = HIDDEN * INTERMEDIATE
        always_largest = 0 if extra.get("freeze_embeddings") else -(-VOCAB * HIDDEN // nproc)
        bound = 4 * ((BUCKET_ELEMENTS if nproc > 1 else 0) + max(layer_largest, always_largest))
        print(f"{method} {config.stem} {nproc} rank(s): peak gradient bytes {held} in backward, "
              f"{held_at_step} at the step, bound {bound}")
        assert held <= bound


# ---------------------------------------------------------------- a non-finite gradient, in process

WORLD = 2


def _nan_rank_main(rank: int, init_file: str, results: dict) -> None:
    """Two real gloo ranks, GaLore matrices refreshed at every step, small buckets: step 1 is
    finite; at step 2 rank 1's gradient of layer 0's first matrix alone is NaN, so only that
    item's owner sees it (a raise there alone, as a GaLore SVD of it would, hangs the other rank)."""
    import torch
    import torch.distributed as torch_dist

    from owlore_ds.layerwise import GaloreSettings, LayerwiseOptimizer

    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    layers = [[(f"layers.{i}.{name}", torch.nn.Parameter(torch.randn(16, 12))) for name in ("a", "b")]
              for i in range(2)]
    always = [("norm", torch.nn.Parameter(torch.ones(12)))]
    optimizer = LayerwiseOptimizer(
        layers, always, lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, max_grad_norm=0.0,
        galore_settings=GaloreSettings(rank=4, update_proj_gap=1, scale=0.5, proj_type="std"),
        bucket_bytes=4 * 16 * 12, update_in_backward=True)
    optimizer.set_active_layers([0, 1])
    outcome = []
    for step in range(2):
        x = torch.randn(12, 5, generator=torch.Generator().manual_seed(10 * step + rank))
        loss = sum(((p * always[0][1]) @ x).pow(2).sum() for layer in layers for _, p in layer)
        if step == 1 and rank == 1:
            loss = loss + (layers[0][0][1] @ x).sum() * float("nan")
        loss.backward()
        optimizer.finish_backward()
        try:
            optimizer.step()
            outcome.append("ok")
        except RuntimeError as exc:
            outcome.append(str(exc))
    finite = all(bool(torch.isfinite(p).all()) for layer in layers for _, p in layer) and bool(
        torch.isfinite(always[0][1]).all())
    results[rank] = (outcome, finite, optimizer.owners["layers.0.a"])
    torch_dist.destroy_process_group()


def test_a_non_finite_gradient_stops_every_rank_at_the_step_and_no_weight_takes_it(tmp_path):
    """Backward has no host sync per bucket to stop on, so a NaN gradient is zeroed where it is
    updated and counted in the norm: every rank raises at step(), none hangs, no weight is NaN."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    context = mp.spawn(_nan_rank_main, args=(str(tmp_path / "init"), results), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("a rank hung")
    for rank in range(WORLD):
        outcome, finite, owner = results[rank]
        assert outcome[0] == "ok" and "gradient norm is nan" in outcome[1], (rank, outcome)
        assert finite, f"rank {rank}: a weight took the NaN gradient"
    assert results[0][2] == results[1][2]  # the same owner on both ranks
