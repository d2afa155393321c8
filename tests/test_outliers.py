import copy
import json

import pytest
import torch
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from owlore_ds.outliers import compute_layer_outlier_ratios, load_ratios, model_fingerprint, save_ratios

SHAPE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=256
)
PLANTED = (1, 3)
M = 5.0


def build(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**SHAPE))
    if arch == "mistral":
        return MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=8))
    # Layers 2 and 3 use a sliding-window mask, 0 and 1 a full causal one: the
    # layer-by-layer pass must give each layer its own mask to match the reference.
    return Qwen2ForCausalLM(Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=8, max_window_layers=2))


def plant_outliers(model: nn.Module) -> None:
    """Blow up a few input columns of every linear in the PLANTED layers."""
    with torch.no_grad():
        for i in PLANTED:
            for lin in model.model.layers[i].modules():
                if isinstance(lin, nn.Linear):
                    lin.weight[:, [3, 17, 40]] *= 20.0


def reference_ratios(model: nn.Module, ids: torch.Tensor, m: float) -> list[float]:
    """DESIGN 1.1 written out plainly: one full forward, hooks on every linear, fp64 scores."""
    energy = {}

    def hook(lin, inputs, output):
        x = inputs[0].reshape(-1, lin.in_features).double()
        energy[lin] = (x**2).sum(0) / ids.shape[0]

    layers = model.model.layers
    lins = [[mod for mod in layer.modules() if isinstance(mod, nn.Linear)] for layer in layers]
    handles = [lin.register_forward_hook(hook) for group in lins for lin in group]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in handles:
        h.remove()

    ratios = []
    for group in lins:
        a = torch.cat([(lin.weight.double().abs() * energy[lin].sqrt()[None, :]).flatten() for lin in group])
        ratios.append(100.0 * (a > m * a.mean()).sum().item() / a.numel())
    return ratios


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (8, 32), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_ratios_find_planted_layers_and_match_reference(arch, ids):
    model = build(arch)
    plant_outliers(model)
    ratios = compute_layer_outlier_ratios(model, ids, M, batch_size=1)

    assert len(ratios) == 4
    assert set(sorted(range(4), key=lambda i: -ratios[i])[:2]) == set(PLANTED)
    # Not far more: the planted layers' outputs also raise the energy seen by layer 2.
    assert min(ratios[i] for i in PLANTED) > 1.5 * max(ratios[i] for i in range(4) if i not in PLANTED)
    torch.testing.assert_close(torch.tensor(ratios), torch.tensor(reference_ratios(model, ids, M)), rtol=1e-5, atol=0)

    for batch_size in (3, 4, 8):  # 3 leaves a short last batch
        other = compute_layer_outlier_ratios(model, ids, M, batch_size=batch_size, device="cpu")
        torch.testing.assert_close(torch.tensor(other), torch.tensor(ratios), rtol=1e-5, atol=0)


def test_model_is_left_as_it_was(ids):
    model = build("llama")
    model.train()
    layers = list(model.model.layers)
    before = model(ids[:2]).logits
    compute_layer_outlier_ratios(model, ids, M, batch_size=4)
    assert list(model.model.layers) == layers
    assert all(mod.training for mod in model.modules())
    torch.testing.assert_close(model(ids[:2]).logits, before, rtol=0, atol=0)


def test_threshold_changes_ratio(ids):
    model = build("llama")
    plant_outliers(model)
    low = compute_layer_outlier_ratios(model, ids, 2.0, batch_size=8)
    high = compute_layer_outlier_ratios(model, ids, 13.0, batch_size=8)
    assert all(lo > hi for lo, hi in zip(low, high))


def test_fingerprint():
    a, b = build("llama", seed=0), build("llama", seed=1)
    fa = model_fingerprint(a)
    assert fa == model_fingerprint(copy.deepcopy(a))
    assert fa["weights_sha256"] != model_fingerprint(b)["weights_sha256"]
    assert fa["num_layers"] == 4 and fa["hidden_size"] == 64 and fa["model_type"] == "llama"
    # Same checkpoint loaded in bf16 must still match ratios computed in fp32.
    a_bf16 = copy.deepcopy(a).to(torch.bfloat16)
    a_rounded = copy.deepcopy(a_bf16).float()
    assert model_fingerprint(a_bf16) == model_fingerprint(a_rounded) == fa
    assert model_fingerprint(build("qwen2"))["model_type"] == "qwen2"


