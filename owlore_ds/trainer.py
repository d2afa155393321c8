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

from owlore_ds import checkpoint, distributed as dist, ds_config, methods, metrics, preemption
from owlore_ds.config import TrainConfig
from owlore_ds.errors import RunFailure, UserInputError
from owlore_ds.data import GlobalBatches, StreamingBatches, TrainingData, load_training_data
from owlore_ds.layer_sampling import outlier_ratios
from owlore_ds.modeling import check_block_size, check_document_attention, load_model, load_tokenizer, read_model_config

log = logging.getLogger("owlore_ds")


class Trainer:
    def __init__(self, cfg: TrainConfig):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        self.cfg = cfg
        self.world = dist.world_size()
        self.rank = dist.rank()
        self.device = torch.device(get_accelerator().current_device_name())

        # Everything that can fail on bad input is checked before OUT is touched.
        self.model_config = read_model_config(cfg.model_name_or_path)
        check_block_size(self.model_config, cfg.block_size, cfg.model_name_or_path)
        metrics.check_reporter(cfg.report_to)
        self.ds_config = ds_config.fill(ds_config.read(cfg.deepspeed), cfg, self.world, self.model_config.hidden_size)
        self.tokenizer = load_tokenizer(cfg.model_name_or_path)
        if cfg.packing or cfg.packing_attention == "document":
            check_document_attention(self.model_config, cfg.block_size,
                                     "--packing" if cfg.packing else "--packing_attention document",
                                     cfg.attn_implementation)
        self.global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * self.world
        self.stream: Optional[StreamingBatches] = None  # --streaming: the batches, read in step order
        if cfg.streaming:
            self.stream = StreamingBatches(cfg.dataset_path, cfg.text_key, self.tokenizer, cfg.block_size,
                                           self.model_config.vocab_size, self.global_batch, cfg.seed,
                                           shuffle=not cfg.no_shuffle, chunk_windows=cfg.streaming_shuffle_windows,
                                           document_attention=cfg.packing_attention == "document")
            self.batches: GlobalBatches | StreamingBatches = self.stream
            self.data: TrainingData = self.stream.data
        else:
            self.data = load_training_data(
                cfg.dataset_path, self.tokenizer, cfg.model_name_or_path, cfg.block_size, cfg.cache_dir,
                self.model_config.vocab_size, packing=cfg.packing, packing_attention=cfg.packing_attention)
            # Indexed data brings a sample_index: its shuffles are built once, kept beside it and memory-mapped.
            self.batches = GlobalBatches(len(self.data), self.global_batch, cfg.seed, shuffle=not cfg.no_shuffle,
                                         sample_index=self.data.sample_index)
        self.total_steps = cfg.total_steps(self.batches.steps_per_epoch)
        self.resume_path = checkpoint.resolve_resume(cfg, self.global_batch)
        self.resume_state = checkpoint.read_trainer_state(self.resume_path) if self.resume_path else None
        if self.stream is not None:
            # The stream position is global (not per rank): a run resumes on any number of ranks.
            if self.resume_state is not None and "stream" not in self.resume_state:
                raise UserInputError(f"{self.resume_path}: written by a run without --streaming (no stream position)")
            self.stream.start(self.resume_state["stream"] if self.resume_state else None,
                               int(self.resume_state["global_step"]) if self.resume_state else 0)
        family = methods.family(cfg)
        self.ds_config = family.engine_config(self.ds_config, cfg, cfg.deepspeed or "the default DeepSpeed config",
                                              self.resume_state)

        self.memory_baseline = metrics.memory_baseline_bytes()
        deepspeed.runtime.utils.set_random_seed(cfg.seed)
        # Under ZeRO-3 this makes from_pretrained partition the weights as they load.
        from transformers.integrations import HfDeepSpeedConfig

        self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        model = load_model(cfg.model_name_or_path, cfg.precision, cfg.gradient_checkpointing, cfg.attn_implementation)
        ratios = None
        if cfg.layerwise and cfg.method != "galore" and cfg.prob_mode in ("owl", "owl_reverse"):
            ratios = outlier_ratios(cfg, model, self.data)
        self.method = family(cfg, self.world, self.device)
        self.method.build(model, self.ds_config, self.total_steps, ratios)
        self.step = 0
        if self.resume_path:
            self.method.load(self.resume_path, self.resume_state)
            self.step = int(self.resume_state["global_step"])
            log.info("resumed from %s at step %d", self.resume_path, self.step)
        # from_pretrained returns the model in eval mode, where Hugging Face's decoder layers skip
        # gradient checkpointing (GradientCheckpointingLayer checks self.training) and dropout
        # (--lora_dropout) is the identity; the HF Trainer trains in train mode, and so do we.
        self.method.engine.train()
        metrics.start_peak_window(self.method.engine.module)
        log.info("%d rank(s), global batch %d, %d steps, method %s, ZeRO stage %d", self.world, self.global_batch,
                 self.total_steps, cfg.method, ds_config.zero_stage(self.ds_config))

    # ------------------------------------------------------------------ one step

    def _micro_batch(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return {key: value.to(self.device) for key, value in self.data.batch(rows).items()}

    def train_step(self) -> dict[str, Any]:
        cfg = self.cfg
        start = time.perf_counter()
        self.method.begin_step(self.step)
        rows = self.batches.rows(self.step)
        targets = self.data.target_count(rows)
        lr = self.method.scheduler.get_last_lr()[0]  # the rate this step's update uses
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for micro_step in range(cfg.gradient_accumulation_steps):
            micro = GlobalBatches.micro_rows(rows, micro_step, self.rank, self.world, cfg.per_device_train_batch_size)
            loss_sum += self.method.micro_step(self._micro_batch(micro), targets)
        self.method.finish_step()
        self.step += 1
        grad_norm = self.method.grad_norm()
        on_device, offloaded = self.method.state_bytes()
        extra = self.method.step_metrics()
        per_rank = [k for k, v in extra.items() if isinstance(v, (int, float))]  # logged as the largest
        (total_loss,) = dist.all_reduce([float(loss_sum)])
        peak, state_bytes, offloaded, *largest = dist.all_reduce(
            [metrics.peak_memory_bytes(self.memory_baseline), on_device, offloaded] + [float(extra[k]) for k in per_rank],
            op="max")
        step_time = time.perf_counter() - start
        tokens = self.data.token_count(rows)
        record = {
            "step": self.step, "loss": total_loss / targets, "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens": tokens, "tokens_per_s": tokens / step_time, "step_time_s": step_time,
            "optimizer_state_bytes": int(state_bytes), "peak_memory_bytes": int(peak),
        }
        if offloaded:
            record["offloaded_state_bytes"] = int(offloaded)
        record.update(extra)
        record.update({k: int(v) if isinstance(extra[k], int) else v for k, v in zip(per_rank, largest)})
        return record

    # ------------------------------------------------------------------ loop

    def trainer_state(self) -> dict[str, Any]:
        return {"global_step": self.step, "epoch": self.batches.epoch_of(max(self.step - 1, 0)),
                "world_size": self.world, "zero_stage": ds_config.zero_stage(self.ds_config),
                "precision": self.cfg.precision, "total_steps": self.total_steps,
                "run_identity": checkpoint.run_identity(self.cfg, self.global_batch), **self.method.trainer_state(),
                **({"stream": self.stream.state()} if self.stream is not None else {})}

    def save(self) -> str:
        return checkpoint.save(self.step, self.cfg, self.trainer_state(), self.model_config, self.tokenizer,
                               write=self.method.save)

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
        """Every rank writes its share of the output shards (shard k by rank k % N), so no rank
        exports the model while the others wait; rank 0 makes the folder before and adds
        config and tokenizer and renames it after. A failure anywhere fails every rank."""
        import shutil

        from owlore_ds import export
        from owlore_ds.modeling import DTYPES

        destination = os.path.join(self.cfg.output_dir, "final")
        what = f"exporting {destination}"
        tmp = dist.broadcast_object(dist.on_main(lambda: export.begin_export(destination, overwrite=True), what))
        failure: Optional[Exception] = None
        try:
            state, dtype, sources = export.plan_export(final_checkpoint)
            export.write_weights(sources, tmp, DTYPES[dtype], export.parse_size(self.cfg.export_max_shard_size,
                                                                                "--export_max_shard_size"),
                                 share=(self.rank, self.world))
        except Exception as exc:
            failure = exc
        if not dist.all_agree(failure is None):
            reasons = dist.all_gather_object(
                None if failure is None else str(failure).strip().splitlines()[-1:] or [type(failure).__name__])
            if dist.is_main():
                shutil.rmtree(tmp, ignore_errors=True)
            rank, reason = next((r, text) for r, text in enumerate(reasons) if text is not None)
            raise failure or RunFailure(f"{what} failed on rank {rank}: {' '.join(reason)}")
        dist.on_main(lambda: export.finish_export(final_checkpoint, state, dtype, tmp, destination, overwrite=True),
                     what)
        log.info("wrote the Hugging Face model to %s", destination)
        return destination


def run(cfg: TrainConfig) -> None:
    dist.init(cfg.ddp_timeout)
    try:
        Trainer(cfg).train()
    finally:
        dist.shutdown()
