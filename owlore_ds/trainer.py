"""The training loop: thin glue over config, data, model, DeepSpeed engine, checkpoints and metrics.

Loss normalization: each micro-batch contributes (sum of token losses) / (loss-bearing
tokens in the whole global batch). The gradient of a step is therefore the gradient of
the global-batch mean loss, whatever the split over ranks and micro-batches, which is
what makes a 1-rank and a 2-rank run with the same global batch train identically.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional

import torch

from owlore_ds import checkpoint, distributed as dist, ds_config, metrics, preemption
from owlore_ds.config import TrainConfig
from owlore_ds.data import GlobalBatches, TokenizedData, load_training_data
from owlore_ds.layer_sampling import ActiveLayers, outlier_ratios
from owlore_ds.modeling import causal_lm_loss_sum, check_block_size, load_model, load_tokenizer, read_model_config
from owlore_ds.lora import add_adapters, lora_settings
from owlore_ds.optim import build_fused_optimizer, build_optimizer, build_scheduler, held_state_bytes, model_storages

log = logging.getLogger("owlore_ds")


class Trainer:
    def __init__(self, cfg: TrainConfig):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        self.cfg = cfg
        self.world = dist.world_size()
        self.rank = dist.rank()
        self.device = torch.device(get_accelerator().current_device_name())
        self.device_type = get_accelerator().device_name()

        # Everything that can fail on bad input is checked before OUT is touched.
        self.model_config = read_model_config(cfg.model_name_or_path)
        check_block_size(self.model_config, cfg.block_size, cfg.model_name_or_path)
        metrics.check_reporter(cfg.report_to)
        self.ds_config = ds_config.fill(ds_config.read(cfg.deepspeed), cfg, self.world, self.model_config.hidden_size)
        self.tokenizer = load_tokenizer(cfg.model_name_or_path)
        self.data: TokenizedData = load_training_data(
            cfg.dataset_path, self.tokenizer, cfg.model_name_or_path, cfg.block_size, cfg.cache_dir,
            self.model_config.vocab_size)
        self.global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * self.world
        self.batches = GlobalBatches(len(self.data), self.global_batch, cfg.seed, shuffle=not cfg.no_shuffle)
        self.total_steps = cfg.total_steps(self.batches.steps_per_epoch)
        self.resume_path = checkpoint.resolve_resume(cfg, self.global_batch)
        self.resume_state = checkpoint.read_trainer_state(self.resume_path) if self.resume_path else None
        if self.resume_state and checkpoint.needs_universal(self.resume_state, self.world):
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
        source = cfg.deepspeed or "the default DeepSpeed config"
        if cfg.layerwise:
            self.ds_config = ds_config.for_layerwise(self.ds_config, source)
        elif cfg.fused:
            self.ds_config = ds_config.for_fused(self.ds_config, source, cfg.method)

        self.memory_baseline = metrics.memory_baseline_bytes()
        deepspeed.runtime.utils.set_random_seed(cfg.seed)
        # Under ZeRO-3 this makes from_pretrained partition the weights as they load.
        from transformers.integrations import HfDeepSpeedConfig

        self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        model = load_model(cfg.model_name_or_path, cfg.precision, cfg.gradient_checkpointing)
        if cfg.method == "lora":
            model = add_adapters(model, lora_settings(cfg))
        ratios = None
        if cfg.layerwise and cfg.method != "galore" and cfg.prob_mode in ("owl", "owl_reverse"):
            ratios = outlier_ratios(cfg, model, self.data)
        if cfg.fused:
            self.engine, self.optimizer, self.scheduler = self._fused_engine(deepspeed, model)
        else:
            optimizer = build_optimizer(model, cfg, offload=ds_config.offloads_optimizer(self.ds_config))
            scheduler = build_scheduler(optimizer, cfg, self.total_steps)
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config)
        self.weight_storages = model_storages(self.engine.module)  # excluded from optimizer_state_bytes
        self.active_layers: Optional[ActiveLayers] = None
        if cfg.layerwise:
            self.engine.enable_backward_allreduce = False  # the layerwise optimizer reduces to owners
            self.active_layers = ActiveLayers(cfg, optimizer, ratios)
        self.step = 0
        if self.resume_path:
            if cfg.fused:
                self._load_fused(self.resume_path)
            else:
                checkpoint.load(self.engine, self.resume_path, self.resume_state, self.world)
            if self.active_layers:
                self.active_layers.restore(self.resume_state["layerwise"],
                                           checkpoint.load_rank_states(self.resume_path, self.resume_state))
            self.step = int(self.resume_state["global_step"])
            log.info("resumed from %s at step %d", self.resume_path, self.step)
        metrics.start_peak_window(self.engine.module)
        log.info("%d rank(s), global batch %d, %d steps, method %s, ZeRO stage %d", self.world, self.global_batch,
                 self.total_steps, cfg.method, ds_config.zero_stage(self.ds_config))

    # ------------------------------------------------------------------ lomo / adalomo

    def _fused_engine(self, deepspeed, model):
        """An engine with no DeepSpeed optimizer, and the fused update on its module.

        DeepSpeed 0.19's engine.forward/backward/step assume an optimizer (its backward
        hooks call into one), so these methods run the module directly: the engine still
        partitions the weights under ZeRO-3 and fetches them in forward and backward, and
        after each backward the parameters its hooks missed are released, as its own
        optimizer would do.
        """
        engine, _, _, _ = deepspeed.initialize(model=model, config=self.ds_config)
        zero3 = ds_config.zero_stage(self.ds_config) == 3

        def release_gathered() -> None:
            engine.optimizer.get_param_coordinator().release_and_reset_all(engine.module)

        optimizer = build_fused_optimizer(engine.module, self.cfg, zero3, self.device,
                                          after_backward=release_gathered if zero3 else None)
        return engine, optimizer, build_scheduler(optimizer, self.cfg, self.total_steps)

    def _save_fused(self, directory: str) -> None:
        checkpoint.save_full_weights(self.engine.module, directory)
        if dist.is_main():
            torch.save({"optimizer": self.optimizer.checkpoint_state(), "scheduler": self.scheduler.state_dict()},
                       os.path.join(directory, checkpoint.FUSED_STATE))

    def _load_fused(self, path: str) -> None:
        checkpoint.load_full_weights(self.engine.module, path)
        saved = torch.load(os.path.join(path, checkpoint.FUSED_STATE), map_location="cpu", weights_only=True)
        self.optimizer.load_checkpoint_state(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        checkpoint.restore_rng(path)

    def _fused_step(self, batch: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        """One lomo/adalomo step: with clipping, LOMO's extra forward and backward that only measure the norm."""
        if self.cfg.max_grad_norm > 0:
            self.optimizer.measure_norm(self._loss(batch) * scale)
        loss = self._loss(batch)
        self.optimizer.fused_backward(loss * scale)
        self.optimizer.step()  # a no-op that keeps the scheduler's order check quiet
        self.scheduler.step()
        return loss

    # ------------------------------------------------------------------ one step

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        forward = self.engine.module if self.cfg.fused else self.engine  # see _fused_engine
        logits = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return causal_lm_loss_sum(logits, batch["labels"])

    def _micro_batch(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data.input_ids[rows].to(self.device),
                "attention_mask": self.data.attention_mask[rows].to(self.device),
                "labels": self.data.labels[rows].to(self.device)}

    def train_step(self) -> dict[str, Any]:
        cfg = self.cfg
        start = time.perf_counter()
        if self.active_layers:
            self.active_layers.before_step(self.step)
        rows = self.batches.rows(self.step)
        targets = self.data.target_count(rows)
        # DeepSpeed divides by the accumulation steps and averages over ranks; undo both
        # so that the summed gradient is that of the global-batch mean.
        scale = self.world * cfg.gradient_accumulation_steps / targets
        lr = self.scheduler.get_last_lr()[0]  # the rate this step's update uses
        loss_sum = 0.0
        for micro_step in range(cfg.gradient_accumulation_steps):
            micro = GlobalBatches.micro_rows(rows, micro_step, self.rank, self.world, cfg.per_device_train_batch_size)
            batch = self._micro_batch(micro)
            if cfg.fused:
                micro_loss = self._fused_step(batch, scale)
            else:
                micro_loss = self._loss(batch)
                self.engine.backward(micro_loss * scale)
                self.engine.step()
            loss_sum += micro_loss.item()
        self.step += 1
        own_norm = self.active_layers or cfg.fused  # the optimizer, not the engine, clipped
        grad_norm = self.optimizer.global_grad_norm if own_norm else self.engine.get_global_grad_norm()
        on_device, offloaded = held_state_bytes(self.optimizer, self.weight_storages, self.device_type)
        (total_loss,) = dist.all_reduce([loss_sum])
        peak, state_bytes, offloaded = dist.all_reduce(
            [metrics.peak_memory_bytes(self.memory_baseline), on_device, offloaded], op="max")
        step_time = time.perf_counter() - start
        tokens = int(self.data.attention_mask[rows].sum())
        record = {
            "step": self.step, "loss": total_loss / targets, "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens": tokens, "tokens_per_s": tokens / step_time, "step_time_s": step_time,
            "optimizer_state_bytes": int(state_bytes), "peak_memory_bytes": int(peak),
        }
        if offloaded:
            record["offloaded_state_bytes"] = int(offloaded)
        if self.active_layers:
            record["active_layers"] = list(self.optimizer.active)
        return record

    # ------------------------------------------------------------------ loop

    def trainer_state(self) -> dict[str, Any]:
        state = {"global_step": self.step, "epoch": self.batches.epoch_of(max(self.step - 1, 0)),
                 "world_size": self.world, "zero_stage": ds_config.zero_stage(self.ds_config),
                 "precision": self.cfg.precision, "total_steps": self.total_steps,
                 "run_identity": checkpoint.run_identity(self.cfg, self.global_batch)}
        if self.active_layers:
            state["layerwise"] = self.active_layers.state()
        if self.cfg.fused:
            state["fused"] = True
        if self.cfg.method == "lora":
            state["lora"] = lora_settings(self.cfg)
        return state

    def save(self) -> str:
        rank_state = self.optimizer.rank_state() if self.active_layers else None
        return checkpoint.save(self.engine, self.step, self.cfg, self.trainer_state(), self.model_config,
                               self.tokenizer, rank_state, write_model=self._save_fused if self.cfg.fused else None)

    def train(self) -> Optional[str]:
        """Trains to the end; returns the path of the exported Hugging Face folder."""
        from tqdm import tqdm

        cfg = self.cfg
        identity = checkpoint.run_identity(cfg, self.global_batch)
        checkpoint.prepare_output_dir(cfg, identity, resuming=self.resume_path is not None)
        log_file = metrics.MetricsLog(cfg.output_dir, cfg.report_to, cfg.to_dict(), self.step) if dist.is_main() else None
        progress = tqdm(total=self.total_steps, initial=self.step, disable=not dist.is_main(), desc="train",
                        dynamic_ncols=True)
        last_saved = self.step if self.resume_path else None
        watch = preemption.PreemptionWatch()
        while self.step < self.total_steps:
            record = self.train_step()
            if not torch.isfinite(torch.tensor(record["loss"])):
                raise RuntimeError(f"loss is {record['loss']} at step {self.step}; stopping before it reaches a checkpoint")
            if log_file:
                log_file.write(record)
                progress.update(1)
                progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                if self.step % cfg.logging_steps == 0 or self.step == self.total_steps:
                    progress.write(metrics.format_console(record, self.total_steps))
            if cfg.save_steps and self.step % cfg.save_steps == 0:
                self.save()
                last_saved = self.step
            if watch.requested():  # SIGTERM/SIGUSR1 on any rank: save this step and exit (every rank)
                if last_saved != self.step:
                    self.save()
                watch.stop(self.step)
        watch.close()
        progress.close()
        if log_file:
            log_file.close()
        final_checkpoint = self.save() if last_saved != self.step else os.path.join(cfg.output_dir, f"checkpoint-{self.step}")
        return self.export_final(final_checkpoint)

    def export_final(self, final_checkpoint: str) -> Optional[str]:
        destination = os.path.join(self.cfg.output_dir, "final")
        from owlore_ds.export import export_checkpoint

        # Rank 0 exports; a failure there fails every rank at once, not at --ddp_timeout.
        dist.on_main(lambda: export_checkpoint(final_checkpoint, destination, overwrite=True), f"exporting {destination}")
        log.info("wrote the Hugging Face model to %s", destination)
        return destination


def run(cfg: TrainConfig) -> None:
    dist.init(cfg.ddp_timeout)
    try:
        Trainer(cfg).train()
    finally:
        dist.shutdown()