def test_save_load_roundtrip(tmp_path):
    model = build("llama")
    path = tmp_path / "sub" / "ratios.json"
    save_ratios(path, [1.0, 2.5, 0.5, 3.0], model_fingerprint(model), M, 8, 32)
    data = json.loads(path.read_text())
    assert set(data) == {"ratios", "threshold_m", "nsamples", "seqlen", "fingerprint"}
    assert (data["threshold_m"], data["nsamples"], data["seqlen"]) == (M, 8, 32)
    assert load_ratios(path, model) == [1.0, 2.5, 0.5, 3.0]


def test_load_rejects_other_models(tmp_path):
    model = build("llama")
    path = tmp_path / "ratios.json"
    save_ratios(path, [1.0, 2.0, 3.0, 4.0], model_fingerprint(model), M, 8, 32)

    with pytest.raises(ValueError, match="fingerprint") as err:
        load_ratios(path, build("llama", seed=1))
    assert str(path) in str(err.value) and "\n" not in str(err.value)

    fewer = LlamaForCausalLM(LlamaConfig(**{**SHAPE, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="4 layer ratios but the model has 3 layers") as err:
        load_ratios(path, fewer)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"ratios": [1, 2, 3, 4]}', "missing keys"),
        ('{"ratios": [1, "x", 3, 4], "threshold_m": 5, "nsamples": 1, "seqlen": 1, "fingerprint": {}}', "percentages"),
    ],
)
def test_load_rejects_malformed(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        load_ratios(path, build("llama"))
    assert str(path) in str(err.value)


def test_rejects_bad_arguments(ids):
    model = build("llama")
    with pytest.raises(ValueError, match="nsamples, seqlen"):
        compute_layer_outlier_ratios(model, ids[0], M)
    with pytest.raises(ValueError, match="threshold_m"):
        compute_layer_outlier_ratios(model, ids, 0.0)
    with pytest.raises(ValueError, match="no decoder layers"):
        compute_layer_outlier_ratios(nn.Linear(2, 2), ids, M)


def test_bf16_model(ids):
    model = build("llama")
    plant_outliers(model)
    ratios = compute_layer_outlier_ratios(model.to(torch.bfloat16), ids, M, batch_size=4)
    assert set(sorted(range(4), key=lambda i: -ratios[i])[:2]) == set(PLANTED)


def test_settings_are_recorded_and_checked(tmp_path, ids):
    from owlore_ds.outliers import calibration_sha256

    model = build("llama")
    path = tmp_path / "ratios.json"
    digest = calibration_sha256(ids)
    assert digest == calibration_sha256(ids.clone()) and len(digest) == 16
    assert digest != calibration_sha256(ids[:, :-1]) and digest != calibration_sha256(ids.flip(0))
    save_ratios(path, [1.0, 2.0, 3.0, 4.0], model_fingerprint(model), M, 8, 32, digest)
    assert json.loads(path.read_text())["calibration_sha256"] == digest
    same = dict(threshold_m=M, nsamples=8, seqlen=32, calibration_sha256=digest)
    assert load_ratios(path, model, settings=same) == [1.0, 2.0, 3.0, 4.0]
    for key, value in (("threshold_m", 3.0), ("nsamples", 4), ("seqlen", 64), ("calibration_sha256", "x")):
        with pytest.raises(ValueError, match=f"made with {key} ") as err:
            load_ratios(path, model, settings={**same, key: value})
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    # A file without settings (written by hand) passes any settings; malformed ones are refused.
    path.write_text(json.dumps({"ratios": [1, 2, 3, 4], "fingerprint": model_fingerprint(model)}))
    assert load_ratios(path, model, settings=same) == [1.0, 2.0, 3.0, 4.0]
    path.write_text(json.dumps({"ratios": [1, 2, 3, 4], "fingerprint": model_fingerprint(model), "seqlen": "long"}))
    with pytest.raises(ValueError, match="'seqlen' must be a positive number"):
        load_ratios(path, model)
