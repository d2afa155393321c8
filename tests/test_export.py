"""The streaming export (owlore_ds/export.py, tools/convert_to_hf.py): DeepSpeed ZeRO-1/2/3 and
owlore checkpoints to sharded safetensors, checked against independent readers and
reconstructions (safetensors' own reader, DeepSpeed's zero_to_fp32, peft's merge), and the
converter's peak resident memory against the model's size."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, base_env, common_args, final_weights, make_model, run_training

ZERO = {stage: ROOT / "ds_configs" / f"zero{stage}.json" for stage in (1, 2, 3)}


def _convert(checkpoint: Path, destination: Path, *flags: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_to_hf.py"), str(checkpoint),
                             str(destination), *flags], env=base_env(), cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _read_with_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an export, read by the safetensors library (which validates each header),
    checking that the index lists exactly the shards' tensors."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            assert fh.metadata() == {"format": "pt"}
            for name in fh.keys():
                assert name not in tensors
                tensors[name], where[name] = fh.get_tensor(name), file.name
    if len(files) > 1:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == where
        assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
        assert [f.name for f in files] == [f"model-{k:05d}-of-{len(files):05d}.safetensors"
                                           for k in range(1, len(files) + 1)]
    else:
        assert [f.name for f in files] == ["model.safetensors"]
    return tensors


def _deepspeed_reconstruction(checkpoint: Path, lora: dict | None = None) -> dict[str, torch.Tensor]:
    """DeepSpeed's own get_fp32_state_dict_from_zero_checkpoint (the whole model in memory),
    with LoRA adapters merged by peft's merge_and_unload: the oracle."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM

    with contextlib.redirect_stdout(io.StringIO()):
        weights = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
    weights = {name: t.float() for name, t in weights.items()}
    if lora is None:
        return weights
    # ZeRO-1 saves the frozen base weights only in the module (zero_to_fp32 misses them)
    tag = (checkpoint / "latest").read_text().strip()
    if (checkpoint / tag / "mp_rank_00_model_states.pt").is_file():
        module = torch.load(checkpoint / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        weights.update({name: t.float() for name, t in module.items() if name not in weights})
    from owlore_ds.lora import add_adapters

    model = add_adapters(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint)), lora)
    model.load_state_dict(weights, strict=True)
    return {name: t.detach() for name, t in model.merge_and_unload().named_parameters()}


def _loaded(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    return {name: t.detach() for name, t in model.named_parameters()}


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("method,stage,precision", [("full", 3, "fp32"), ("full", 2, "fp32"), ("full", 1, "bf16"),
                                                     ("lora", 3, "fp32"), ("lora", 1, "fp32")])
def test_zero_checkpoint_converts_to_deepspeeds_own_weights(tmp_path, tiny_llama, task_data, method, stage, precision):
    """2 ranks; the export equals final/ and DeepSpeed's reconstruction bit for bit (fp32
    masters, or their bf16 rounding), in one file and in several shards, and loads."""
    out = tmp_path / "out"
    lora = dict(lora_r=4, lora_alpha=8, lora_target_modules="all-linear") if method == "lora" else {}
    run_training(common_args(tiny_llama, task_data, out, method=method, deepspeed=ZERO[stage], max_steps=2,
                             per_device_train_batch_size=2, learning_rate=1e-2, **{precision: True}, **lora),
                 nproc=2)
    checkpoint = out / "checkpoint-2"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    expected = _deepspeed_reconstruction(checkpoint, state.get("lora"))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    expected = {name: t.to(dtype) for name, t in expected.items()}
    final = final_weights(out)
    _assert_equal(final, expected)
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    _convert(checkpoint, one)
    _convert(checkpoint, sharded, "--max_shard_size", "40KB")
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 3
    for folder in (one, sharded):
        _assert_equal(_read_with_safetensors(folder), expected)
        _assert_equal(_loaded(folder), expected)
    if stage == 3 and method == "full":  # a truncated rank file: one line naming it, nothing written
        import shutil

        broken = tmp_path / "broken"
        shutil.copytree(checkpoint, broken)
        victim = broken / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
        result = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_to_hf.py"), str(broken),
                                 str(tmp_path / "never")], env=base_env(), cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and str(victim) in result.stderr, result.stderr
        assert not (tmp_path / "never").exists() and not list(tmp_path.glob(".never.export-*"))
    # fp32 out of a bf16 run: the masters themselves
    if precision == "bf16":
        masters = tmp_path / "masters"
        _convert(checkpoint, masters, "--dtype", "fp32")
        _assert_equal(_read_with_safetensors(masters), _deepspeed_reconstruction(checkpoint))


