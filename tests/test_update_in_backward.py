"""--update_in_backward: each owned tensor updated as soon as its reduced gradient is complete.

Without clipping the update of an item depends only on its own summed gradient and state,
and a tensor's weights are not used again in the backward that produced its gradient, so
updating in backward must give the same weights as updating at the step, bit for bit.
"""

from __future__ import annotations

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
]


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
