"""Layer-sampled training (lisa, owlore's sampling) under the layerwise ZeRO optimizer, real runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import (ROOT, assert_same_weights, base_env, common_args, final_weights, run_training,
                      straight_and_killed_runs)
from owlore_ds.metrics import read_metrics
from owlore_ds.sampler import LayerSampler, layer_probabilities

ZERO2 = ROOT / "ds_configs" / "zero2.json"


@pytest.fixture(scope="module")
def four_layers(make_tiny_model):
    return make_tiny_model("llama", num_layers=4)


def _layer_params(model_dir) -> tuple[int, int]:
    """(parameters of one decoder layer, parameters always trained) of a tiny model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    return layer, model.num_parameters() - layer * len(model.model.layers)


def test_lisa_with_every_layer_active_equals_full_adamw(tmp_path, four_layers, task_data):
    """The layerwise optimizer's AdamW and clipping against DeepSpeed ZeRO-2 with torch.optim.AdamW."""
    args = dict(deepspeed=ZERO2, per_device_train_batch_size=4, max_steps=5, max_grad_norm=0.5)
    run_training(common_args(four_layers, task_data, tmp_path / "full", method="full", **args))
    run_training(common_args(four_layers, task_data, tmp_path / "lisa", method="lisa", lisa_activated_layers=4, **args))
    full, lisa = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "lisa")
    assert [m["loss"] for m in lisa] == pytest.approx([m["loss"] for m in full], rel=1e-5)
    assert [m["grad_norm"] for m in lisa] == pytest.approx([m["grad_norm"] for m in full], rel=1e-5)
    assert all(m["grad_norm"] > 0.5 for m in full)  # clipping was active
    assert_same_weights(final_weights(tmp_path / "full"), final_weights(tmp_path / "lisa"))


