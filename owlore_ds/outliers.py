"""OWL layerwise outlier distribution (LOD), DESIGN.md 1.1.

For every decoder layer l the calibration batch is pushed through the model
one layer at a time. Each nn.Linear of the layer gets its input-feature energy
s_j = sum over tokens of x_j^2 / n_samples, its weights are scored
A = |W| * sqrt(s)[None, :], and the layer's outlier ratio is

    D_l = 100 * count(A > M * mean(A)) / numel(A)

with A concatenated over all linears of the layer (one threshold per layer).

Ratios are cached as JSON together with a fingerprint of the model, so a file
made for another model (even one with the same shape) is refused on load, and with
the settings that made them (M, the number and length of the calibration windows and a
hash of the windows' tokens), so a file made with other settings is not taken for them.
"""

import contextlib
import hashlib
import json
import math
import os
import tempfile
from typing import Any, Callable, ContextManager, Iterable, Optional

import torch
from torch import nn


def _decoder(model: nn.Module) -> nn.Module:
    """The module that owns `.layers` (LlamaModel inside LlamaForCausalLM, or the model itself)."""
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return inner
    if isinstance(getattr(model, "layers", None), nn.ModuleList):
        return model
    raise ValueError(f"{type(model).__name__}: no decoder layers found at model.model.layers")


def _module_device(module: nn.Module) -> torch.device | None:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return None


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


Gathered = Callable[[list[nn.Parameter]], ContextManager]


def _whole(params: Iterable[nn.Parameter]) -> ContextManager:
    """The default `gathered`: weights are whole already (not ZeRO-3 partitioned)."""
    return contextlib.nullcontext()


class _StopForward(ValueError):
    pass


class _Recorder(nn.Module):
    """Stands in for one decoder layer during the capture pass.

    Every layer is replaced, not only layer 0, because the per-layer kwargs can
    differ: Qwen2/Qwen3/Gemma pass a sliding-window mask to some layers and a
    full causal mask to others (and Gemma3 per-type rotary embeddings). The
    tensors are shared between layers, so recording all of them is cheap.
    """

    def __init__(self, layer: nn.Module, index: int, last: bool, records: list):
        super().__init__()
        self.layer = layer
        self.index = index
        self.last = last
        self.records = records

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            hidden, extra = args[0], args[1:]
        else:
            hidden, extra = kwargs.pop("hidden_states"), ()
        if extra:
            raise TypeError(f"decoder layer {self.index} got unexpected positional arguments; pass them as keywords")
        self.records[self.index] = (hidden, kwargs)
        if self.last:
            # Stop before the final norm / lm_head: nothing after the layers is needed.
            raise _StopForward
        return hidden

    def __getattr__(self, name: str) -> Any:
        # Some model loops read attributes of the layer (e.g. attention_type).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("layer"), name)


