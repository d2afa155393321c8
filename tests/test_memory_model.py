"""The memory model (owlore_ds/memory_model.py) against real training runs.

A 77.1M-parameter Llama (hidden 1536, 3 layers, GQA) is trained for 3 steps by the real
trainer on 1 and 2 ranks, by every method (lomo/adalomo with the default --max_grad_norm 1,
so with their two backward passes); the predicted optimizer_state_bytes must equal the measured one
exactly and the predicted peak must be within 10% of the measured peak_memory_bytes.

On CPU the peak is the process's peak RSS, which also holds memory that glibc's malloc
keeps after a free (its mmap threshold grows with every freed large block, so later
blocks of a few MB come from the heap and stay resident). A GPU's max-allocated figure
counts live tensors only, which is what the model predicts; MALLOC_MMAP_THRESHOLD_ pins
the threshold so that freed blocks go back to the system and RSS follows live bytes too.
Without it the measured peaks were 9-21% above the live bytes (on a 19.7M model). The model
is that large so that the process's own fixed and machine-dependent bytes (library pages,
allocator arenas: tens of MiB) stay small beside the terms checked.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import ROOT, common_args, run_training
from owlore_ds.metrics import read_metrics
from owlore_ds.memory_model import RUNTIME_OVERHEAD, estimate, format_table

ZERO2 = ROOT / "ds_configs" / "zero2.json"
ZERO3 = ROOT / "ds_configs" / "zero3.json"
LIVE_BYTES_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
MICRO_BATCH = {1: 2, 2: 1}  # the same global batch of 2 on 1 and 2 ranks
BLOCK = 64
GALORE_RANK = 64


@pytest.fixture(scope="module")
def model_77m(tmp_path_factory, tokenizer_dir) -> Path:
    """Big enough that its tensors (294 MiB of fp32 weights) dwarf the process's fixed overhead."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(
        "llama", hidden_size=1536, intermediate_size=4096, num_hidden_layers=3, num_attention_heads=24,
        num_key_value_heads=8, vocab_size=len(tokenizer), max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("model-77m")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