def test_two_ranks_sample_and_train_like_one_rank(tmp_path, four_layers, task_data):
    args = dict(deepspeed=ZERO2, method="lisa", lisa_activated_layers=1, lisa_interval_steps=2, max_steps=8, seed=11)
    run_training(common_args(four_layers, task_data, tmp_path / "one", per_device_train_batch_size=4, **args))
    run_training(common_args(four_layers, task_data, tmp_path / "two", per_device_train_batch_size=1,
                             gradient_accumulation_steps=2, **args), nproc=2)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    sampler = LayerSampler(4, 1, 2, layer_probabilities("uniform", 4), seed=11)
    expected = [sampler.layers_for_interval(step // 2) for step in range(8)]
    assert [m["active_layers"] for m in one] == expected == [m["active_layers"] for m in two]
    assert len({tuple(layers) for layers in expected}) > 1, "the test needs layers to change"
    assert [m["loss"] for m in two] == pytest.approx([m["loss"] for m in one], rel=1e-5)
    assert_same_weights(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"))
    # Layers never trained keep their initial weights exactly.
    from safetensors.torch import load_file

    initial, trained = load_file(str(four_layers / "model.safetensors")), final_weights(tmp_path / "one")
    visited = {layer for layers in expected for layer in layers}
    for name, tensor in initial.items():
        if name.startswith("model.layers."):
            changed = not torch.equal(tensor, trained[name])
            assert changed == (int(name.split(".")[2]) in visited), name


def test_optimizer_state_is_for_active_layers_only(tmp_path, four_layers, task_data):
    """bf16: fp32 master + two fp32 moments = 12 bytes per trained parameter, only where trained."""
    layer, always = _layer_params(four_layers)
    args = dict(deepspeed=ZERO2, bf16=True, per_device_train_batch_size=2, max_steps=10, lisa_interval_steps=1, seed=1)
    run_training(common_args(four_layers, task_data, tmp_path / "full", method="full", **args))
    run_training(common_args(four_layers, task_data, tmp_path / "one", method="lisa", lisa_activated_layers=1, **args))
    run_training(common_args(four_layers, task_data, tmp_path / "two", method="lisa", lisa_activated_layers=1,
                             **{**args, "per_device_train_batch_size": 1}), nproc=2)
    full, one, two = (read_metrics(tmp_path / name) for name in ("full", "one", "two"))
    assert {layer for m in one for layer in m["active_layers"]} == {0, 1, 2, 3}  # every layer visited
    assert full[-1]["optimizer_state_bytes"] == pytest.approx(12 * (4 * layer + always), rel=0.005)
    assert {m["optimizer_state_bytes"] for m in one} == {12 * (layer + always)}  # flat while layers change
    # gamma/L of full AdamW's state for the layer matrices
    assert (one[0]["optimizer_state_bytes"] - 12 * always) / (full[-1]["optimizer_state_bytes"] - 12 * always) == \
        pytest.approx(1 / 4, rel=0.01)
    two_bytes = {m["optimizer_state_bytes"] for m in two}
    assert len(two_bytes) == 1 and two_bytes.pop() == pytest.approx(one[0]["optimizer_state_bytes"] / 2, rel=0.1)


def test_offload_keeps_inactive_state_on_cpu(tmp_path, four_layers, task_data):
    layer, always = _layer_params(four_layers)
    run_training(common_args(four_layers, task_data, tmp_path / "out", deepspeed=ZERO2, method="lisa",
                             lisa_activated_layers=1, lisa_interval_steps=1, max_steps=10, seed=5,
                             per_device_train_batch_size=2, inactive_state="offload"))
    metrics = read_metrics(tmp_path / "out")
    assert {m["optimizer_state_bytes"] for m in metrics} == {8 * (layer + always)}  # fp32: no master copy
    seen: set[int] = set()
    for m in metrics:
        offloaded = seen - set(m["active_layers"])
        assert m.get("offloaded_state_bytes", 0) == 8 * layer * len(offloaded)
        seen |= set(m["active_layers"])


def test_killed_and_resumed_lisa_equals_straight_run(tmp_path, four_layers, task_data):
    straight, resumed = straight_and_killed_runs(
        four_layers, task_data, tmp_path, deepspeed=ZERO2, method="lisa", lisa_activated_layers=2,
        lisa_interval_steps=3, bf16=True, inactive_state="offload", per_device_train_batch_size=2, max_steps=30,
        save_steps=5, resume_from_checkpoint="auto", learning_rate=1e-3)
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [m["step"] for m in b] == list(range(1, 31))
    assert [m["active_layers"] for m in b] == [m["active_layers"] for m in a]
    assert [m["loss"] for m in b] == [m["loss"] for m in a]
    assert_same_weights(final_weights(straight), final_weights(resumed), atol=0)
    state = torch.load(resumed / "checkpoint-30" / "layerwise_rank0.pt", weights_only=True)
    assert state["items"] and all(torch.is_tensor(v) or isinstance(v, int) for s in state["items"].values() for v in s.values())


def test_resume_on_another_world_size_moves_state_by_name(tmp_path, four_layers, task_data):
    args = dict(deepspeed=ZERO2, method="lisa", lisa_activated_layers=2, lisa_interval_steps=2,
                inactive_state="offload", max_steps=8, save_steps=4, resume_from_checkpoint="auto")
    out = tmp_path / "out"
    run_training(common_args(four_layers, task_data, out, per_device_train_batch_size=2, **args), nproc=2)
    straight, straight_weights = read_metrics(out), final_weights(out)
    for leftover in ("checkpoint-8", "final"):
        subprocess.run(["rm", "-rf", str(out / leftover)], check=True)
    run_training(common_args(four_layers, task_data, out, per_device_train_batch_size=4, **args), nproc=1)
    resumed = read_metrics(out)
    assert [m["active_layers"] for m in resumed] == [m["active_layers"] for m in straight]
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in straight], rel=1e-5)
    assert_same_weights(straight_weights, final_weights(out))


def test_owl_sampling_uses_ratios_of_this_model_only(tmp_path, four_layers, make_tiny_model, task_data):
    ratios = tmp_path / "ratios.json"
    tool = subprocess.run([sys.executable, str(ROOT / "tools" / "compute_outliers.py"), "--model_name_or_path",
                           str(four_layers), "--dataset_path", str(task_data), "--nsamples", "4", "--seqlen", "32",
                           "--output", str(ratios), "--cache_dir", str(tmp_path / "cache")],
                          env=base_env(), cwd=ROOT, capture_output=True, text=True)
    assert tool.returncode == 0, tool.stderr[-2000:]
    saved = json.loads(ratios.read_text())
    assert len(saved["ratios"]) == 4 and saved["nsamples"] == 4 and saved["seqlen"] == 32
    out = tmp_path / "owl"
    run_training(common_args(four_layers, task_data, out, method="lisa", lisa_prob_mode="owl", outlier_ratios=ratios,
                             lisa_activated_layers=2, lisa_interval_steps=1, max_steps=3, per_device_train_batch_size=2))
    sampler = LayerSampler(4, 2, 1, layer_probabilities("owl", 4, saved["ratios"]), seed=7)
    assert [m["active_layers"] for m in read_metrics(out)] == [sampler.layers_for_interval(k) for k in range(3)]

    other = make_tiny_model("llama", num_layers=4)  # same shape, other weights
    from safetensors.torch import load_file, save_file

    weights = {k: v + 0.01 for k, v in load_file(str(other / "model.safetensors")).items()}
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    refused = run_training(common_args(other, task_data, tmp_path / "refused", method="lisa", lisa_prob_mode="owl",
                                       outlier_ratios=ratios), check=False)
    assert refused.returncode == 2
    assert "ratios.json" in refused.stderr and "fingerprint" in refused.stderr
    assert not (tmp_path / "refused").exists()


def test_owlore_caches_its_ratios_and_computes_them_again_when_their_settings_change(tmp_path, four_layers, task_data,
                                                                                     owl_inputs):
    """Real 2-rank runs in one output dir: the first computes and caches the ratios; a resumed run
    with the same settings reuses the file untouched; one with another M and number of windows
    computes them again (equal to a fresh computation) and replaces it; --overwrite_output_dir
    computes them again even with the same settings."""
    from owlore_ds.data import calibration_windows
    from owlore_ds.outliers import calibration_sha256

    model, data = owl_inputs
    out = tmp_path / "out"
    cache = out / "outlier_ratios.json"
    args = dict(method="lisa", lisa_prob_mode="owl", owl_nsamples=4, lisa_activated_layers=2, max_steps=2,
                per_device_train_batch_size=2, resume_from_checkpoint="auto")

    def run(**flags) -> str:
        result = run_training(common_args(four_layers, task_data, out, **{**args, **flags}), nproc=2)
        return result.stdout + result.stderr

    log = run()
    cached = json.loads(cache.read_text())
    assert (len(cached["ratios"]), cached["threshold_m"], cached["nsamples"], cached["seqlen"]) == (4, 5.0, 4, 64)
    assert cached["calibration_sha256"] == calibration_sha256(calibration_windows(data, 4, 64, 7, sequential=False))
    assert cached["ratios"] == pytest.approx(_fresh_ratios(model, data), rel=1e-6)
    assert "no outlier_ratios.json in the output dir yet" in log

    before = (cache.read_bytes(), cache.stat().st_mtime_ns)
    log = run()
    assert "resumed from" in log and "outlier ratios: reusing" in log and "computing outlier ratios" not in log
    assert (cache.read_bytes(), cache.stat().st_mtime_ns) == before

    log = run(owl_threshold_m=3, owl_nsamples=6)
    assert "computing outlier ratios" in log and "was made with threshold_m 5.0, this run uses 3.0" in log
    recomputed = json.loads(cache.read_text())
    assert (recomputed["threshold_m"], recomputed["nsamples"]) == (3.0, 6)
    assert recomputed["ratios"] == pytest.approx(_fresh_ratios(model, data, threshold_m=3.0, nsamples=6), rel=1e-6)
    assert recomputed["ratios"] != cached["ratios"]

    _tamper(cache)  # same settings, other ratios: only a new computation restores them
    log = run(owl_threshold_m=3, owl_nsamples=6, overwrite_output_dir=True, resume_from_checkpoint=None)
    assert "computing outlier ratios (--overwrite_output_dir)" in log and "resumed from" not in log
    assert json.loads(cache.read_text()) == recomputed


def test_outlier_ratios_of_the_embedded_pretrained_model(tmp_path):
    """On a trained model the layers differ in outlier share (a random init is nearly flat);
    the tool's sequential calibration equals the library on the first windows in file order."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from owlore_ds.config import EMBEDDED_MODEL
    from owlore_ds.outliers import compute_layer_outlier_ratios

    text = (ROOT / "data" / "pretrain" / "valid.txt").read_text(encoding="utf-8")[:20_000]
    ids = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)(text)["input_ids"]
    rows = [{"input_ids": ids[i * 64 : (i + 1) * 64]} for i in range(10)]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    output = tmp_path / "ratios.json"
    tool = subprocess.run([sys.executable, str(ROOT / "tools" / "compute_outliers.py"), "--model_name_or_path",
                           EMBEDDED_MODEL, "--dataset_path", str(data), "--nsamples", "4", "--seqlen", "64",
                           "--calibration_order", "sequential", "--output", str(output),
                           "--cache_dir", str(tmp_path / "cache")], env=base_env(), cwd=ROOT, capture_output=True, text=True)
    assert tool.returncode == 0, tool.stderr[-2000:]
    ratios = json.loads(output.read_text())["ratios"]
    windows = torch.tensor([r["input_ids"] for r in rows[:4]])
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL, dtype=torch.float32, local_files_only=True)
    assert ratios == pytest.approx(compute_layer_outlier_ratios(model, windows, 5.0), rel=1e-6)
    torch.manual_seed(0)
    untrained = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(EMBEDDED_MODEL), dtype=torch.float32)
    flat = compute_layer_outlier_ratios(untrained, windows, 5.0)
    assert max(ratios) / min(ratios) > max(flat) / min(flat) + 0.5
    probabilities = layer_probabilities("owl", len(ratios), ratios)
    assert probabilities.max() > 1.3 / len(ratios)


# ---------------------------------------------------------------- which OWL ratios a run uses


@pytest.fixture(scope="module")
def owl_inputs(four_layers, task_data, tmp_path_factory):
    """The tiny model and the task's training data, loaded in this process as the trainer does."""
    from owlore_ds.data import load_training_data
    from owlore_ds.modeling import load_model, load_tokenizer

    model = load_model(str(four_layers), "fp32", gradient_checkpointing=False)
    data = load_training_data(str(task_data), load_tokenizer(str(four_layers)), str(four_layers), 64,
                              str(tmp_path_factory.mktemp("owl-cache")), model.config.vocab_size)
    return model, data


def _owl_config(model_dir, data, out, **overrides):
    from owlore_ds.config import TrainConfig

    cfg = TrainConfig(**{"model_name_or_path": str(model_dir), "dataset_path": str(data), "output_dir": str(out),
                         "block_size": 64, "method": "owlore", "owl_nsamples": 4, "seed": 7, **overrides})
    cfg.validate()
    return cfg


def _fresh_ratios(model, data, threshold_m=5.0, nsamples=4, seqlen=64, seed=7) -> list[float]:
    """The ratios computed from scratch, as a run with these settings computes them."""
    from owlore_ds.data import calibration_windows
    from owlore_ds.outliers import compute_layer_outlier_ratios

    return compute_layer_outlier_ratios(model, calibration_windows(data, nsamples, seqlen, seed, sequential=False),
                                        threshold_m)


def _tamper(path) -> list[float]:
    """Replaces the ratios of a ratio file (its settings kept): a reuse returns these."""
    saved = json.loads(path.read_text())
    saved["ratios"] = [float(i + 1) for i in range(len(saved["ratios"]))]
    path.write_text(json.dumps(saved))
    return saved["ratios"]


def test_ratio_cache_is_reused_only_with_the_same_model_settings_and_data(tmp_path, four_layers, task_data,
                                                                         owl_inputs, make_tiny_model, caplog):
    from owlore_ds.layer_sampling import RATIOS_FILE, outlier_ratios
    from owlore_ds.outliers import calibration_sha256
    from owlore_ds.data import calibration_windows

    model, data = owl_inputs
    out = tmp_path / "out"
    cache = out / RATIOS_FILE
    computed = outlier_ratios(_owl_config(four_layers, task_data, out), model, data)
    assert computed == _fresh_ratios(model, data)
    saved = json.loads(cache.read_text())
    assert saved["ratios"] == computed
    assert (saved["threshold_m"], saved["nsamples"], saved["seqlen"]) == (5.0, 4, 64)
    assert saved["calibration_sha256"] == calibration_sha256(calibration_windows(data, 4, 64, 7, sequential=False))

    # The same settings: the cache is returned as it is (tampered ratios prove it is not recomputed).
    tampered = _tamper(cache)
    before = (cache.read_bytes(), cache.stat().st_mtime_ns)
    with caplog.at_level("INFO", logger="owlore_ds"):
        assert outlier_ratios(_owl_config(four_layers, task_data, out), model, data) == tampered
    assert (cache.read_bytes(), cache.stat().st_mtime_ns) == before
    assert "reusing" in caplog.text

    # Any setting that made the ratios differs: computed again, the cache replaced, the reason logged.
    cases = [
        (dict(owl_threshold_m=3.0), dict(threshold_m=3.0), "threshold_m 5.0, this run uses 3.0"),
        (dict(owl_nsamples=6), dict(nsamples=6), "nsamples 4, this run uses 6"),
        (dict(owl_seqlen=32), dict(seqlen=32), "seqlen 64, this run uses 32"),
        (dict(seed=8), dict(seed=8), "calibration_sha256"),  # other windows of the same data
    ]
    for flags, settings, reason in cases:
        _tamper(cache)
        caplog.clear()
        with caplog.at_level("INFO", logger="owlore_ds"):
            ratios = outlier_ratios(_owl_config(four_layers, task_data, out, **flags), model, data)
        fresh = _fresh_ratios(model, data, **settings)
        assert ratios == fresh and json.loads(cache.read_text())["ratios"] == fresh, flags
        assert reason in caplog.text and "computing outlier ratios" in caplog.text, caplog.text
        # Back to the first settings (recomputes again: the cache now holds the other ones).
        assert outlier_ratios(_owl_config(four_layers, task_data, out), model, data) == computed

    # Other data (the windows' tokens differ) with the same settings.
    other_data = tmp_path / "other.json"
    rows = json.loads(task_data.read_text())
    rows["instances"] = rows["instances"][::-1][:200]
    other_data.write_text(json.dumps(rows))
    from owlore_ds.data import load_training_data
    from owlore_ds.modeling import load_tokenizer

    reversed_data = load_training_data(str(other_data), load_tokenizer(str(four_layers)), str(four_layers), 64,
                                       str(tmp_path / "cache"), model.config.vocab_size)
    caplog.clear()
    with caplog.at_level("INFO", logger="owlore_ds"):
        ratios = outlier_ratios(_owl_config(four_layers, other_data, out), model, reversed_data)
    assert "calibration_sha256" in caplog.text and ratios == _fresh_ratios(model, reversed_data)

    # Another model of the same shape: its fingerprint differs.
    other = load_model_from(make_tiny_model("llama", num_layers=4), seed_offset=0.01)
    caplog.clear()
    with caplog.at_level("INFO", logger="owlore_ds"):
        ratios = outlier_ratios(_owl_config(four_layers, task_data, out), other, data)
    assert "fingerprint" in caplog.text and ratios == _fresh_ratios(other, data)

    # --overwrite_output_dir recomputes even with the same settings.
    outlier_ratios(_owl_config(four_layers, task_data, out), model, data)
    _tamper(cache)
    assert outlier_ratios(_owl_config(four_layers, task_data, out, overwrite_output_dir=True), model, data) == computed
    assert json.loads(cache.read_text())["ratios"] == computed

    # A cache of an earlier version (no data hash) or one that cannot be read is computed again.
    for damage in ("old", "corrupt"):
        saved = json.loads(cache.read_text())
        saved["ratios"] = [1.0] * len(computed)
        saved.pop("calibration_sha256")
        cache.write_text(json.dumps(saved) if damage == "old" else "{not json")
        caplog.clear()
        with caplog.at_level("INFO", logger="owlore_ds"):
            assert outlier_ratios(_owl_config(four_layers, task_data, out), model, data) == computed
        assert ("does not record its calibration_sha256" if damage == "old" else "not valid JSON") in caplog.text


def load_model_from(model_dir, seed_offset: float):
    """A model of `model_dir` with every weight moved by `seed_offset` (same shape, other weights)."""
    from owlore_ds.modeling import load_model

    model = load_model(str(model_dir), "fp32", gradient_checkpointing=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(seed_offset)
    return model


def test_a_given_ratio_file_must_agree_with_the_settings_the_user_gives(tmp_path, four_layers, task_data, owl_inputs):
    """--outlier_ratios FILE: its own settings are what it was made with (e.g. calibrated on other data
    with other windows than the run trains on); only a flag given explicitly and recorded otherwise
    in the file is refused, in one line naming the file and the flag. A file without settings is taken."""
    from owlore_ds.errors import UserInputError
    from owlore_ds.layer_sampling import outlier_ratios
    from owlore_ds.outliers import model_fingerprint, save_ratios

    model, data = owl_inputs
    given = tmp_path / "given.json"
    save_ratios(given, [1.0, 2.0, 3.0, 4.0], model_fingerprint(model), 5.0, 16, 32, "0123456789abcdef")
    out = tmp_path / "out"
    for flags in (dict(owl_nsamples=None), dict(owl_threshold_m=5, owl_nsamples=16, owl_seqlen=32)):
        cfg = _owl_config(four_layers, task_data, out, outlier_ratios=str(given), **flags)
        assert outlier_ratios(cfg, model, data) == [1.0, 2.0, 3.0, 4.0]
    for flags, flag in ((dict(owl_threshold_m=3.0), "--owl_threshold_m 3.0"), (dict(owl_nsamples=4), "--owl_nsamples 4"),
                        (dict(owl_nsamples=None, owl_seqlen=64), "--owl_seqlen 64")):
        cfg = _owl_config(four_layers, task_data, out, outlier_ratios=str(given), **flags)
        with pytest.raises(UserInputError) as err:
            outlier_ratios(cfg, model, data)
        message = str(err.value)
        assert str(given) in message and flag in message and "\n" not in message, message
    assert not out.exists()  # a given file is never copied into the output dir

    bare = tmp_path / "bare.json"  # ratios and fingerprint only: whatever the flags say, it is taken
    bare.write_text(json.dumps({"ratios": [4.0, 3.0, 2.0, 1.0], "fingerprint": model_fingerprint(model)}))
    cfg = _owl_config(four_layers, task_data, out, outlier_ratios=str(bare), owl_threshold_m=3.0, owl_seqlen=16)
    assert outlier_ratios(cfg, model, data) == [4.0, 3.0, 2.0, 1.0]
