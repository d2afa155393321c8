"""Per-device memory model of a training run: what each method holds, from the model's shapes.

`estimate(config, method, ...)` returns a `MemoryEstimate` in bytes, per device (per rank).
Every term is a formula over the architecture's tensor shapes and the run's flags, derived
from what the code holds (our trainer, DeepSpeed 0.19's ZeRO optimizers, torch's AdamW, the
Llama/Mistral/Qwen2 forward of transformers 5). Nothing is fitted. docs/memory_model.md
explains each term and how it was checked against measured runs.

The peak is the larger of two moments of a step:
- backward: weights, persistent optimizer state, persistent gradient buffers and the
  activations saved for backward at their largest (start of backward, with the loss'
  fp32 logits workspace, or the recompute of one checkpointed layer);
- optimizer step: weights, state, every gradient of the step and the step's temporaries.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from owlore_ds.config import MASTER_POLICIES
from owlore_ds.errors import UserInputError
from owlore_ds.modeling import LOSS_CHUNK_TOKENS

METHODS = ("full", "lisa", "galore", "owlore", "lomo", "adalomo", "lora")
LAYERWISE = ("lisa", "galore", "owlore")
PRECISIONS = {"bf16": 2, "fp32": 4}
FP32 = 4
GB = 1e9

# The process overhead that no tensor shape explains, by device.
# - cpu: library state first touched after the baseline that peak_memory_bytes subtracts
#   (transformers' modeling module, DeepSpeed's engine, the autograd engine, the CPU kernels'
#   first use). Library code is not in it: memory_baseline_bytes maps every page of the
#   loaded libraries first, which took out 20-22 MiB that the kernel's fault-around made
#   depend on the page cache. Measured with a 0.2M-parameter Llama, where the shape-derived
#   terms are below 4 MiB: 7.8-10.9 MiB over full/lisa/galore/owlore on 1 and 2 ranks
#   (tests/test_memory_model.py::test_fixed_overhead_matches_measurement checks it).
# - cuda: torch's cuBLAS workspace, allocated through the caching allocator and so counted
#   in max_memory_allocated: 4096 KiB x 8 chunks on sm90 (torch's default
#   CUBLAS_WORKSPACE_CONFIG), the CUDA context itself is not counted by max allocated.
RUNTIME_OVERHEAD = {"cpu": 9 * 2**20, "cuda": 32 * 2**20}
# CPU with bf16 weights adds a fixed amount: on x86 CPUs with AVX-512, torch runs bf16 GEMMs
# through oneDNN (torch.backends.mkldnn), which keeps each primitive it creates (JIT code and
# buffers, about 1 MiB per distinct GEMM shape and pass) cached for the life of the process.
# Not a tensor and not proportional to the layer size: bf16 minus fp32 peaks of the same runs
# were +12.4 and +8.7 MiB (owlore 1 rank, lisa 2 ranks) on a 0.2M-parameter Llama (10
# taken); with torch.backends.mkldnn.enabled = False the bf16 runs measured what the fp32 ones do. CUDA's
# bf16 GEMMs (cuBLAS) share RUNTIME_OVERHEAD's workspace; CPUs where torch does not use
# oneDNN for bf16 (no AVX-512) do not have this either.
CPU_BF16_KERNELS = 10 * 2**20


@dataclass
class MemoryEstimate:
    """Bytes per device. `peak` is what peak_memory_bytes reports (GPU max allocated)."""

    weights: int = 0  # model weights resident on the device (ZeRO-3: the 1/N shard)
    gradients: int = 0  # gradients alive at the optimizer step (incl. reduce buckets)
    master_weights: int = 0  # fp32 copies of the trained weights
    optimizer_state: int = 0  # moments, GaLore projectors, AdaLomo factors
    activations: int = 0  # saved for backward at their largest, incl. the loss' fp32 logits
    comm_buffers: int = 0  # DeepSpeed reduce buckets, ZeRO-3 gathered parameters
    step_workspace: int = 0  # temporaries of the optimizer step (AdamW's sqrt, GaLore's SVD)
    runtime_overhead: int = 0  # fixed: see RUNTIME_OVERHEAD and CPU_BF16_KERNELS
    peak: int = 0
    optimizer_state_bytes: int = 0  # what the trainer's optimizer_state_bytes metric reports
    peak_phase: str = ""  # "backward" or "step": which moment sets the peak
    notes: list[str] = field(default_factory=list)

    FIELDS = ("weights", "gradients", "master_weights", "optimizer_state", "activations", "comm_buffers",
              "step_workspace", "runtime_overhead", "peak", "optimizer_state_bytes")

    def breakdown(self) -> dict[str, int]:
        """The byte fields by name."""
        data = asdict(self)
        return {name: data[name] for name in self.FIELDS}

    def table(self, label: str = "") -> str:
        return format_table({label or "estimate": self})


def format_table(estimates: dict[str, MemoryEstimate], unit: float = GB) -> str:
    """A markdown table, one column per estimate, in GB (1e9 bytes) by default."""
    names = list(estimates)
    unit_name = "GB" if unit == GB else "MiB" if unit == 2**20 else f"x{unit:g} B"
    lines = [f"| {unit_name} | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for field_name in MemoryEstimate.FIELDS:
        cells = [f"{getattr(estimates[n], field_name) / unit:.2f}" for n in names]
        lines.append(f"| {field_name} | " + " | ".join(cells) + " |")
    lines.append("| peak set by | " + " | ".join(estimates[n].peak_phase for n in names) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class _Shapes:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layers: int
    tied: bool
    qkv_bias: bool

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """One decoder layer's parameters in named_parameters order (Llama/Mistral/Qwen2)."""
        h, i = self.hidden, self.intermediate
        tensors: list[tuple[str, tuple[int, ...]]] = [("q_proj", (self.q, h))]
        if self.qkv_bias:
            tensors.append(("q_proj.bias", (self.q,)))
        tensors.append(("k_proj", (self.kv, h)))
        if self.qkv_bias:
            tensors.append(("k_proj.bias", (self.kv,)))
        tensors.append(("v_proj", (self.kv, h)))
        if self.qkv_bias:
            tensors.append(("v_proj.bias", (self.kv,)))
        tensors += [("o_proj", (h, self.q)), ("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i)),
                    ("input_layernorm", (h,)), ("post_attention_layernorm", (h,))]
        return tensors

    def embedding_tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        tensors = [("embed_tokens", (self.vocab, self.hidden))]
        if not self.tied:
            tensors.append(("lm_head", (self.vocab, self.hidden)))
        return tensors

    def layer_params(self) -> int:
        return sum(math.prod(s) for _, s in self.layer_tensors())

    def embedding_params(self) -> int:
        return sum(math.prod(s) for _, s in self.embedding_tensors())

    def total_params(self) -> int:
        return self.layers * self.layer_params() + self.embedding_params() + self.hidden  # + final norm


def _shapes(config: Any) -> _Shapes:
    try:
        hidden = int(config.hidden_size)
        heads = int(config.num_attention_heads)
        shapes = _Shapes(
            hidden=hidden, intermediate=int(config.intermediate_size), heads=heads,
            kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or hidden // heads), vocab=int(config.vocab_size),
            layers=int(config.num_hidden_layers), tied=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=getattr(config, "model_type", "") == "qwen2" or bool(getattr(config, "attention_bias", False)))
    except (AttributeError, TypeError) as exc:
        raise UserInputError(f"--model_config: not a Llama/Mistral/Qwen2-style decoder config ({exc})") from None
    return shapes


# ---------------------------------------------------------------------------- activations


def _layer_saved(s: _Shapes, tokens: int, batch: int, seq: int, a: int, trainable: bool) -> int:
    """Bytes one decoder layer saves for backward, without checkpointing.

    From the forward (LlamaDecoderLayer, transformers 5, sdpa attention), autograd saving
    an input only when some gradient needs it: a linear saves its input only if its weight
    is trained, so a frozen layer (lisa/owlore's inactive ones) saves much less.
    - RMSNorm upcasts its input to fp32 and saves that copy (pow, mul by rsqrt): 4*T*h;
      the normalized value in the compute dtype for the norm weight's gradient and the
      output for the q/k/v (or gate/up) projections: a*T*h each when trained.
    - q and k: the projection output (saved by the mul with cos) and rotate_half of it
      (saved by the mul with sin) when trained; the rotated result always (sdpa saves it).
    - With a padding mask transformers expands k and v to every query head (repeat_kv)
      before sdpa, which saves q, k, v, its output and the fp32 log-sum-exp (flash-style
      kernels; no S x S matrix). Without GQA k, v are already that size.
    - o_proj's input is the transposed, contiguous copy of the attention output.
    - MLP: gate output (silu), silu(gate) and up (the product), the product (down_proj
      when trained).
    """
    h, i, q, kv = s.hidden, s.intermediate, s.q, s.kv
    norms = 2 * (FP32 * tokens * h + (2 * a * tokens * h if trainable else 0))
    rope = (2 * a * tokens * q + 2 * a * tokens * kv) if trainable else 0  # raw q, k and their rotate_half
    sdpa = 4 * a * tokens * q + FP32 * batch * s.heads * seq  # q, k, v (repeated to q heads), output, lse
    o_input = a * tokens * q if trainable else 0
    mlp = (4 if trainable else 3) * a * tokens * i
    return norms + rope + sdpa + o_input + mlp


def _layer_backward_temps(s: _Shapes, tokens: int, a: int) -> int:
    """Gradient tensors alive while one layer runs backward: the MLP's, the largest (grads of
    the product, of gate and of up: 3*a*T*i) and the incoming and outgoing hidden-state grads."""
    return 3 * a * tokens * s.intermediate + 2 * a * tokens * s.hidden


def _lora_layer_saved(s: _Shapes, tokens: int, a: int, targets: tuple, lora_r: int) -> int:
    """Bytes LoRA adapters add to what a frozen decoder layer saves (peft LoraLayer.forward,
    lora_dropout 0 so dropout is the identity): lora_A's input (the target's input; targets
    fed by the same tensor share it) and lora_B's input (lora_A's T x r output) per target.
    The frozen base linears save no input."""
    inputs = {"q_proj": ("attn_norm_out", s.hidden), "k_proj": ("attn_norm_out", s.hidden),
              "v_proj": ("attn_norm_out", s.hidden), "o_proj": ("attn_out", s.q),
              "gate_proj": ("mlp_norm_out", s.hidden), "up_proj": ("mlp_norm_out", s.hidden),
              "down_proj": ("mlp_product", s.intermediate)}
    shared = dict(inputs[t] for t in targets)
    return a * tokens * (sum(shared.values()) + len(targets) * lora_r)


def _activation_parts(s: _Shapes, micro_batch: int, block: int, a: int, checkpointing: bool,
                      trainable_layers: int, lm_head_trained: bool, lora_extra: int = 0,
                      offload_checkpoints: bool = False) -> tuple[int, int, int]:
    """Activations of one micro-batch in three parts: (held through backward, the loss'
    backward workspace, one layer's backward: its recompute and gradient temporaries).

    trainable_layers: how many decoder layers have trained weights (the others are frozen);
    lora_extra: bytes the adapters add to every (frozen) layer (_lora_layer_saved);
    offload_checkpoints: the layers' inputs wait in host memory (modeling.HostOffload)
    and only the one being recomputed is back on the device.
    """
    tokens = micro_batch * block
    shifted = micro_batch * (block - 1)
    frozen_layers = s.layers - trainable_layers
    per_trained = _layer_saved(s, tokens, micro_batch, block, a, True) + lora_extra
    per_frozen = _layer_saved(s, tokens, micro_batch, block, a, False) + lora_extra
    if checkpointing:
        # Non-reentrant checkpointing keeps each layer's input only; a layer's activations
        # exist again while it is recomputed in backward (a trained one is the larger).
        layers_saved = s.layers * a * tokens * s.hidden
        recompute = per_trained if trainable_layers else per_frozen
        if offload_checkpoints:
            layers_saved, recompute = 0, recompute + a * tokens * s.hidden
    else:
        layers_saved = trainable_layers * per_trained + frozen_layers * per_frozen
        recompute = 0
    # The model's own tensors: the 4-D boolean padding mask (B x 1 x S x S), rotary cos/sin.
    mask = micro_batch * block * block
    rotary = 2 * FP32 * block * s.head_dim
    # The final norm's saved tensors (fp32 input copy, normalized, output for lm_head when it
    # is trained) are freed by its own backward, before any layer's: part of the loss' phase.
    final_norm = FP32 * tokens * s.hidden + (2 * a * tokens * s.hidden if lm_head_trained else 0)
    # causal_lm_loss_sum keeps only a model-dtype copy of the shifted logits (the model's own
    # logits are freed once it is made) and recomputes each chunk's fp32 cross entropy in
    # backward. Its backward peaks at two model-dtype (tokens x vocab) tensors (the chunks'
    # gradients beside the copy, later their concatenation) plus one chunk's three fp32
    # tensors (upcast logits, log-softmax, gradient); measured within 5% on CPU at 4096
    # tokens x 32000 (bf16 940 MB measured, 917 predicted).
    chunk = min(LOSS_CHUNK_TOKENS, shifted)
    loss_workspace = final_norm + 2 * a * shifted * s.vocab + 3 * FP32 * chunk * s.vocab
    layer_phase = recompute + _layer_backward_temps(s, tokens, a)
    return layers_saved + mask + rotary, loss_workspace, layer_phase


def _activations(s: _Shapes, micro_batch: int, block: int, a: int, checkpointing: bool,
                 trainable_layers: int, lm_head_trained: bool, lora_extra: int = 0,
                 offload_checkpoints: bool = False) -> tuple[int, str]:
    """Peak activation bytes of one micro-batch: (bytes, what sets it)."""
    held, loss_workspace, layer_phase = _activation_parts(s, micro_batch, block, a, checkpointing,
                                                          trainable_layers, lm_head_trained, lora_extra,
                                                          offload_checkpoints)
    which = "loss backward (fp32 logits)" if loss_workspace >= layer_phase else "layer backward"
    return held + max(loss_workspace, layer_phase), which


# ---------------------------------------------------------------------------- DeepSpeed


def _reduce_bucket(s: _Shapes) -> int:
    """reduce_bucket_size as ds_config.fill sets "auto" (ds_configs/*.json): hidden^2 elements."""
    return s.hidden * s.hidden


# DeepSpeed 0.19 ZeRO-3 defaults (runtime/zero/config.py), which ds_configs/zero3.json keeps.
ZERO3_MAX_LIVE_PARAMETERS = 10**9
ZERO3_SUB_GROUP_SIZE = 10**9


def _zero3_gathered(s: _Shapes, w: int, live: int = ZERO3_MAX_LIVE_PARAMETERS) -> int:
    """Parameters ZeRO-3 holds gathered at once: the module it runs (fetched whole whatever
    the limit) plus what it prefetches or keeps for reuse, which stage3_max_live_parameters
    bounds (DeepSpeed 0.19 partitioned_param_coordinator: prefetch stops at the limit;
    parameters reused within stage3_max_reuse_distance stay, so that distance should not
    exceed the limit, as in ds_configs/zero3_bounded.json). At most the whole model."""
    largest_module = max(math.prod(shape) for _, shape in s.layer_tensors() + s.embedding_tensors())
    return w * min(s.total_params(), live + largest_module)


def _adamw_step_temps(numel: int, device: str) -> int:
    """torch.optim.AdamW on one flat fp32 tensor: on CPU the single-tensor path builds
    exp_avg_sq.sqrt() and its division by the bias correction (2 temporaries); on CUDA the
    foreach path keeps one (sqrt, then divided and added in place)."""
    return (2 if device == "cpu" else 1) * FP32 * numel


# ---------------------------------------------------------------------------- methods


def _check(method: str, world_size: int, zero_stage: int, precision: str, micro_batch_size: int, block_size: int,
           master_weights: str, galore_rank: int, lisa_activated_layers: int, lora_r: int, device: str) -> None:
    if method not in METHODS:
        raise UserInputError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    if world_size < 1:
        raise UserInputError(f"--world_size {world_size}: expected at least 1")
    if zero_stage not in (0, 1, 2, 3):
        raise UserInputError(f"--zero_stage {zero_stage}: expected 0, 1, 2 or 3")
    if precision not in PRECISIONS:
        raise UserInputError(f"--precision {precision!r}: expected bf16 or fp32")
    if micro_batch_size < 1:
        raise UserInputError(f"--micro_batch_size {micro_batch_size}: expected at least 1")
    if block_size < 2:
        raise UserInputError(f"--block_size {block_size}: expected at least 2")
    if master_weights not in MASTER_POLICIES:
        raise UserInputError(f"--master_weights {master_weights!r}: expected one of {', '.join(MASTER_POLICIES)}")
    if galore_rank < 1:
        raise UserInputError(f"--galore_rank {galore_rank}: expected at least 1")
    if lisa_activated_layers < 1:
        raise UserInputError(f"--lisa_activated_layers {lisa_activated_layers}: expected at least 1")
    if lora_r < 1:
        raise UserInputError(f"--lora_r {lora_r}: expected at least 1")
    if device not in RUNTIME_OVERHEAD:
        raise UserInputError(f"--device {device!r}: expected one of {', '.join(RUNTIME_OVERHEAD)}")


def estimate(config, method: str, *, world_size: int = 1, zero_stage: int = 2, precision: str = "bf16",
             micro_batch_size: int = 1, block_size: int = 512, gradient_checkpointing: bool = True,
             lisa_activated_layers: int = 2, galore_rank: int = 256, master_weights: str = "fp32",
             freeze_embeddings: bool = False, lora_r: int = 8, lora_target_modules: tuple = ("q_proj", "v_proj"),
             offload: bool = False, device: str = "cuda", reduce_dtype: str = "fp32",
             zero3_max_live_parameters: int = ZERO3_MAX_LIVE_PARAMETERS,
             gradient_accumulation_steps: int = 1, update_in_backward: bool = False,
             galore_svd: str = "randomized", offload_checkpoints: bool = False) -> MemoryEstimate:
    """Per-device bytes of one training run of `method` on a Hugging Face decoder `config`.

    `device` ("cuda" or "cpu") decides the two things that differ between them: torch
    AdamW's temporaries (foreach on CUDA, single-tensor on CPU) and the fixed runtime
    overhead (RUNTIME_OVERHEAD, plus CPU_BF16_KERNELS for bf16 on CPU). `offload` models
    ZeRO-Offload of the optimizer (state and master weights on the host, not counted on the
    device).
    """
    _check(method, world_size, zero_stage, precision, micro_batch_size, block_size, master_weights, galore_rank,
           lisa_activated_layers, lora_r, device)
    if reduce_dtype not in PRECISIONS:
        raise UserInputError(f"--reduce_dtype {reduce_dtype!r}: expected fp32 or bf16")
    if gradient_accumulation_steps < 1:
        raise UserInputError(f"--gradient_accumulation_steps {gradient_accumulation_steps}: expected at least 1")
    if galore_svd not in ("exact", "randomized"):
        raise UserInputError(f"--galore_svd {galore_svd!r}: expected exact or randomized")
    offload_checkpoints = offload_checkpoints and gradient_checkpointing
    s = _shapes(config)
    if method in LAYERWISE:
        result = _layerwise(s, method, world_size, zero_stage, precision, micro_batch_size, block_size,
                            gradient_checkpointing, lisa_activated_layers, galore_rank, master_weights,
                            freeze_embeddings, device, PRECISIONS[reduce_dtype], zero3_max_live_parameters,
                            gradient_accumulation_steps, update_in_backward, galore_svd, offload_checkpoints)
    elif method in ("lomo", "adalomo"):
        result = _lomo(s, method, world_size, zero_stage, precision, micro_batch_size, block_size,
                       gradient_checkpointing, device, zero3_max_live_parameters, offload_checkpoints)
    else:
        result = _deepspeed_adamw(s, method, world_size, zero_stage, precision, micro_batch_size, block_size,
                                  gradient_checkpointing, lora_r, tuple(lora_target_modules), offload, device,
                                  zero3_max_live_parameters, offload_checkpoints)
    if device == "cpu" and zero_stage == 3:
        # Loading on CPU under zero.Init (HfDeepSpeedConfig): from_pretrained copies each
        # tensor of the memory-mapped checkpoint into this rank's partition, and the file's
        # pages stay resident until the state dict is dropped. A GPU holds only the partitions.
        total = s.total_params()
        load = total * PRECISIONS[precision] + math.ceil(total / world_size) * PRECISIONS[precision]
        if method == "lora":
            load += math.ceil(_lora_params(s, lora_r, tuple(lora_target_modules)) / world_size) * PRECISIONS[precision]
    else:
        load = 0
    result.runtime_overhead = RUNTIME_OVERHEAD[device]
    result.runtime_overhead += CPU_BF16_KERNELS if device == "cpu" and precision == "bf16" else 0
    result.peak += result.runtime_overhead
    # The load comes before the engine, autograd and the first step touch what
    # RUNTIME_OVERHEAD stands for, so it is compared without it.
    if load > result.peak:
        result.peak, result.peak_phase = load, "model load (CPU, ZeRO-3)"
    return result


def _lora_params(s: _Shapes, lora_r: int, targets: tuple) -> int:
    """peft's adapters: A (r x in) and B (out x r), no bias, on every target of every layer."""
    dims = dict((name, shape) for name, shape in s.layer_tensors())
    unknown = [t for t in targets if t not in dims or len(dims[t]) != 2]
    if unknown:
        raise UserInputError(f"--lora_target_modules: {', '.join(unknown)} is not a linear of this architecture")
    return s.layers * sum(lora_r * (dims[t][0] + dims[t][1]) for t in targets)


def _deepspeed_adamw(s: _Shapes, method: str, n: int, stage: int, precision: str, micro: int, block: int,
                     checkpointing: bool, lora_r: int, targets: tuple, offload: bool, device: str,
                     live: int = ZERO3_MAX_LIVE_PARAMETERS, offload_checkpoints: bool = False) -> MemoryEstimate:
    """full (every parameter) and lora (the adapters): torch AdamW driven by DeepSpeed's ZeRO.

    ZeRO-1/2 flatten the trained params and keep an fp32 copy of this rank's 1/N partition
    even when the model is fp32 (stage_1_and_2.py clones it); ZeRO-3 keeps a separate fp32
    partition only when the weights are not fp32 already (stage3.py reuses the buffer).
    """
    w = PRECISIONS[precision]
    total = s.total_params()
    if method == "lora":
        trained = _lora_params(s, lora_r, targets)
    else:
        trained = total
    if stage == 0:
        raise UserInputError("--zero_stage 0: full and lora run under DeepSpeed ZeRO 1, 2 or 3")
    part = math.ceil(trained / n)  # this rank's flat partition (alignment padding is a few elements)
    est = MemoryEstimate()
    est.notes.append(f"{trained / 1e9:.3f}B trained parameters of {total / 1e9:.3f}B")
    if stage == 3:
        est.weights = math.ceil((total + (trained if method == "lora" else 0)) / n) * w
        # Gathered parameters stay gathered while their reuse distance is below
        # stage3_max_reuse_distance (default 1e9), up to stage3_max_live_parameters (default
        # 1e9): with the defaults of ds_configs/zero3.json up to 1e9 parameters stay live,
        # through the step too. Plus the reduce bucket (ipg buffer, contiguous_gradients).
        est.comm_buffers = _zero3_gathered(s, w, live) + _reduce_bucket(s) * w
        # grad_partitions_flat_buffer (1/N, kept between steps); at the step each sub-group
        # (stage3 sub_group_size, default 1e9) is flattened into a new fp32 tensor.
        persistent_grads = part * w
        sub_group = min(part, ZERO3_SUB_GROUP_SIZE)
        step_grads = persistent_grads + FP32 * sub_group
        master = 0 if w == FP32 else FP32 * part
    else:
        est.weights = (total + (trained if method == "lora" else 0)) * w
        est.comm_buffers = _reduce_bucket(s) * w  # contiguous_gradients: the ipg bucket
        master = FP32 * part
        if stage == 2:
            persistent_grads = 0
            # grads_in_partition (this rank's 1/N, model dtype); in fp32 the flat fp32 gradient
            # the optimizer steps on is a view of it, in bf16 a converted copy.
            step_grads = part * w + (FP32 * part if w != FP32 else 0)
        else:  # stage 1: every gradient is kept whole until the step, then its partition flattened
            persistent_grads = 0
            step_grads = trained * w + FP32 * part
    moments = 2 * FP32 * part
    step_tensor = FP32  # torch AdamW's per-param "step" (one flat param group)
    est.optimizer_state_bytes = 0 if offload else master + moments + step_tensor
    est.master_weights = 0 if offload else master
    est.optimizer_state = 0 if offload else moments + step_tensor
    est.gradients = step_grads
    # AdamW steps one flat tensor at a time: this rank's partition, or one ZeRO-3 sub-group.
    est.step_workspace = 0 if offload else _adamw_step_temps(min(part, ZERO3_SUB_GROUP_SIZE) if stage == 3 else part,
                                                             device)
    if method == "lora":
        # Base weights, norms and lm_head frozen: every layer saves what a frozen one does,
        # plus what its adapters save (_lora_layer_saved).
        acts, which = _activations(s, micro, block, w, checkpointing, trainable_layers=0, lm_head_trained=False,
                                   lora_extra=_lora_layer_saved(s, micro * block, w, targets, lora_r),
                                   offload_checkpoints=offload_checkpoints)
    else:
        acts, which = _activations(s, micro, block, w, checkpointing, trainable_layers=s.layers,
                                   lm_head_trained=True, offload_checkpoints=offload_checkpoints)
    est.activations = acts
    state = est.master_weights + est.optimizer_state
    backward = est.weights + state + persistent_grads + est.comm_buffers + acts
    step = est.weights + state + step_grads + est.step_workspace + (est.comm_buffers if stage == 3 else 0)
    est.peak, est.peak_phase = max((backward, f"backward: {which}"), (step, "step"))
    return est


def _tensor_numels(s: _Shapes) -> list[int]:
    numels = [math.prod(shape) for _ in range(s.layers) for _, shape in s.layer_tensors()]
    return numels + [math.prod(shape) for _, shape in s.embedding_tensors()] + [s.hidden]


def _weights_per_rank(s: _Shapes, world_size: int, zero_stage: int, dtype_bytes: int) -> int:
    if zero_stage < 3:
        return dtype_bytes * s.total_params()
    return dtype_bytes * sum(math.ceil(n / world_size) for n in _tensor_numels(s))


def layerwise_weight_bytes(config: Any, world_size: int, zero_stage: int, dtype_bytes: int) -> int:
    """Weight bytes one rank holds between steps under the layerwise optimizer: the whole model
    (stage 0), or under ZeRO-3 its partition of every tensor (ceil(numel / N)). What DeepSpeed
    gathers for forward and backward (the small persistent tensors too) is released after each
    backward and counted as comm_buffers."""
    return _weights_per_rank(_shapes(config), world_size, zero_stage, dtype_bytes)


def _layerwise_plan(s: _Shapes, n: int, active: int, freeze_embeddings: bool):
    """The owners of a fresh interval's items, from layerwise/plan.py itself: (shapes of the
    active layer tensors, their owners, numels of the always-trained tensors)."""
    from owlore_ds.layerwise.plan import assign_owners

    sizes, shapes = {}, {}
    for layer in range(active):
        for name, shape in s.layer_tensors():
            key = f"model.layers.{layer}.{name}"
            sizes[key], shapes[key] = math.prod(shape), shape
    always = [] if freeze_embeddings else [math.prod(shape) for _, shape in s.embedding_tensors()]
    always.append(s.hidden)  # the final norm
    return shapes, assign_owners(sizes, n), always


def _owned_numels(s: _Shapes, n: int, active: int, freeze_embeddings: bool) -> list[int]:
    from owlore_ds.layerwise.plan import chunk_bounds

    shapes, owners, always = _layerwise_plan(s, n, active, freeze_embeddings)
    owned = [0] * n
    for key, owner in owners.items():
        owned[owner] += math.prod(shapes[key])
    for numel in always:
        for r, (lo, hi) in enumerate(chunk_bounds(numel, n)):
            owned[r] += hi - lo
    return owned


def _gradients_in_flight(n: int, bucket_elements: int, reduce_bytes: int) -> int:
    """The reducer's buckets (layerwise/comm.py): half of reduce_bucket_size fills while the
    other half is reduced (larger gradients are cut into pieces), one budget in all."""
    return 0 if n == 1 else reduce_bytes * bucket_elements


def layerwise_gradient_bytes(config: Any, world_size: int, active_layers: int, bucket_elements: int,
                             reduce_bytes: int = FP32, freeze_embeddings: bool = False) -> tuple[int, int, int]:
    """Gradient bytes a rank holds between backward and the step under the layerwise optimizer:
    (the largest owned share, in fp32 accumulators; the most the buckets in flight add; what
    keeping every trained tensor's fp32 gradient, as before reduction-in-backward, would be)."""
    s = _shapes(config)
    owned = max(_owned_numels(s, world_size, active_layers, freeze_embeddings))
    trained = active_layers * s.layer_params() + (0 if freeze_embeddings else s.embedding_params()) + s.hidden
    return FP32 * owned, _gradients_in_flight(world_size, bucket_elements, reduce_bytes), FP32 * trained


def _layerwise(s: _Shapes, method: str, n: int, stage: int, precision: str, micro: int, block: int,
               checkpointing: bool, gamma: int, galore_rank: int, master_weights: str, freeze_embeddings: bool,
               device: str, reduce_bytes: int = FP32, live: int = ZERO3_MAX_LIVE_PARAMETERS,
               accumulation: int = 1, update_in_backward: bool = False, galore_svd: str = "exact",
               offload_checkpoints: bool = False) -> MemoryEstimate:
    """lisa, galore, owlore: owlore_ds/layerwise/ at DeepSpeed stage 0 (weights replicated) or 3.

    Per rank: the weights (all, or the ZeRO-3 partitions),
    the owned items' state (LayerwiseOptimizer.state_bytes: fp32 master when the weights are
    bf16 and --master_weights fp32, AdamW moments or GaLore moments+projector), the owned
    share of the gradients (in fp32 accumulators; on one rank with one micro-batch per step
    the gradients as autograd made them) plus the reduction buckets in flight (each gradient
    is reduced to its owner inside backward and dropped), and under ZeRO-3 the parameters
    DeepSpeed keeps gathered through forward and backward.
    """
    from owlore_ds.galore import optimizer_state_bytes_for_shape
    from owlore_ds.layerwise.plan import chunk_bounds
    from owlore_ds.layerwise.rules import ADAMW_CHUNK, norm_workspace_numel

    w = PRECISIONS[precision]
    est = MemoryEstimate()
    if stage in (1, 2):
        est.notes.append(f"ZeRO-{stage} runs as stage 0 (ds_config.for_layerwise): weights replicated")
    active = s.layers if method == "galore" else min(gamma, s.layers)
    low_rank = method in ("galore", "owlore")
    master = w != FP32 and master_weights == "fp32"
    # pure_bf16: moments and projectors in the weights' dtype, updated in it (no fp32 copies)
    pure = w != FP32 and master_weights == "pure_bf16"
    state_bytes = w if pure else FP32

    def item_state(shape: tuple[int, ...]) -> int:
        numel = math.prod(shape)
        base = FP32 * numel if master else 0
        if low_rank and len(shape) == 2:
            return base + optimizer_state_bytes_for_shape(shape, galore_rank, "std", dtype_bytes=state_bytes)
        return base + 2 * state_bytes * numel

    shapes, owners, always = _layerwise_plan(s, n, active, freeze_embeddings)
    per_rank = [0] * n
    owned_numel = [0] * n
    for key, owner in owners.items():
        per_rank[owner] += item_state(shapes[key])
        owned_numel[owner] += math.prod(shapes[key])
    for numel in always:  # always-trained tensors: chunk r (ZeRO-3's partition) on rank r
        for r, (lo, hi) in enumerate(chunk_bounds(numel, n)):
            c = hi - lo
            per_rank[r] += c * (2 * state_bytes + (FP32 if master else 0))
            owned_numel[r] += c
    heaviest = max(range(n), key=lambda r: (per_rank[r], r))
    est.optimizer_state_bytes = max(per_rank)
    est.master_weights = FP32 * owned_numel[heaviest] if master else 0
    est.optimizer_state = per_rank[heaviest] - est.master_weights

    est.weights = _weights_per_rank(s, n, stage, w)
    # Owned share in fp32 accumulators (on one rank an fp32 gradient is kept as it is) and the
    # buckets in flight; besides them the one gradient autograd has made and the hook not yet
    # taken, which depends on the moment (below).
    # GradientReducer._accumulate keeps a single micro-batch's whole gradient as it came (on
    # N > 1 ranks the owner's reduced pieces are summed into fp32, the reduce dtype's default).
    accumulator_bytes = w if n == 1 and accumulation == 1 else FP32

    def item_workspace(numel: int, shape: tuple[int, ...], whole_matrix: bool) -> int:
        """The update of one item: AdamW's one temporary (sqrt, then divided and shifted in
        place; a pass of rules.ADAMW_CHUNK elements at a time), plus with bf16 weights not
        pure_bf16 the fp32 copy of the weights (without a master); GaLore: the full-size update projected back, and at a projector refresh the
        SVD of the matrix. Under ZeRO-3 the owner gathers a whole matrix (the partitions and
        their concatenation) and scatters it back (padded copy and partition). Not pure_bf16,
        _update works on an fp32 copy of a gradient kept in bf16."""
        if low_rank and len(shape) == 2:
            workspace = _galore_workspace(shape, galore_rank, w != FP32 and not master, state_bytes, galore_svd)
        else:
            workspace = (state_bytes * min(numel, ADAMW_CHUNK)  # the denominator, a pass at a time
                         + (FP32 * numel if w != FP32 and not master and not pure else 0))
        workspace += 0 if pure else (FP32 - accumulator_bytes) * numel
        return workspace + (3 * w * numel if stage == 3 and whole_matrix else 0)

    def rank_items(r: int) -> list[tuple[int, tuple[int, ...], bool]]:
        """(numel, shape, whole matrix) of rank r's items in LayerwiseOptimizer.items() order:
        the always-trained chunks, then the active layers' tensors."""
        order = [(hi - lo, (hi - lo,), False) for numel in always
                 for rank, (lo, hi) in enumerate(chunk_bounds(numel, n)) if rank == r]
        return order + [(math.prod(shapes[k]), shapes[k], True) for k in shapes if owners[k] == r]

    # LayerwiseOptimizer.step updates a rank's items in order and drops each summed gradient
    # once its item is updated, so beside an item's temporaries are its own gradient and those
    # of the items after it, not the whole owned share. pure_bf16: _update rounds the item's
    # gradient to bf16 and the fp32 sum goes with it (step pops it from its dict into the
    # call, so _update's `grad` was the last reference; on CPU the fp32 gradient of a 4096 x
    # 1536 item was measured gone, its bf16 copy there, when its SVD began).
    def step_moment(r: int) -> tuple[int, int]:
        """(gradient and temporary bytes at rank r's worst item, that item's temporaries)."""
        order = rank_items(r)
        left = accumulator_bytes * sum(numel for numel, _, _ in order)
        worst = (0, 0)
        for numel, shape, whole in order:
            held = left - (accumulator_bytes - w) * numel if pure else left
            workspace = item_workspace(numel, shape, whole)
            worst = max(worst, (held + workspace, workspace))
            left -= accumulator_bytes * numel
        return worst

    # Owned share in its accumulators and the buckets in flight; besides them the one gradient
    # autograd has made and the hook not yet taken, which depends on the moment (below).
    # bf16 gradients are normed through an fp32 slab the optimizer keeps (rules.NORM_SLAB),
    # there from the first step's norm on.
    norm_slab = 0 if accumulator_bytes == FP32 else FP32 * max(
        norm_workspace_numel(numel) for r in range(n) for numel, _, _ in rank_items(r))
    in_backward = update_in_backward and accumulation == 1
    if in_backward:
        # Each item is updated and its gradient freed once complete: on one rank at once; on
        # more when the piece completing it is taken from the reduced bucket, before the next
        # item's sum is made (comm.GradientReducer._complete): one item's sum at a time.
        # On one rank with one micro-batch the item's sum is the gradient autograd made (the
        # moments' fresh gradient below), taken, updated and freed in its hook: nothing more.
        items = [item for r in range(n) for item in rank_items(r)]
        largest_owned = max(numel for numel, _, _ in items)
        accumulated = 0 if n == 1 else accumulator_bytes * largest_owned
        step, est.step_workspace = 0, max(item_workspace(*item) for item in items)
    else:
        accumulated = accumulator_bytes * max(owned_numel)
        step, est.step_workspace = max((est.weights + per_rank[r] + norm_slab + held, workspace)
                                       for r, (held, workspace) in enumerate(map(step_moment, range(n))))
    accumulated += _gradients_in_flight(n, _reduce_bucket(s), reduce_bytes) + norm_slab
    largest_layer_item = max(math.prod(shape) for shape in shapes.values()) if shapes else 0
    # Three moments of backward (as _lomo): the loss' (the final norm's and logits' tensors,
    # no parameter gradient yet), a layer's (its recompute and temporaries, one of its
    # gradients) and lm_head's or the embeddings' gradient after the layers' activations.
    held, loss_workspace, layer_phase = _activation_parts(s, micro, block, w, checkpointing, trainable_layers=active,
                                                          lm_head_trained=not freeze_embeddings,
                                                          offload_checkpoints=offload_checkpoints)
    moments = [(loss_workspace, 0, "backward: loss backward (fp32 logits)"),
               (layer_phase, w * largest_layer_item, "backward: layer backward"),
               (0, w * max(always), "backward: lm_head/embedding gradient")]
    extra_acts, fresh_gradient, which = max(moments, key=lambda m: (m[0] + m[1], m[0]))
    est.activations = held + extra_acts
    est.gradients = accumulated + fresh_gradient
    est.comm_buffers = _zero3_gathered(s, w, live) if stage == 3 and n > 1 else 0
    state = est.master_weights + est.optimizer_state
    backward = est.weights + state + est.gradients + est.comm_buffers + est.activations
    if in_backward:  # the updates, and their workspace, happen inside backward; the step holds nothing more
        est.peak, est.peak_phase = backward + est.step_workspace, which + " + update"
        return est
    est.peak, est.peak_phase = max((backward, which), (step, "step"))
    return est


def _galore_workspace(shape: tuple[int, int], rank: int, bf16_no_master: bool, dtype_bytes: int = FP32,
                      svd: str = "exact") -> int:
    """Temporaries of galore_adamw_step on one m x n matrix, at a projector refresh (step 1
    and every update_proj_gap steps, which is when the peak falls).

    torch.linalg.svd(G, full_matrices=False) returns U (m x k), S (k), Vh (k x n), k=min(m,n),
    and LAPACK's gesdd works on a copy of G with a workspace of about 4k^2 + 7k more (its
    documented lwork for JOBZ='S' with m >> n is 4k^2 + 7k plus the copy). With pure_bf16 the
    gradient is bf16 and compute_projector runs the SVD on its fp32 copy (grad.to(float32)),
    which lives beside the SVD's own: one more fp32 m x n on every device (measured on CPU:
    the projector of a bf16 4096 x 1536 gradient peaks 24.0 MiB above that of an fp32 one).
    svd="randomized" (galore._top_singular_vectors' range finder, width w = r + oversampling)
    never factors the m x n matrix: beside the fp32 copy (pure_bf16) it holds the Gaussian
    test matrix (n x w), two m x w and two n x w products of the power iterations with their
    QR factors, and the SVD of the small w x n matrix (its copy, Vh and gesdd's 4w^2 + 7w).
    Then the update: the projected gradient and the normalized step (moment-sized), and the
    full m x n update projected back.
    """
    m, n = shape
    k = min(m, n)
    r = min(rank, m, n)
    pure = dtype_bytes != FP32  # pure_bf16: the update in bf16, no fp32 copy of the weights
    if svd == "randomized":
        from owlore_ds.galore import OVERSAMPLE

        width = min(r + OVERSAMPLE, m, n)
        svd = FP32 * ((m * n if pure else 0) + n * width + 2 * m * width + 2 * n * width
                      + 2 * width * n + 4 * width * width + 7 * width)
    else:
        svd = FP32 * ((2 if pure else 1) * m * n + m * k + k + k * n + 4 * k * k + 7 * k)
    moment = (m * r) if m >= n else (r * n)
    update = dtype_bytes * (2 * moment + m * n) + (FP32 * m * n if bf16_no_master and not pure else 0)
    return max(svd, update)


def _fused_update_bytes(method: str, numel: int, w: int) -> int:
    """Bytes one parameter's gradient and the update's temporaries take inside its
    post-accumulate-grad hook (fused.FusedUpdate._on_gradient), the largest moment:
    - the gradient autograd made, w bytes per element: p.grad is dropped, but
      AccumulateGrad.apply keeps its own reference until the hook returns;
    - its fp32 copy (bf16 only: for fp32 .to(float32) is the same tensor), all-reduced in place;
    - lomo: grad.pow(2) for the norm (then the update adds the fp32 copy of bf16 weights,
      after that temporary is gone): one fp32 tensor;
    - adalomo (_adalomo): `squares` and `update` live together, and for bf16 the fp32 copy
      of the weights that sets the step size: two fp32 tensors, three for bf16.
    The norm-measuring pass of --max_grad_norm > 0 holds the first two and the pow: no more.
    """
    held = w * numel + (FP32 * numel if w != FP32 else 0)
    if method == "lomo":
        return held + FP32 * numel
    return held + 2 * FP32 * numel + (FP32 * numel if w != FP32 else 0)


def _lomo(s: _Shapes, method: str, n: int, stage: int, precision: str, micro: int, block: int,
          checkpointing: bool, device: str, live: int = ZERO3_MAX_LIVE_PARAMETERS,
          offload_checkpoints: bool = False) -> MemoryEstimate:
    """lomo / adalomo (owlore_ds/fused.py): the update fused into backward, each gradient freed
    in its own hook, so a full set of gradients never exists.

    DeepSpeed runs them without an optimizer (ds_config.for_fused): ZeRO-1/2 become stage 0
    (weights replicated, no buckets, no flat buffers), ZeRO-3 partitions the weights and
    gathers them for forward and backward (released after backward). adalomo keeps fp32 row
    and column factors per 2-D parameter and an fp32 vector per 1-D one, of the full shapes,
    on every rank (also under ZeRO-3). The peak is one of three moments of backward: the
    loss' (no parameter gradient yet), a decoder layer's (its recompute and gradients, plus
    the hook of its largest weight) and lm_head's/the embeddings' hook.
    """
    w = PRECISIONS[precision]
    est = MemoryEstimate()
    layer_largest = max(math.prod(shape) for _, shape in s.layer_tensors())
    embedding_largest = max(math.prod(shape) for _, shape in s.embedding_tensors())
    tensors = [shape for _, shape in s.layer_tensors()] * s.layers + [shape for _, shape in s.embedding_tensors()]
    tensors.append((s.hidden,))
    if stage == 3:
        est.weights = math.ceil(s.total_params() / n) * w
        # On one rank DeepSpeed 0.19 gathers nothing (all_gather_coalesced -> NoGatherHandle:
        # param.data becomes a view of ds_tensor); on more, every parameter stays gathered
        # through forward and backward (stage3_max_live_parameters) until release_gathered.
        est.comm_buffers = _zero3_gathered(s, w, live) if n > 1 else 0
    else:
        est.weights = s.total_params() * w
        est.notes.append(f"ZeRO-{stage} runs as stage 0 (ds_config.for_fused): weights replicated")
    if method == "adalomo":
        est.optimizer_state = FP32 * sum(shape[0] + shape[1] if len(shape) == 2 else shape[0] for shape in tensors)
    est.optimizer_state_bytes = est.optimizer_state
    held, loss_workspace, layer_phase = _activation_parts(s, micro, block, w, checkpointing,
                                                          trainable_layers=s.layers, lm_head_trained=True,
                                                          offload_checkpoints=offload_checkpoints)
    layer_update = _fused_update_bytes(method, layer_largest, w)
    embedding_update = _fused_update_bytes(method, embedding_largest, w)
    moments = [(loss_workspace, 0, "backward: loss backward (fp32 logits)"),
               (layer_phase, layer_update, "backward: layer backward + fused update"),
               (0, embedding_update, "backward: lm_head/embedding fused update")]
    extra_acts, est.gradients, est.peak_phase = max(moments, key=lambda m: (m[0] + m[1], m[0]))
    est.activations = held + extra_acts
    est.peak = est.weights + est.optimizer_state + est.comm_buffers + est.activations + est.gradients
    return est
