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
from owlore_ds.outliers import (calibration_sha256, compute_layer_outlier_ratios, model_difference, model_fingerprint,
                                read_ratio_file, save_ratios, settings_difference)
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


# The flags behind each setting a ratio file records.
_FLAGS = {"threshold_m": "--owl_threshold_m", "nsamples": "--owl_nsamples", "seqlen": "--owl_seqlen"}


def outlier_ratios(cfg: TrainConfig, model: torch.nn.Module, data: TrainingData) -> list[float]:
    """The OWL ratios for this model: from --outlier_ratios, OUT's cache, or computed now and cached.

    A cache is reused only when it was made for this model (fingerprint) with this run's
    settings: M, the number and length of the calibration windows and their tokens (a hash,
    which covers the data, the seed and the window choice); otherwise, and always with
    --overwrite_output_dir, the ratios are computed again and the cache replaced.

    Computed by every rank together: each runs its share of the calibration windows
    through the model one layer at a time (under ZeRO-3 each layer is gathered in turn)
    and the activation energies are summed over ranks, so no rank waits on another.
    """
    # Every rank fingerprints the model (under ZeRO-3 the three hashed tensors are gathered
    # one at a time, a collective), so all of them take part before rank 0 decides.
    fingerprint = model_fingerprint(model, _gathered)
    if cfg.outlier_ratios:
        return _given_ratios(cfg, fingerprint)
    settings = cfg.owl_settings()
    windows = calibration_windows(data, settings["nsamples"], settings["seqlen"], cfg.seed, sequential=False)
    settings.update(nsamples=windows.shape[0], calibration_sha256=calibration_sha256(windows))
    path = os.path.join(cfg.output_dir, RATIOS_FILE)
    # Rank 0 decides and hands out the cached ratios: another rank could see the file while
    # rank 0 replaces it (or, with OUT not shared, see another file).
    reason, cached = dist.broadcast_object(
        _cache_verdict(path, settings, fingerprint, cfg.overwrite_output_dir) if dist.is_main() else None)
    if reason is None:
        log.info("outlier ratios: reusing %s (same model, threshold, calibration windows and data)", path)
        return cached
    from deepspeed.accelerator import get_accelerator

    mine = windows[dist.rank() :: dist.world_size()]
    log.info("computing outlier ratios (%s) on %d windows of %d tokens (%d on this rank)", reason, windows.shape[0],
             settings["seqlen"], mine.shape[0])
    partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
    # Replicated weights: one layer at a time on the accelerator (minutes for 7B, not hours
    # on the CPU). Partitioned ones are gathered onto it by DeepSpeed.
    device = None if partitioned else get_accelerator().current_device_name()
    ratios = compute_layer_outlier_ratios(model, mine, settings["threshold_m"], device=device,
                                          nsamples=windows.shape[0], sum_over_ranks=_sum_over_ranks,
                                          gathered=_gathered)
    # The energies were summed over ranks, so every rank holds the same ratios; rank 0 writes them.
    dist.on_main(lambda: save_ratios(path, ratios, fingerprint, settings["threshold_m"], settings["nsamples"],
                                     settings["seqlen"], settings["calibration_sha256"]), f"writing {path}")
    return ratios


def _cache_verdict(path: str, settings: dict, fingerprint: dict,
                   overwrite: bool) -> tuple[Optional[str], Optional[list[float]]]:
    """(why the cache at `path` must be computed again, None) or (None, its ratios)."""
    if overwrite:
        return "--overwrite_output_dir", None
    if not os.path.isfile(path):
        return f"no {RATIOS_FILE} in the output dir yet", None
    try:
        data = read_ratio_file(path)
    except (OSError, ValueError) as exc:
        return f"unreadable: {exc}", None
    difference = model_difference(data, fingerprint)
    if difference:
        return f"{path} was {difference}", None
    mismatch = settings_difference(data, settings, absent_ok=False)
    if mismatch:
        key, recorded, value = mismatch
        if key not in data:  # written by an earlier version
            return f"{path} does not record its {key}", None
        return f"{path} was made with {key} {recorded!r}, this run uses {value!r}", None
    return None, [float(r) for r in data["ratios"]]


def _given_ratios(cfg: TrainConfig, fingerprint: dict) -> list[float]:
    """The ratios of --outlier_ratios FILE, refused when made for another model or with a
    setting that this run's command line gives otherwise. The calibration data are not compared
    (OWL calibrates on another corpus than the one trained on), nor settings the file omits or
    the user did not give: the file's own settings are what it was made with."""
    path = cfg.outlier_ratios
    try:
        data = read_ratio_file(path)
    except (OSError, ValueError) as exc:
        raise UserInputError(str(exc)) from None
    difference = model_difference(data, fingerprint)
    if difference:
        raise UserInputError(f"--outlier_ratios {path}: {difference}; recompute the ratios for this model")
    given = {key: getattr(cfg, flag[2:]) for key, flag in _FLAGS.items() if getattr(cfg, flag[2:]) is not None}
    mismatch = settings_difference(data, given, absent_ok=True)
    if mismatch:
        key, recorded, value = mismatch
        raise UserInputError(f"--outlier_ratios {path}: made with {key} {recorded!r}, but this run gives "
                             f"{_FLAGS[key]} {value!r}; recompute the file with these settings or drop {_FLAGS[key]}")
    return [float(r) for r in data["ratios"]]


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
