#!/usr/bin/env python
"""The OwLore reference pipeline as it really runs, rebuilt as the benchmark's peer.

    python tools/peer_owlore.py --model_name_or_path DIR --dataset_path PATH --output_dir OUT \
        --bf16 --gradient_checkpointing --block_size 512 --per_device_train_batch_size 1 --max_steps 100 \
        --learning_rate 5e-5 --lisa_activated_layers 5 --lisa_interval_steps 50 [--outlier_ratios ratios.json] \
        --galore_rank 256 --galore_update_proj_gap 100 --galore_scale 1.0 --galore_proj_type std \
        [--peer_optimizer galore|adamw]

What the reference (pixeli99/OwLore: src/lmflow/pipeline/finetuner.py, launched by
scripts/run_finetune_with_lisa.sh from owlore_scripts/run_owlore_low_rank.sh or run_lisa.sh)
does, and so what this does:

- one process, a Hugging Face Trainer loop, no ZeRO (one GPU: ds_config_zero0_no_offload);
- `--bf16 --torch_dtype bfloat16`: a pure bf16 model, no master weights, the optimizer
  updates the bf16 weights; `gradient_checkpointing=True` is the script's default. Both are
  forced here: --fp32 is refused, checkpointing is on whether or not the flag is given;
- the loss is Hugging Face's own, `model(..., labels=...).loss`, over the full logits (the
  fp32 upcast of the whole micro-batch's logits included), as the HF Trainer computes it:
  with `num_items_in_batch`, the summed loss of a micro-batch over the targets of the whole
  global batch (transformers >= 4.46), so the micro-batches' gradients sum to the gradient
  of the global-batch mean, and the reported loss (their sum) is the global batch's
  per-token mean, the trainer's definition;
- the HF Trainer's clipping, max_grad_norm 1.0 (its default: the scripts do not pass one),
  then the optimizer, the scheduler, and gradients set to None;
- `--peer_optimizer galore` (default; run_owlore_low_rank.sh, `--galore True`): one
  `galore_torch.GaLoreAdamW(param_groups, lr=lr)`, built with lr only, so with galore-torch's
  own defaults (betas (0.9, 0.999), eps 1e-6, weight decay 0): every nn.Linear of the decoder
  layers ("attn"/"mlp" in its name) under GaLore (rank, gap 100, scale 1.0, std), everything
  else (norms, embeddings, lm_head) plain AdamW in that optimizer;
- `--peer_optimizer adamw` (run_lisa.sh, LMFlow's LISA: `--optim adamw_hf`, no GaLore): plain
  AdamW over every parameter with the HF TrainingArguments defaults (betas (0.9, 0.999),
  eps 1e-8, weight decay 0), as torch.optim.AdamW one parameter at a time (adamw_hf is
  transformers' old per-parameter AdamW; it adds eps before the bias correction of the second
  moment, torch after);
- the LISA callback: every K steps all decoder layers get `requires_grad=False`, then gamma
  layers drawn with numpy (OWL probabilities from --outlier_ratios, else uniform) get
  `requires_grad=True`. A frozen layer gets no gradient, so the optimizer skips it, but its
  state stays: the state of every layer ever visited is kept (LMFlow issues 729, 768, 778).

It reads the trainer's flags (same names, same validation), its data and batches
(owlore_ds.data) and writes metrics.jsonl with the trainer's fields, the memory figures
measured the same way (owlore_ds.metrics), so the two compare row for row. Flags for
features the reference does not have, or settings it does not take, are refused. What it
ran (not the trainer's defaults) is the run config given to MetricsLog and OUT/peer_run.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from owlore_ds.cli import run_main  # noqa: E402

log = logging.getLogger("peer_owlore")

PEER_OPTIMIZERS = ("galore", "adamw")
# Trainer options the reference pipeline has no counterpart for: giving one is an error,
# so that a comparison never silently runs with a setting the peer ignored.
UNSUPPORTED = ("method", "deepspeed", "resume_from_checkpoint", "master_weights", "inactive_state", "galore_svd",
               "galore_svd_signs", "galore_spread_refreshes", "freeze_embeddings", "reduce_dtype",
               "update_in_backward", "fp32")
# Settings the reference takes from library defaults, not from its command line (the
# optimizer is built with lr only; the HF Trainer clips at its default 1.0): a value other
# than the trainer's default would not be what the reference runs.
FIXED = {"adam_beta1": "the optimizer's betas are its library default (0.9, 0.999)",
         "adam_beta2": "the optimizer's betas are its library default (0.9, 0.999)",
         "adam_epsilon": "the optimizer's eps is its library default (GaLoreAdamW 1e-6, HF AdamW 1e-8)",
         "weight_decay": "the optimizer's weight decay is its library default, 0",
         "max_grad_norm": "the HF Trainer clips at its default max_grad_norm 1.0"}
# HF TrainingArguments' defaults, which --optim adamw_hf gets (run_lisa.sh passes none of them);
# adamw_hf steps one parameter at a time, so no foreach (whose grouped temporaries would add
# to the peak on a GPU).
HF_ADAMW = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, foreach=False)


def parse(argv: Optional[Sequence[str]] = None):
    """(trainer config, peer optimizer): the trainer's flags plus --peer_optimizer."""
    from owlore_ds.config import parse_args
    from owlore_ds.errors import UserInputError

    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--peer_optimizer", default="galore")
    known, rest = own.parse_known_args(argv)
    if known.peer_optimizer not in PEER_OPTIMIZERS:
        raise UserInputError(f"--peer_optimizer: expected one of {', '.join(PEER_OPTIMIZERS)}, "
                             f"got {known.peer_optimizer!r}")
    return parse_args(rest), known.peer_optimizer