def _capture_layer_inputs(
    decoder: nn.Module, calibration_ids: torch.Tensor, batch_size: int, device: torch.device | None
) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Per batch: hidden states entering layer 0 and the kwargs every layer is called with."""
    layers = decoder.layers
    originals = list(layers)
    n = len(originals)
    hidden, kwargs = [], []
    records: list = [None] * n
    for i, layer in enumerate(originals):
        layers[i] = _Recorder(layer, i, i == n - 1, records)
    try:
        for start in range(0, calibration_ids.shape[0], batch_size):
            records[:] = [None] * n
            ids = calibration_ids[start : start + batch_size]
            try:
                decoder(input_ids=ids.to(device) if device is not None else ids, use_cache=False)
            except _StopForward:
                pass
            missing = [i for i, r in enumerate(records) if r is None]
            if missing:
                raise RuntimeError(f"the model forward never called decoder layers {missing}")
            hidden.append(records[0][0])
            kwargs.append([r[1] for r in records])
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return hidden, kwargs


@torch.no_grad()
def _layer_ratio(
    layer: nn.Module,
    hidden: list[torch.Tensor],
    layer_kwargs: list[dict],
    nsamples: int,
    threshold_m: float,
    device: torch.device | None,
    sum_over_ranks: Optional[Callable[[torch.Tensor], None]] = None,
    gathered: Gathered = _whole,
) -> float:
    """Runs one layer over all batches (replacing `hidden` in place by its outputs) and returns D_l.

    With `sum_over_ranks`, each rank ran its own share of the windows and the energies
    are summed over ranks before scoring, so every rank returns the same D_l."""
    linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(layer).__name__} has no nn.Linear to score")
    with gathered(list(layer.parameters())):
        return _gathered_layer_ratio(layer, linears, hidden, layer_kwargs, nsamples, threshold_m, device,
                                     sum_over_ranks)


def _gathered_layer_ratio(layer: nn.Module, linears: list[nn.Linear], hidden: list[torch.Tensor],
                          layer_kwargs: list[dict], nsamples: int, threshold_m: float, device: torch.device | None,
                          sum_over_ranks: Optional[Callable[[torch.Tensor], None]]) -> float:
    home = _module_device(layer)
    if device is not None:
        layer.to(device)
    run_device = device if device is not None else _module_device(layer)

    # Sum of squares over all tokens, divided once at the end: the same value as
    # Wanda's running rescale (s *= n/(n+b); s += |x|^2/(n+b)) without its
    # compounding rounding, so any batch size gives the same s (fp64 accumulators
    # make the summation order across batches irrelevant at fp32 precision).
    energy = {m: torch.zeros(m.in_features, dtype=torch.float64, device=m.weight.device) for m in linears}

    def hook(module: nn.Linear, args: tuple) -> None:
        x = args[0].detach().reshape(-1, module.in_features).float()
        energy[module] += x.pow(2).sum(0, dtype=torch.float64)

    handles = [m.register_forward_pre_hook(hook) for m in linears]
    try:
        for b in range(len(hidden)):
            out = layer(_to(hidden[b], run_device), **_to(layer_kwargs[b], run_device))
            if isinstance(out, (tuple, list)):  # older layer classes return (hidden, attn, ...)
                out = out[0]
            hidden[b] = out.to(hidden[b].device)
        if sum_over_ranks is not None:
            for m in linears:
                sum_over_ranks(energy[m])

        def scores(m: nn.Linear) -> torch.Tensor:
            s = (energy[m] / nsamples).float()
            return m.weight.detach().float().abs() * s.sqrt()[None, :]

        # Concatenating A over all linears of a 70B layer would need GBs, so the
        # mean and the count are taken linear by linear (A recomputed, it is cheap).
        total = sum(scores(m).sum(dtype=torch.float64) for m in linears)
        numel = sum(m.weight.numel() for m in linears)
        threshold = threshold_m * float(total) / numel
        count = sum(int((scores(m) > threshold).sum()) for m in linears)
    finally:
        for h in handles:
            h.remove()
        if device is not None and home is not None:
            layer.to(home)
    return 100.0 * count / numel


@torch.no_grad()
def compute_layer_outlier_ratios(
    model: nn.Module,
    calibration_ids: torch.LongTensor,
    threshold_m: float,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    nsamples: Optional[int] = None,
    sum_over_ranks: Optional[Callable[[torch.Tensor], None]] = None,
    gathered: Gathered = _whole,
) -> list[float]:
    """D_l (percent) for every decoder layer at model.model.layers.

    calibration_ids: [nsamples, seqlen] token windows (no padding).
    Split over ranks: each rank passes its share of the windows, `nsamples` the total,
    `sum_over_ranks` an in-place sum over ranks, and under ZeRO-3 `gathered` (DeepSpeed's
    GatheredParameters) makes one layer's weights whole at a time: every rank works on
    its windows and the model never has to fit on one device.
    device: if given, each layer is moved there only while it is scored (and the
    embeddings/rotary module for the capture pass), so a model that does not fit
    on the accelerator can still be scored; everything is moved back afterwards.
    The captured hidden states of all samples live on `device` (or the
    embedding's device): nsamples * seqlen * hidden_size values in model dtype.
    """
    if calibration_ids.dim() != 2 or (calibration_ids.shape[0] == 0 and sum_over_ranks is None):
        raise ValueError(f"calibration_ids must be [nsamples, seqlen], got shape {tuple(calibration_ids.shape)}")
    if not threshold_m > 0:
        raise ValueError(f"threshold_m must be > 0, got {threshold_m}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    decoder = _decoder(model)
    device = torch.device(device) if device is not None else None
    nsamples = nsamples or calibration_ids.shape[0]

    training = {m: m.training for m in model.modules()}
    model.eval()
    # Modules outside the layers (embeddings, rotary embedding, norm) are small:
    # move them all so the capture pass runs on `device`.
    moved = []
    if device is not None:
        for name, child in decoder.named_children():
            home = _module_device(child)
            if name != "layers" and home is not None and home != device:
                moved.append((child, home))
                child.to(device)
    try:
        capture_device = device if device is not None else _module_device(model.get_input_embeddings())
        outside = [p for name, child in decoder.named_children() if name != "layers" for p in child.parameters()]
        with gathered(outside):
            hidden, kwargs = _capture_layer_inputs(decoder, calibration_ids, batch_size, capture_device)
        return [
            _layer_ratio(layer, hidden, [kw[i] for kw in kwargs], nsamples, threshold_m, device, sum_over_ranks,
                         gathered)
            for i, layer in enumerate(decoder.layers)
        ]
    finally:
        for child, home in moved:
            child.to(home)
        for m, mode in training.items():
            m.training = mode


def _first_linear(layer: nn.Module) -> nn.Linear:
    for m in layer.modules():
        if isinstance(m, nn.Linear):
            return m
    raise ValueError(f"{type(layer).__name__} has no nn.Linear")


def model_fingerprint(model: nn.Module, gathered: Gathered = _whole) -> dict:
    """Architecture, size and a short hash of a few weights.

    Hashed: embeddings and the first Linear of the first and last layer, every
    k-th row so at most ~256 rows each (a different or fine-tuned model differs
    in every row). Values are rounded to bf16 first so the fingerprint of a
    checkpoint is the same whether it was loaded in fp32 or bf16. Needs full
    (not ZeRO-3 partitioned) weights.
    """
    config = model.config
    layers = _decoder(model).layers
    h = hashlib.sha256()
    for w in (model.get_input_embeddings().weight, _first_linear(layers[0]).weight, _first_linear(layers[-1]).weight):
        with gathered([w]):
            _hash_rows(h, w)
    return {
        "model_type": getattr(config, "model_type", None),
        "architectures": list(getattr(config, "architectures", None) or [type(model).__name__]),
        "num_layers": len(layers),
        "hidden_size": getattr(config, "hidden_size", None),
        "weights_sha256": h.hexdigest()[:16],
    }


def _hash_rows(h: Any, w: torch.Tensor) -> None:
    if w.numel() == 0:
        raise ValueError("model weights are empty (ZeRO-3 partitioned?); pass `gathered` to fingerprint them")
    rows = w.detach()[:: max(1, w.shape[0] // 256)]
    h.update(str(tuple(w.shape)).encode())
    h.update(rows.to("cpu", torch.bfloat16).float().contiguous().numpy().tobytes())


# What a ratio file records about how it was made, besides the model's fingerprint.
SETTINGS = ("threshold_m", "nsamples", "seqlen", "calibration_sha256")


def calibration_sha256(windows: torch.Tensor) -> str:
    """A short hash of the calibration windows' tokens (their shape included): the identity of
    the calibration data, window choice and seed. Cheap (nsamples x seqlen token ids)."""
    h = hashlib.sha256(str(tuple(windows.shape)).encode())
    h.update(windows.to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_ratios(
    path: str | os.PathLike,
    ratios: list[float],
    fingerprint: dict,
    threshold_m: float,
    nsamples: int,
    seqlen: int,
    calibration_sha256: Optional[str] = None,
) -> None:
    """Writes the ratio file atomically (a crashed or concurrent writer never leaves half a file)."""
    if len(ratios) != fingerprint.get("num_layers"):
        raise ValueError(f"{len(ratios)} ratios for a model with {fingerprint.get('num_layers')} layers")
    data = {
        "ratios": [float(r) for r in ratios],
        "threshold_m": float(threshold_m),
        "nsamples": int(nsamples),
        "seqlen": int(seqlen),
        "fingerprint": fingerprint,
    }
    if calibration_sha256 is not None:
        data["calibration_sha256"] = str(calibration_sha256)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".ratios-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def read_ratio_file(path: str | os.PathLike) -> dict:
    """The parsed ratio file, its form checked; ValueError naming the file otherwise.

    `ratios` and `fingerprint` are required; the settings (SETTINGS) may be absent (a file
    written by hand or by an earlier version), but when present they must be well-formed."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"outlier ratio file {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"outlier ratio file {path}: expected a JSON object")
    missing = [k for k in ("ratios", "fingerprint") if k not in data]
    if missing:
        raise ValueError(f"outlier ratio file {path}: missing keys {missing}")
    ratios = data["ratios"]
    if not isinstance(ratios, list) or not all(_is_number(r) and 0 <= r <= 100 for r in ratios):
        raise ValueError(f"outlier ratio file {path}: 'ratios' must be a list of percentages in [0, 100]")
    if not isinstance(data["fingerprint"], dict):
        raise ValueError(f"outlier ratio file {path}: 'fingerprint' must be an object")
    for key in ("threshold_m", "nsamples", "seqlen"):
        if key in data and not (_is_number(data[key]) and data[key] > 0):
            raise ValueError(f"outlier ratio file {path}: '{key}' must be a positive number, got {data[key]!r}")
    if "calibration_sha256" in data and not isinstance(data["calibration_sha256"], str):
        raise ValueError(f"outlier ratio file {path}: 'calibration_sha256' must be a string")
    return data


def model_difference(data: dict, fingerprint: dict) -> Optional[str]:
    """Why the parsed ratio file `data` is not for the model of `fingerprint`, or None."""
    if len(data["ratios"]) != fingerprint["num_layers"]:
        return f"has {len(data['ratios'])} layer ratios but the model has {fingerprint['num_layers']} layers"
    found = data["fingerprint"]
    diff = [f"{k} file={found.get(k)!r} model={v!r}" for k, v in fingerprint.items() if found.get(k) != v]
    if diff:
        return f"made for a different model (fingerprint mismatch: {'; '.join(diff)})"
    return None


def settings_difference(data: dict, settings: dict, absent_ok: bool) -> Optional[tuple[str, Any, Any]]:
    """The first of `settings` (key -> this run's value) that the parsed ratio file `data`
    records differently, as (key, file's value, run's value), or None. A setting the file does
    not record counts as equal when `absent_ok` (a user's file may omit them) and as different
    otherwise (a cache must prove what it was made from)."""
    for key, value in settings.items():
        if key not in data:
            if absent_ok:
                continue
            return key, None, value
        recorded = data[key]
        same = float(recorded) == float(value) if key != "calibration_sha256" else recorded == value
        if not same:
            return key, recorded, value
    return None


def load_ratios(path: str | os.PathLike, model: nn.Module, gathered: Gathered = _whole,
                settings: Optional[dict] = None) -> list[float]:
    """Reads a ratio file and checks it was made for `model` and, for each of `settings` the
    file records, with that value; ValueError naming the file (and the field) otherwise."""
    path = os.fspath(path)
    data = read_ratio_file(path)
    difference = model_difference(data, model_fingerprint(model, gathered))
    if difference:
        raise ValueError(f"outlier ratio file {path}: {difference}; recompute the ratios for this model")
    mismatch = settings_difference(data, settings or {}, absent_ok=True)
    if mismatch:
        key, recorded, value = mismatch
        raise ValueError(f"outlier ratio file {path}: made with {key} {recorded!r}, this run asks for {value!r}")
    return [float(r) for r in data["ratios"]]