CASES = [
    # (method, ranks, ZeRO config)
    ("full", 1, ZERO2), ("lisa", 1, ZERO2), ("galore", 1, ZERO2), ("owlore", 1, ZERO2),
    ("full", 2, ZERO2), ("lisa", 2, ZERO2), ("galore", 2, ZERO2), ("owlore", 2, ZERO2),
    ("full", 1, ZERO3),
    # ZeRO-2 runs lomo/adalomo as stage 0; ZeRO-3 on 2 ranks, where parameters are gathered
    # (on 1 rank DeepSpeed gathers nothing and the CPU peak is the model load).
    ("lomo", 1, ZERO2), ("adalomo", 1, ZERO2), ("adalomo", 2, ZERO3), ("lora", 2, ZERO2),
]
# LoRA on every linear at rank 64 (5.2M adapter parameters): with the defaults (q_proj,
# v_proj, r 8: 123K) the frozen weights and the fixed overhead would be all there is to check.
LORA = dict(lora_r=64, lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"))


@pytest.mark.parametrize("method,nproc,deepspeed", CASES,
                         ids=[f"{m}-{n}rank-{d.stem}" for m, n, d in CASES])
def test_prediction_matches_measurement(tmp_path, model_77m, task_data, method, nproc, deepspeed):
    _check_prediction(tmp_path, model_77m, task_data, method, nproc, deepspeed)


@pytest.mark.parametrize("method,nproc,precision", [("full", 1, "fp32"), ("owlore", 1, "bf16"), ("lisa", 2, "bf16")])
def test_fixed_overhead_matches_measurement(tmp_path, tiny_llama, task_data, method, nproc, precision):
    """On a 0.2M-parameter Llama every shape-derived term is below 1 MiB, so the measured peak is
    the fixed overhead (RUNTIME_OVERHEAD, with bf16 CPU_BF16_KERNELS) the 77M checks lean on.
    Measured 7.8-10.9 MiB (fp32) and 16.5-21.4 (bf16) with the libraries' pages mapped before
    the baseline; 28-50 when first-run library code was counted."""
    from transformers import AutoConfig

    out = tmp_path / "out"
    bf16 = {"bf16": True, "master_weights": "pure_bf16"} if precision == "bf16" else {}
    run_training(common_args(tiny_llama, task_data, out, method=method, deepspeed=ZERO2, max_steps=3, block_size=BLOCK,
                             per_device_train_batch_size=MICRO_BATCH[nproc], gradient_checkpointing=True,
                             lisa_activated_layers=1, lisa_prob_mode="uniform", galore_rank=8, **bf16),
                 nproc=nproc, extra_env=LIVE_BYTES_ENV)
    measured = max(m["peak_memory_bytes"] for m in read_metrics(out))
    predicted = estimate(AutoConfig.from_pretrained(tiny_llama), method, world_size=nproc, precision=precision,
                         master_weights="pure_bf16" if bf16 else "fp32", micro_batch_size=MICRO_BATCH[nproc],
                         block_size=BLOCK, gradient_checkpointing=True, lisa_activated_layers=1, galore_rank=8,
                         device="cpu")
    print(f"{method} {nproc} rank(s) {precision}: predicted {predicted.peak / 2**20:.1f} MiB, "
          f"measured {measured / 2**20:.1f} MiB")
    assert predicted.peak - predicted.runtime_overhead < 4 * 2**20  # the fixed bytes are most of it
    assert abs(measured - predicted.peak) < 5 * 2**20


@pytest.mark.parametrize("method,nproc,galore_svd", [("owlore", 1, "exact"), ("lisa", 2, "exact"),
                                                    ("owlore", 1, "randomized")])
def test_pure_bf16_prediction_matches_measurement(tmp_path, model_77m, task_data, method, nproc, galore_svd):
    """The reference's pure-bf16 policy: bf16 weights, moments and projectors, no fp32 copies.

    The state bytes are exact. The peak is owlore's at a projector refresh (step 1: the SVD of
    the first 4096 x 1536 matrix, on the fp32 copy of its bf16 gradient) and lisa's in the
    backward of the active layer's MLP. What the model leaves out or bounds, in MiB, against
    predicted peaks of 335 (owlore) and 297 (lisa):
    - fixed bytes (RUNTIME_OVERHEAD + CPU_BF16_KERNELS, 19): measured 16.5-21.4 over these
      two methods on a 0.2M-parameter Llama, -3..+3;
    - owlore: LAPACK's SVD workspace, gesdd's at 4096 x 1536 measured 92.9-96.6 against the
      93.1 of _galore_workspace, 0..+4; the step counts every item's state, which at step 1
      the items after the SVD's do not have yet, -4;
    - lisa: the backward moment adds the gradients' most (the reducer's own high-water mark,
      67.5, against the model's 69) to the activations' most (8.2), which need not coincide,
      and counts the embedding chunk that backward reaches last: -10..0;
    - allocations under MALLOC_MMAP_THRESHOLD_ stay in glibc's heap: 0..+3.
    That is -7..+10 (owlore) and -13..+6 (lisa), within 4.4%; on a CPU without AVX-512, where
    torch does not run bf16 GEMMs through oneDNN, CPU_BF16_KERNELS' 10 MiB is absent too
    (-3.4%): at most 7.8% either way, so the 10% of the fp32 rows holds here as well.
    Library code first run in training is not in the measurement (memory_baseline_bytes maps
    the libraries' pages before the baseline): it was, and its 20-56 MiB depended on the page
    cache, so a freshly installed venv measured these rows 11-15% above the prediction.
    With --galore_svd randomized the refresh never factors the whole matrix (its workspace is
    the fp32 copy and the range finder's thin products), so the SVD's 93 MiB are not there.
    """
    _check_prediction(tmp_path, model_77m, task_data, method, nproc, ZERO2, precision="bf16",
                      master_weights="pure_bf16", galore_svd=galore_svd)


@pytest.mark.parametrize("method,nproc", [("owlore", 1), ("galore", 2)])
def test_update_in_backward_prediction_matches_measurement(tmp_path, model_77m, task_data, method, nproc):
    """--update_in_backward (no clipping): each item's update, with its workspace, happens in
    backward once its gradient is complete, so the owned share never exists at once. The
    model bounds it (a layer's backward, the largest update's workspace, one item's sum and, on
    N ranks, the bucket in flight); measured 3.8% (owlore, 1 rank) and 2.2% (galore, 2 ranks)
    under it."""
    _check_prediction(tmp_path, model_77m, task_data, method, nproc, ZERO2, update_in_backward=True)


def _check_prediction(tmp_path, model_77m, task_data, method: str, nproc: int, deepspeed: Path,
                      precision: str = "fp32", master_weights: str = "fp32", update_in_backward: bool = False,
                      galore_svd: str = "exact") -> None:
    from transformers import AutoConfig

    out = tmp_path / "out"
    bf16 = {"bf16": True, "master_weights": master_weights} if precision == "bf16" else {}
    lora = LORA if method == "lora" else {}
    lora_flags = {k: ",".join(v) if isinstance(v, tuple) else v for k, v in lora.items()}
    # lisa_prob_mode uniform: owlore's OWL calibration is a one-off pass before training
    # (not a training term), and on CPU its RSS would otherwise count in the peak.
    run_training(common_args(model_77m, task_data, out, method=method, deepspeed=deepspeed, max_steps=3,
                             block_size=BLOCK, per_device_train_batch_size=MICRO_BATCH[nproc],
                             gradient_checkpointing=True, lisa_activated_layers=1, lisa_prob_mode="uniform",
                             galore_rank=GALORE_RANK, galore_svd=galore_svd, **lora_flags, **bf16,
                             **({"update_in_backward": True, "max_grad_norm": 0} if update_in_backward else {})),
                 nproc=nproc, extra_env=LIVE_BYTES_ENV)
    metrics = read_metrics(out)
    predicted = estimate(AutoConfig.from_pretrained(model_77m), method, world_size=nproc,
                         zero_stage=3 if deepspeed == ZERO3 else 2, precision=precision, master_weights=master_weights,
                         micro_batch_size=MICRO_BATCH[nproc], block_size=BLOCK, gradient_checkpointing=True,
                         lisa_activated_layers=1, galore_rank=GALORE_RANK, device="cpu", update_in_backward=update_in_backward,
                         galore_svd=galore_svd,
                         **lora)
    assert {m["optimizer_state_bytes"] for m in metrics} == {predicted.optimizer_state_bytes}
    measured_peak = max(m["peak_memory_bytes"] for m in metrics)
    print(f"{method} {nproc} rank(s) {precision}/{master_weights}: predicted {predicted.peak / 2**20:.1f} MiB, "
          f"measured {measured_peak / 2**20:.1f} MiB ({measured_peak / predicted.peak - 1:+.1%})")
    # The model's terms must dominate, or agreement would say nothing.
    assert predicted.peak > 3 * RUNTIME_OVERHEAD["cpu"]
    assert predicted.peak == pytest.approx(measured_peak, rel=0.10), (
        f"predicted {predicted.peak / 2**20:.1f} MiB, measured {measured_peak / 2**20:.1f} MiB\n"
        + format_table({method: predicted}, unit=2**20))


def test_estimate_rejects_bad_input():
    from owlore_ds.architectures import architecture_config
    from owlore_ds.errors import UserInputError

    config = architecture_config("llama2-7b", 2)
    with pytest.raises(UserInputError, match="--method"):
        estimate(config, "sgd")
    with pytest.raises(UserInputError, match="--world_size"):
        estimate(config, "full", world_size=0)
    with pytest.raises(UserInputError, match="--lora_target_modules"):
        estimate(config, "lora", lora_target_modules=("nope",))