def check_supported(cfg) -> None:
    from owlore_ds.config import TrainConfig
    from owlore_ds.errors import UserInputError

    defaults = TrainConfig()
    for name in UNSUPPORTED:
        if getattr(cfg, name) != getattr(defaults, name):
            raise UserInputError(f"--{name}: not part of the reference pipeline that tools/peer_owlore.py rebuilds")
    for name, why in FIXED.items():
        if getattr(cfg, name) != getattr(defaults, name):
            raise UserInputError(f"--{name} {getattr(cfg, name)}: the reference does not take it ({why})")


class LayerSwitcher:
    """The reference's LISA callback: every K steps, freeze all layers and unfreeze gamma sampled ones."""

    def __init__(self, layers: list, num_active: int, interval_steps: int, probabilities, seed: int):
        import numpy as np

        self.layers = layers
        self.num_active = min(num_active, len(layers))
        self.interval_steps = interval_steps
        self.probabilities = np.asarray(probabilities, dtype=np.float64)
        self.rng = np.random.RandomState(seed)  # the reference draws from numpy's global generator
        self.active: list[int] = []

    def on_step_begin(self, step: int) -> None:
        if step % self.interval_steps != 0:
            return
        for layer in self.layers:
            layer.requires_grad_(False)
        picked = self.rng.choice(len(self.layers), self.num_active, replace=False, p=self.probabilities)
        self.active = sorted(int(i) for i in picked)
        for index in self.active:
            self.layers[index].requires_grad_(True)


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of every tensor in optimizer.state (moments and GaLore projectors), each storage once."""
    import torch

    seen: set[int] = set()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            # galore_torch keeps its projector as a Python object holding the projection matrix.
            tensors = [getattr(value, "ortho_matrix", value)]
            if isinstance(tensors[0], (list, tuple)):  # proj_type "full" holds two matrices
                tensors = list(tensors[0])
            for t in tensors:
                if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in seen:
                    seen.add(t.untyped_storage().data_ptr())
                    total += t.untyped_storage().nbytes()
    return total


def layer_probabilities_for(cfg, model) -> list[float]:
    from owlore_ds.errors import UserInputError
    from owlore_ds.outliers import _decoder, load_ratios
    from owlore_ds.sampler import layer_probabilities

    num_layers = len(_decoder(model).layers)
    mode = cfg.lisa_prob_mode or ("owl" if cfg.outlier_ratios else "uniform")
    ratios: Optional[list[float]] = None
    if cfg.outlier_ratios:
        try:
            ratios = load_ratios(cfg.outlier_ratios, model)
        except ValueError as exc:
            raise UserInputError(str(exc)) from None
    elif mode in ("owl", "owl_reverse"):
        raise UserInputError(f"--lisa_prob_mode {mode} needs --outlier_ratios (the peer does not compute them; "
                             "tools/compute_outliers.py does)")
    try:
        return layer_probabilities(mode, num_layers, ratios).tolist()
    except ValueError as exc:
        raise UserInputError(f"--outlier_ratios/--lisa_prob_mode: {exc}") from None


def build_optimizer(model, cfg, kind: str = "galore"):
    """The reference's optimizer, built as it builds it: GaLoreAdamW(groups, lr=lr), or with
    --peer_optimizer adamw the HF Trainer's AdamW over every parameter (HF_ADAMW)."""
    import torch

    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, **HF_ADAMW)
    from galore_torch import GaLoreAdamW

    from owlore_ds.layer_sampling import split_parameters

    per_layer, always = split_parameters(model, freeze_embeddings=False)
    layer_params = [p for layer in per_layer for _, p in layer]
    # The decoder layers' 2-D weights are the reference's "attn"/"mlp" nn.Linear weights; it
    # puts each in its own group with the same settings, which steps them the same as one group.
    galore_params = [p for p in layer_params if p.dim() == 2]
    regular = [p for p in layer_params if p.dim() != 2] + [p for _, p in always]
    groups = [{"params": regular},
              {"params": galore_params, "rank": cfg.galore_rank, "update_proj_gap": cfg.galore_update_proj_gap,
               "scale": cfg.galore_scale, "proj_type": cfg.galore_proj_type}]
    return GaLoreAdamW(groups, lr=cfg.learning_rate, no_deprecation_warning=True)


