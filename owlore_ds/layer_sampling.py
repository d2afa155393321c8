"""Which decoder layers train at each optimizer step, for lisa and owlore.

Interval k = step // K gets gamma layers drawn on rank 0 from a generator seeded by
(seed, k), broadcast and checked equal on every rank (owlore_ds/sampler.py). The
layers change only between optimizer steps, never inside gradient accumulation.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch

from owlore_ds import distributed as dist
from owlore_ds.config import TrainConfig
from owlore_ds.data import TrainingData, calibration_windows
from owlore_ds.errors import UserInputError
from owlore_ds.layerwise import LayerwiseOptimizer
from owlore_ds.outliers import compute_layer_outlier_ratios, load_ratios, model_fingerprint, save_ratios
from owlore_ds.sampler import LayerSampler, layer_probabilities

log = logging.getLogger(__name__)
RATIOS_FILE = "outlier_ratios.json"

Named = list[tuple[str, torch.nn.Parameter]]


def split_parameters(model: torch.nn.Module, freeze_embeddings: bool) -> tuple[list[Named], Named]:
    """(parameters of each decoder layer, parameters always trained: embeddings, final norm, lm_head)."""
    from owlore_ds.outliers import _decoder

    layers = _decoder(model).layers
    per_layer: list[Named] = [[] for _ in layers]
    owner_of = {id(p): index for index, layer in enumerate(layers) for p in layer.parameters()}
    always: Named = []
    embeddings = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
                  for p in m.parameters()}
    for name, p in model.named_parameters():
        if id(p) in owner_of:
            per_layer[owner_of[id(p)]].append((name, p))
        elif freeze_embeddings and id(p) in embeddings:
            p.requires_grad_(False)
        else:
            always.append((name, p))
    return per_layer, always


def _gathered(params: list[torch.nn.Parameter]):
    """Makes ZeRO-3 partitioned parameters whole on every rank for a moment (a no-op for others)."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    return GatheredParameters(params, modifier_rank=None)


def _sum_over_ranks(tensor: torch.Tensor) -> None:
    if dist.world_size() > 1:
        torch.distributed.all_reduce(tensor)


def outlier_ratios(cfg: TrainConfig, model: torch.nn.Module, data: TrainingData) -> list[float]:
    """The OWL ratios for this model: from --outlier_ratios, OUT's cache, or computed now and cached.

    Computed by every rank together: each runs its share of the calibration windows
    through the model one layer at a time (under ZeRO-3 each layer is gathered in turn)
    and the activation energies are summed over ranks, so no rank waits on another.
    """
    path = cfg.outlier_ratios or os.path.join(cfg.output_dir, RATIOS_FILE)
    # Rank 0 decides: another rank could see the file appear while rank 0 writes it.
    if dist.broadcast_object(cfg.outlier_ratios is None and not os.path.isfile(path)):
        from deepspeed.accelerator import get_accelerator

        seqlen = cfg.owl_seqlen or cfg.block_size
        windows = calibration_windows(data, cfg.owl_nsamples, seqlen, cfg.seed, sequential=False)
        mine = windows[dist.rank() :: dist.world_size()]
        log.info("computing outlier ratios on %d windows of %d tokens (%d on this rank)", windows.shape[0], seqlen,
                 mine.shape[0])
        partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
        # Replicated weights: one layer at a time on the accelerator (minutes for 7B, not hours
        # on the CPU). Partitioned ones are gathered onto it by DeepSpeed.
        device = None if partitioned else get_accelerator().current_device_name()
        ratios = compute_layer_outlier_ratios(model, mine, cfg.owl_threshold_m, device=device,
                                              nsamples=windows.shape[0], sum_over_ranks=_sum_over_ranks,
                                              gathered=_gathered)
        fingerprint = model_fingerprint(model, _gathered)
        if dist.is_main():
            save_ratios(path, ratios, fingerprint, cfg.owl_threshold_m, windows.shape[0], seqlen)
        dist.barrier()
    try:
        return load_ratios(path, model, _gathered)
    except ValueError as exc:
        raise UserInputError(str(exc)) from None


class ActiveLayers:
    """Applies the sampler's layers for each optimizer step to the optimizer."""

    def __init__(self, cfg: TrainConfig, optimizer: LayerwiseOptimizer, ratios: Optional[list[float]]):
        num_layers = len(optimizer.layers)
        self.optimizer = optimizer
        self.interval: Optional[int] = None
        if cfg.method == "galore":  # the GaLore baseline trains every layer
            self.sampler = None
            return
        probabilities = layer_probabilities(cfg.prob_mode, num_layers, ratios)
        try:
            self.sampler = LayerSampler(num_layers, min(cfg.lisa_activated_layers, num_layers),
                                        cfg.lisa_interval_steps, probabilities, cfg.seed)
        except ValueError as exc:
            raise UserInputError(f"--lisa_activated_layers/--lisa_prob_mode: {exc}") from None

    def before_step(self, step: int) -> None:
        interval = 0 if self.sampler is None else self.sampler.interval_index(step)
        if interval == self.interval:
            return
        if self.sampler is None:
            layers = list(range(len(self.optimizer.layers)))
        else:
            layers = self.sampler.synchronized_layers(interval)
        self.optimizer.set_active_layers(layers)
        self.interval = interval

    def state(self) -> dict[str, Any]:
        return {"interval": self.interval, **self.optimizer.global_state()}

    def restore(self, state: dict[str, Any], rank_states: list[dict[str, Any]]) -> None:
        self.optimizer.load(state, rank_states)
        self.interval = state["interval"]
