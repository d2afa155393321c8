#!/usr/bin/env python
"""The OwLore reference pipeline, rebuilt from its public description, as the benchmark's peer.

    python tools/peer_owlore.py --model_name_or_path DIR --dataset_path PATH --output_dir OUT \
        --bf16 --block_size 512 --per_device_train_batch_size 1 --max_steps 100 --learning_rate 5e-5 \
        --lisa_activated_layers 5 --lisa_interval_steps 50 [--outlier_ratios ratios.json] \
        --galore_rank 256 --galore_update_proj_gap 100 --galore_scale 1.0 --galore_proj_type std \
        [--gradient_checkpointing]

What the reference does (DESIGN.md 1.3-1.4), and so what this does:

- one process, a plain PyTorch loop, no DeepSpeed engine;
- a pure bf16 model (no master weights): the optimizer updates the bf16 weights;
- one `galore_torch.GaLoreAdamW` with two groups: every 2-D matrix of the decoder layers
  under GaLore, everything else (norms, embeddings, lm_head) as plain AdamW;
- a LISA-style callback: every K steps all decoder layers get `requires_grad=False`, then
  gamma layers drawn with numpy (OWL probabilities from --outlier_ratios, else uniform)
  get `requires_grad=True`. Gradients are set to None between steps, so GaLoreAdamW skips
  the frozen layers, but their optimizer state stays: the state of every layer ever
  visited is kept (the reference's defect, LMFlow issues 729, 768, 778).

It reads the trainer's flags (same names, same validation), its data and batches
(owlore_ds.data) and writes metrics.jsonl with the trainer's fields, the memory figures
measured the same way (owlore_ds.metrics), so the two compare row for row. Flags for
features the reference does not have are refused.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from owlore_ds.cli import run_main  # noqa: E402

log = logging.getLogger("peer_owlore")

# Trainer options the reference pipeline has no counterpart for: giving one is an error,
# so that a comparison never silently runs with a setting the peer ignored.
UNSUPPORTED = ("method", "deepspeed", "resume_from_checkpoint", "master_weights", "inactive_state", "galore_svd",
               "galore_svd_signs", "galore_spread_refreshes", "freeze_embeddings")


def check_supported(cfg) -> None:
    from owlore_ds.config import TrainConfig
    from owlore_ds.errors import UserInputError

    defaults = TrainConfig()
    for name in UNSUPPORTED:
        if getattr(cfg, name) != getattr(defaults, name):
            raise UserInputError(f"--{name}: not part of the reference pipeline that tools/peer_owlore.py rebuilds")


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


def build_optimizer(model, cfg):
    """GaLoreAdamW over the decoder layers' 2-D matrices, the rest as its plain-AdamW group (as the reference)."""
    from galore_torch import GaLoreAdamW

    from owlore_ds.layer_sampling import split_parameters

    per_layer, always = split_parameters(model, freeze_embeddings=False)
    layer_params = [p for layer in per_layer for _, p in layer]
    galore_params = [p for p in layer_params if p.dim() == 2]
    regular = [p for p in layer_params if p.dim() != 2] + [p for _, p in always]
    groups = [{"params": regular},
              {"params": galore_params, "rank": cfg.galore_rank, "update_proj_gap": cfg.galore_update_proj_gap,
               "scale": cfg.galore_scale, "proj_type": cfg.galore_proj_type}]
    return GaLoreAdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                       weight_decay=cfg.weight_decay, no_deprecation_warning=True)


class Peer:
    """The reference's training loop: model, optimizer, layer switcher and data, one step at a time."""

    def __init__(self, cfg):
        import torch
        from deepspeed.accelerator import get_accelerator

        from owlore_ds import metrics
        from owlore_ds.data import GlobalBatches, load_training_data
        from owlore_ds.modeling import check_block_size, load_model, load_tokenizer, read_model_config
        from owlore_ds.optim import build_scheduler
        from owlore_ds.outliers import _decoder

        check_supported(cfg)
        self.cfg = cfg
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
        # The reference loads the model in bf16 and trains it as is: pure bf16, no master copy.
        self.model = load_model(cfg.model_name_or_path, cfg.precision, cfg.gradient_checkpointing).to(self.device)
        self.model.train()
        self.switcher = LayerSwitcher(list(_decoder(self.model).layers), cfg.lisa_activated_layers,
                                      cfg.lisa_interval_steps, layer_probabilities_for(cfg, self.model), cfg.seed)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)
        metrics.start_peak_window(self.model)
        log.info("peer: %d steps, global batch %d, %d of %d layers every %d steps, GaLore rank %d gap %d",
                 self.total_steps, self.global_batch, self.switcher.num_active, len(self.switcher.layers),
                 cfg.lisa_interval_steps, cfg.galore_rank, cfg.galore_update_proj_gap)

    def train_step(self, step: int) -> dict[str, Any]:
        """Optimizer step `step` (from 0); returns its metrics.jsonl record."""
        import torch

        from owlore_ds import metrics
        from owlore_ds.data import GlobalBatches
        from owlore_ds.modeling import causal_lm_loss_sum

        cfg, data = self.cfg, self.data
        start = time.perf_counter()
        self.switcher.on_step_begin(step)
        rows = self.batches.rows(step)
        targets = data.target_count(rows)
        lr = self.scheduler.get_last_lr()[0]
        loss_sum = 0.0
        for micro_step in range(cfg.gradient_accumulation_steps):
            micro = GlobalBatches.micro_rows(rows, micro_step, 0, 1, cfg.per_device_train_batch_size)
            batch = {key: value.to(self.device) for key, value in data.batch(micro).items()}
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            micro_loss = causal_lm_loss_sum(logits, batch["labels"])
            (micro_loss / targets).backward()  # the gradient of the global-batch mean, as in the trainer
            loss_sum += micro_loss.item()
        trainable = [p for p in self.model.parameters() if p.grad is not None]
        # The Hugging Face Trainer under the reference clips by default (max_grad_norm 1.0).
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)  # frozen layers then have no gradient and are skipped
        state_bytes = optimizer_state_bytes(self.optimizer)
        peak = metrics.peak_memory_bytes(self.memory_baseline)
        step_time = time.perf_counter() - start
        tokens = data.token_count(rows)
        return {"step": step + 1, "loss": loss_sum / targets, "lr": lr, "grad_norm": float(grad_norm),
                "tokens": tokens, "tokens_per_s": tokens / step_time, "step_time_s": step_time,
                "optimizer_state_bytes": state_bytes, "peak_memory_bytes": int(peak),
                "active_layers": list(self.switcher.active)}

    def train(self) -> None:
        import math

        from tqdm import tqdm

        from owlore_ds import metrics

        cfg = self.cfg
        os.makedirs(cfg.output_dir, exist_ok=True)
        log_file = metrics.MetricsLog(cfg.output_dir, cfg.report_to, cfg.to_dict(), resume_step=0)  # a fresh file
        progress = tqdm(total=self.total_steps, desc="peer", dynamic_ncols=True)
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


def main() -> None:
    from owlore_ds.config import parse_args
    from owlore_ds.distributed import select_accelerator

    select_accelerator()
    Peer(parse_args()).train()


if __name__ == "__main__":
    run_main(main)