def ran_config(cfg, kind: str, optimizer) -> dict[str, Any]:
    """What the peer runs, for the run's config record (not the trainer defaults in cfg)."""
    group = optimizer.param_groups[0]
    record: dict[str, Any] = {
        "pipeline": "peer_owlore (pixeli99/OwLore reference: HF Trainer + LISA callback)",
        "peer_optimizer": kind,
        # galore-torch's class is named AdamW in its module; GaLoreAdamW is its exported name
        "optimizer": "galore_torch.GaLoreAdamW" if kind == "galore" else "torch.optim.AdamW",
        "lr": cfg.learning_rate, "betas": list(group["betas"]), "eps": group["eps"],
        "weight_decay": group["weight_decay"],
        "foreach": group.get("foreach"),  # torch AdamW: False, one parameter at a time as adamw_hf
        "precision": "pure bf16 (bf16 weights and optimizer state, no master weights)",
        "master_weights": "none",
        "gradient_checkpointing": True,
        "loss": "Hugging Face model(..., labels=...).loss over the full logits, num_items_in_batch = global targets",
        "max_grad_norm": cfg.max_grad_norm,
        "inactive_state": "kept (the state of every visited layer stays in the optimizer)",
        "zero_stage": None, "world_size": 1,
        "lisa_activated_layers": cfg.lisa_activated_layers, "lisa_interval_steps": cfg.lisa_interval_steps,
        "lisa_prob_mode": cfg.lisa_prob_mode or ("owl" if cfg.outlier_ratios else "uniform"),
        "outlier_ratios": cfg.outlier_ratios,
        "flags": cfg.to_dict(),
    }
    if kind == "galore":
        record["galore"] = {"rank": cfg.galore_rank, "update_proj_gap": cfg.galore_update_proj_gap,
                            "scale": cfg.galore_scale, "proj_type": cfg.galore_proj_type,
                            "svd": "exact (torch.linalg.svd, galore-torch's own signs)"}
    return record