def test_checkpoint_without_zero_converts_to_its_saved_module(tmp_path, tiny_llama, task_data):
    """ZeRO stage 0 (plain data parallel): the weights are the saved module's, as torch.load reads them."""
    config = json.loads(ZERO[2].read_text())
    config["zero_optimization"] = {"stage": 0}
    (tmp_path / "zero0.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    run_training(common_args(tiny_llama, task_data, out, deepspeed=tmp_path / "zero0.json", max_steps=2,
                             per_device_train_batch_size=2), nproc=2)
    checkpoint = out / "checkpoint-2"
    module = torch.load(checkpoint / "global_step2" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    _convert(checkpoint, tmp_path / "hf", "--max_shard_size", "40KB")
    exported = _read_with_safetensors(tmp_path / "hf")
    _assert_equal(exported, {name: module[name] for name in exported})
    _assert_equal(exported, final_weights(out))


def _sources_in_a_raw_file(raw: Path, tensors: dict[str, torch.Tensor]) -> dict:
    """The fp32 `tensors` written back to back into `raw`, as export sources reading them."""
    from owlore_ds.export import _Source, _Span

    sources, offset = {}, 0
    with open(raw, "wb") as fh:
        for name, t in tensors.items():
            fh.write(t.numpy().tobytes())
            sources[name] = _Source(tuple(t.shape), [_Span(str(raw), offset, t.numel(), torch.float32)])
            offset += t.nbytes
    return sources


def test_streaming_writer_reads_back_with_safetensors(tmp_path):
    """Header first, then the data a piece at a time (pieces far smaller than a tensor here):
    safetensors' reader accepts the file and gets every tensor back, any dtype and shape."""
    from owlore_ds.export import _write_safetensors

    torch.manual_seed(0)
    tensors = {"a": torch.randn(37, 11), "b": torch.randn(5), "c": torch.randn(3, 4, 5), "empty": torch.zeros(0, 3),
               "scalar": torch.tensor(2.5)}
    sources = _sources_in_a_raw_file(tmp_path / "raw.bin", tensors)
    from safetensors.torch import load_file

    for dtype in (torch.float32, torch.bfloat16):
        path = tmp_path / f"out-{dtype}.safetensors"
        _write_safetensors(str(path), list(sources.items()), dtype, piece_bytes=24)
        back = load_file(str(path))
        assert back.keys() == tensors.keys()
        for name, t in tensors.items():
            assert back[name].dtype == dtype and torch.equal(back[name], t.to(dtype)), name


def test_torch_files_are_read_without_loading_them(tmp_path):
    """A torch.save file's tensors (views into shared storages, offsets, Parameters, bf16)
    read back by span equal torch.load's."""
    from owlore_ds.export import _TorchFile

    base = torch.arange(100, dtype=torch.float32)
    saved = {"whole": base, "view": base[10:30], "matrix": base[40:100].view(6, 10),
             "param": torch.nn.Parameter(torch.randn(4, 3)), "bf16": torch.randn(7).to(torch.bfloat16),
             "nested": [{"x": torch.ones(2, 2)}], "number": 3}
    path = tmp_path / "file.pt"
    torch.save(saved, path)
    loaded = torch.load(path, weights_only=False)
    lazy = _TorchFile(str(path))
    from owlore_ds.export import _read

    def read(tensor):
        span = lazy.span(tensor)
        return _read(span).view(tensor.shape)

    for name in ("whole", "view", "matrix", "param", "bf16"):
        assert torch.equal(read(lazy.obj[name]), loaded[name].detach()), name
    assert torch.equal(read(lazy.obj["nested"][0]["x"]), loaded["nested"][0]["x"])
    assert lazy.obj["number"] == 3


def test_lora_merge_equals_peft(tiny_llama):
    """The merge done tensor by tensor equals peft's merge_and_unload of the same adapters."""
    from transformers import AutoModelForCausalLM

    from owlore_ds.export import _lora_merge, _Source
    from owlore_ds.lora import add_adapters

    settings = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "down_proj"],
                "task_type": "CAUSAL_LM"}
    model = add_adapters(AutoModelForCausalLM.from_pretrained(tiny_llama), settings)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    merged = dict(model.merge_and_unload().named_parameters())

    class Whole(_Source):
        def __init__(self, tensor):
            super().__init__(tuple(tensor.shape))
            self.tensor = tensor

        def whole(self):
            return self.tensor

    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        prefix = f"base_model.model.{module}"
        ours = _lora_merge(Whole(state[f"{prefix}.base_layer.weight"]), Whole(state[f"{prefix}.lora_A.default.weight"]),
                           Whole(state[f"{prefix}.lora_B.default.weight"]), 8 / 4)
        assert torch.equal(ours, merged[f"{module}.weight"]), module


# ------------------------------------------------------------------------ peak resident memory

@pytest.fixture(scope="module")
def fifty_million(tmp_path_factory, tokenizer_dir) -> Path:
    """A llama of 52M parameters (210 MB in fp32): large enough that holding the model, or a
    copy of the masters, shows in the converter's peak RSS against its fixed cost."""
    return make_model(tmp_path_factory.mktemp("llama-52m"), tokenizer_dir, "llama", num_layers=4, hidden_size=1024,
                      intermediate_size=2816, heads=8, kv_heads=8)


