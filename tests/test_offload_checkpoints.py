"""--offload_checkpoints: what autograd saves in forward waits in host memory (modeling.HostOffload).

On this CPU-only machine host and device memory are one, so the copy itself cannot run
here (on a GPU it is an asynchronous copy to pinned memory and back, read in
modeling.HostOffload); what can be shown is what the hooks are handed: under gradient
checkpointing exactly one layer input per decoder layer beside a fixed rest, which is what
the memory model takes off the device (memory_model._activation_parts).
"""

from __future__ import annotations

import pytest
import torch

from conftest import common_args, run_training
from owlore_ds.metrics import read_metrics
from owlore_ds.modeling import HostOffload, causal_lm_loss_sum

BATCH, TOKENS, HIDDEN = 2, 32, 64


def _model(num_layers: int, checkpointing: bool) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=num_layers,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                  max_position_embeddings=256, tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _offloaded_and_grads(num_layers: int, checkpointing: bool, offload: bool) -> tuple[int, dict[str, torch.Tensor]]:
    model = _model(num_layers, checkpointing)
    ids = torch.randint(0, 512, (BATCH, TOKENS), generator=torch.Generator().manual_seed(1))
    host = HostOffload()
    with host.hooks() if offload else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        loss = causal_lm_loss_sum(model(input_ids=ids).logits, ids)
    loss.backward()
    return host.offloaded_bytes, {n: p.grad for n, p in model.named_parameters()}


def test_under_checkpointing_each_layer_hands_over_only_its_input():
    checkpoint = BATCH * TOKENS * HIDDEN * 4  # one fp32 layer input
    four, grads = _offloaded_and_grads(4, checkpointing=True, offload=True)
    two, _ = _offloaded_and_grads(2, checkpointing=True, offload=True)
    assert four - two == 2 * checkpoint
    # Without checkpointing every layer's activations would go (what the flag requires it for).
    unchecked, _ = _offloaded_and_grads(4, checkpointing=False, offload=True)
    assert unchecked - _offloaded_and_grads(2, checkpointing=False, offload=True)[0] > 10 * 2 * checkpoint
    # Backward reads what was handed over: the gradients are those of a run without the hooks.
    _, reference = _offloaded_and_grads(4, checkpointing=True, offload=False)
    assert all(torch.equal(grads[name], reference[name]) for name in reference)


@pytest.mark.parametrize("method", ["owlore", "full"])
def test_training_with_offloaded_checkpoints_equals_training_without(tmp_path, tiny_llama, task_data, method):
    args = dict(method=method, max_steps=3, gradient_checkpointing=True, lisa_activated_layers=1, owl_nsamples=4)
    run_training(common_args(tiny_llama, task_data, tmp_path / "plain", **args))
    run_training(common_args(tiny_llama, task_data, tmp_path / "offloaded", offload_checkpoints=True, **args))
    plain, offloaded = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "offloaded")
    assert [m["loss"] for m in offloaded] == [m["loss"] for m in plain]