class Peer:
    """The reference's training loop: model, optimizer, layer switcher and data, one step at a time."""

    def __init__(self, cfg, kind: str = "galore"):
        import torch
        from deepspeed.accelerator import get_accelerator

        from owlore_ds import metrics
        from owlore_ds.data import GlobalBatches, load_training_data
        from owlore_ds.modeling import check_block_size, load_model, load_tokenizer, read_model_config
        from owlore_ds.optim import build_scheduler
        from owlore_ds.outliers import _decoder

        check_supported(cfg)
        self.cfg = cfg
        self.kind = kind
        self.device = torch.device(get_accelerator().current_device_name())
        model_config = read_model_config(cfg.model_name_or_path)
        check_block_size(model_config, cfg.block_size, cfg.model_name_or_path)
        metrics.check_reporter(cfg.report_to)
        tokenizer = load_tokenizer(cfg.model_name_or_path)
        self.data = load_training_data(cfg.dataset_path, tokenizer, cfg.model_name_or_path, cfg.block_size,
                                       cfg.cache_dir, model_config.vocab_size)
        self.global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
        self.batches = GlobalBatches(len(self.data), self.global_batch, cfg.seed, shuffle=not cfg.no_shuffle)
        self.total_steps = cfg.total_steps(self.batches.steps_per_epoch)

        self.memory_baseline = metrics.memory_baseline_bytes()  # as the trainer: after the data, before the model
        torch.manual_seed(cfg.seed)
        # The reference loads the model in bf16 and trains it as is (pure bf16, no master
        # copy), with gradient checkpointing: both forced, whatever --bf16/--gradient_checkpointing say.
        self.model = load_model(cfg.model_name_or_path, "bf16", gradient_checkpointing=True).to(self.device)
        self.model.train()
        self.switcher = LayerSwitcher(list(_decoder(self.model).layers), cfg.lisa_activated_layers,
                                      cfg.lisa_interval_steps, layer_probabilities_for(cfg, self.model), cfg.seed)
        self.optimizer = build_optimizer(self.model, cfg, kind)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)
        self.ran = ran_config(cfg, kind, self.optimizer)
        metrics.start_peak_window(self.model)
        log.info("peer (%s): %d steps, global batch %d, %d of %d layers every %d steps%s", kind, self.total_steps,
                 self.global_batch, self.switcher.num_active, len(self.switcher.layers), cfg.lisa_interval_steps,
                 f", GaLore rank {cfg.galore_rank} gap {cfg.galore_update_proj_gap}" if kind == "galore" else "")

    def train_step(self, step: int) -> dict[str, Any]:
        """Optimizer step `step` (from 0); returns its metrics.jsonl record."""
        import torch

        from owlore_ds import metrics
        from owlore_ds.data import GlobalBatches
        from owlore_ds.modeling import model_inputs

        cfg, data = self.cfg, self.data
        start = time.perf_counter()
        self.switcher.on_step_begin(step)
        rows = self.batches.rows(step)
        targets = data.target_count(rows)
        lr = self.scheduler.get_last_lr()[0]
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for micro_step in range(cfg.gradient_accumulation_steps):
            micro = GlobalBatches.micro_rows(rows, micro_step, 0, 1, cfg.per_device_train_batch_size)
            batch = {key: value.to(self.device) for key, value in data.batch(micro).items()}
            # HF's loss over the full logits; with num_items_in_batch it is the micro-batch's summed
            # loss over the global batch's targets, as the HF Trainer passes it (transformers >= 4.46).
            loss = self.model(**model_inputs(self.model, batch), labels=batch["labels"],
                              num_items_in_batch=targets).loss
            loss.backward()
            loss_sum += loss.detach()
        trainable = [p for p in self.model.parameters() if p.grad is not None]
        # The HF Trainer under the reference clips at its default max_grad_norm 1.0.
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)  # frozen layers then have no gradient and are skipped
        state_bytes = optimizer_state_bytes(self.optimizer)
        peak = metrics.peak_memory_bytes(self.memory_baseline)
        step_time = time.perf_counter() - start
        tokens = data.token_count(rows)
        return {"step": step + 1, "loss": float(loss_sum), "lr": lr, "grad_norm": float(grad_norm),
                "tokens": tokens, "tokens_per_s": tokens / step_time, "step_time_s": step_time,
                "optimizer_state_bytes": state_bytes, "peak_memory_bytes": int(peak),
                "active_layers": list(self.switcher.active)}

    def train(self) -> None:
        import math

        from tqdm import tqdm

        from owlore_ds import metrics

        cfg = self.cfg
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, PEER_RUN), "w") as fh:
            json.dump(self.ran, fh, indent=1)
        log_file = metrics.MetricsLog(cfg.output_dir, cfg.report_to, self.ran, resume_step=0)  # a fresh file
        progress = tqdm(total=self.total_steps, desc=f"peer {self.kind}", dynamic_ncols=True)
        for step in range(self.total_steps):
            record = self.train_step(step)
            if not math.isfinite(record["loss"]):
                raise RuntimeError(f"loss is {record['loss']} at step {record['step']}")
            log_file.write(record)
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.4f}")
            if record["step"] % cfg.logging_steps == 0 or record["step"] == self.total_steps:
                progress.write(metrics.format_console(record, self.total_steps))
        progress.close()
        log_file.close()


PEER_RUN = "peer_run.json"  # what the peer ran (ran_config), beside metrics.jsonl


def main() -> None:
    from owlore_ds.distributed import select_accelerator

    select_accelerator()
    cfg, kind = parse()
    Peer(cfg, kind).train()


if __name__ == "__main__":
    run_main(main)