def peak_rss_of_convert(checkpoint: Path, destination: Path) -> int:
    """Peak resident memory (bytes, file-backed pages included) of tools/convert_to_hf.py,
    measured by a wrapper process whose only child it is (ru_maxrss of its children)."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    result = subprocess.run([sys.executable, "-c", probe, sys.executable, str(ROOT / "tools" / "convert_to_hf.py"),
                             str(checkpoint), str(destination)], env=base_env(), cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return int(result.stdout.split()[-1]) * 1024


@pytest.mark.parametrize("method", ["full", "owlore"])
def test_converter_memory_does_not_grow_with_the_model(tmp_path, tiny_llama, fifty_million, task_data, method):
    """2-rank ZeRO-3 checkpoints (full: fp32 masters and Adam moments, 630 MB; owlore: the
    weights' safetensors shards) of a 52M-parameter model: the converter's peak RSS exceeds
    its peak on the tiny model (the same imports, tokenizer and code) by less than half the
    fp32 weights (it reads a piece of one tensor at a time; building the state dict would
    add at least the whole 210 MB, DeepSpeed's reconstruction far more)."""
    from transformers import AutoConfig

    args = dict(method=method, deepspeed=ZERO[3], max_steps=1, save_steps=1, per_device_train_batch_size=1,
                block_size=16, learning_rate=1e-3)
    if method == "owlore":
        args.update(lisa_activated_layers=1, lisa_interval_steps=1, owl_nsamples=2, galore_rank=8)
    peaks = {}
    for name, model in (("tiny", tiny_llama), ("large", fifty_million)):
        out = tmp_path / name
        run_training(common_args(model, task_data, out, **args), nproc=2, timeout=600)
        peaks[name] = peak_rss_of_convert(out / "checkpoint-1", tmp_path / f"hf-{name}")
        exported = _read_with_safetensors(tmp_path / f"hf-{name}")
        _assert_equal(exported, final_weights(out) if name == "tiny" else _final_sharded(out))
    config = AutoConfig.from_pretrained(fifty_million)
    fp32_bytes = 4 * sum(t.numel() for t in _final_sharded(tmp_path / "large").values())
    assert fp32_bytes > 200e6, config
    growth = peaks["large"] - peaks["tiny"]
    print(f"{method}: converter peak RSS {peaks['large'] / 2**20:.0f} MiB on 52M parameters "
          f"({fp32_bytes / 2**20:.0f} MiB fp32), {peaks['tiny'] / 2**20:.0f} MiB on the tiny model: "
          f"+{growth / 2**20:.0f} MiB")
    assert growth < fp32_bytes / 2, (peaks, fp32_bytes)


def _final_sharded(out: Path) -> dict[str, torch.Tensor]:
    return _read_with_safetensors(out / "final")


def test_shares_of_the_shards_make_the_same_export(tmp_path):
    """write_weights(share=(i, n)) writes shards k with k % n == i (share 0 the index), so n
    processes writing their shares into one folder make what one process writes alone."""
    from owlore_ds.export import write_weights

    torch.manual_seed(0)
    tensors = {f"t{i}": torch.randn(50 + i) for i in range(7)}
    sources = _sources_in_a_raw_file(tmp_path / "raw.bin", tensors)
    alone, shared = tmp_path / "alone", tmp_path / "shared"
    alone.mkdir()
    shared.mkdir()
    files = write_weights(sources, str(alone), torch.float32, max_shard_bytes=250)
    written = []
    for share in range(3):
        before = set(p.name for p in shared.iterdir())
        write_weights(sources, str(shared), torch.float32, max_shard_bytes=250, share=(share, 3))
        written.append(sorted(set(p.name for p in shared.iterdir()) - before))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) == 7
    assert written == [sorted(shards[0::3] + ["model.safetensors.index.json"]), sorted(shards[1::3]),
                       sorted(shards[2::3])]
    for name in files:
        assert (alone / name).read_bytes() == (shared / name).read_bytes(), name


def test_the_ranks_export_final_together(tmp_path, tiny_llama, task_data):
    """2 ranks, --export_max_shard_size 100KB: OUT/final is the same as one process's
    conversion of the final checkpoint, shard for shard."""
    out = tmp_path / "out"
    run_training(common_args(tiny_llama, task_data, out, method="owlore", deepspeed=ZERO[3], max_steps=2,
                             per_device_train_batch_size=1, lisa_activated_layers=1, owl_nsamples=2, galore_rank=8,
                             export_max_shard_size="100KB"), nproc=2)
    _convert(out / "checkpoint-2", tmp_path / "alone", "--max_shard_size", "100KB")
    names = sorted(p.name for p in (tmp_path / "alone").glob("model*"))
    assert len(names) > 4 and names == sorted(p.name for p in (out / "final").glob("model*"))
    for name in names:
        assert (out / "final" / name).read_bytes() == (tmp_path / "alone" / name).read_bytes(), name
    _assert_equal(_read_with_safetensors(out / "final"), _loaded(out / "final"))
