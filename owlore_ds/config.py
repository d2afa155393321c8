"""All training options in one place: a dataclass, its command line and its YAML file.

Flag names follow Hugging Face / LMFlow so existing scripts carry over. A YAML file
given with ``--config`` may hold the same keys; flags given on the command line win.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import yaml

from owlore_ds.errors import UserInputError

# The small model the project pre-trains itself (tools/pretrain_embedded.py): the default
# --model_name_or_path, so everything runs on a machine with no model hub.
EMBEDDED_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "shakespeare-llama")

METHODS = ("full", "lisa", "owlore", "galore", "lomo", "adalomo", "lora")
LAYERWISE_METHODS = ("lisa", "owlore", "galore")
FUSED_METHODS = ("lomo", "adalomo")  # the update runs inside backward (owlore_ds/fused.py)
PROB_MODES = ("uniform", "owl", "owl_reverse", "increase", "decrease")
SCHEDULERS = ("constant", "linear", "cosine")
REPORT_TO = ("none", "tensorboard", "wandb")
PACKING_ATTENTION = ("causal", "document")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
# With bf16 weights (lisa, owlore, galore): fp32 master copies; none (bf16 weights updated
# in fp32 and rounded back, fp32 moments); pure_bf16 (weights, moments and projectors in
# bf16, updated in bf16 as torch AdamW and galore-torch do on a bf16 model: the reference).
MASTER_POLICIES = ("fp32", "none", "pure_bf16")
OWL_THRESHOLD_M = 5.0  # --owl_threshold_m and --owl_nsamples when not given
OWL_NSAMPLES = 128


@dataclass
class TrainConfig:
    # Model and data
    model_name_or_path: str = field(default=EMBEDDED_MODEL, metadata={
        "help": "local Hugging Face model folder (default: the embedded models/shakespeare-llama)"})
    dataset_path: Optional[str] = field(default=None, metadata={
        "help": "LMFlow JSON, .jsonl/.json/.parquet, a folder, or the prefix P of a Megatron indexed dataset (P.idx + P.bin)"})
    data_mix: Optional[str] = field(default=None, metadata={
        "help": "a blend of indexed datasets, \"P1:0.7,P2:0.3\" (instead of --dataset_path)"})
    output_dir: Optional[str] = field(default=None, metadata={"help": "where checkpoints, metrics and final/ go"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "start over in an output dir holding another run"})
    block_size: int = field(default=512, metadata={"help": "tokens per example"})
    cache_dir: str = field(default="~/.cache/owlore_ds", metadata={"help": "tokenized-data cache"})
    no_shuffle: bool = field(default=False, metadata={"help": "train on examples in file order"})
    packing: bool = field(default=False, metadata={
        "help": "SFT examples packed several to a block in data order, loss on targets only, no attention across examples"})
    packing_attention: str = field(default="causal", metadata={
        "help": "indexed or --streaming data: causal (one stream) or document (positions restart, no attention "
                "across documents)"})
    streaming: bool = field(default=False, metadata={
        "help": "read --dataset_path (a datasets folder from save_to_disk, or .jsonl/.parquet/.txt files) while "
                "training: tokenized as tools/preprocess_data.py does, packed into windows; needs --max_steps"})
    text_key: str = field(default="text", metadata={"help": "with --streaming: the column / key holding the text"})
    streaming_shuffle_windows: int = field(default=1000, metadata={
        "help": "with --streaming: windows are shuffled within consecutive chunks of this many windows"})

    # Schedule
    method: str = field(default="full", metadata={"help": f"one of {', '.join(METHODS)}"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; overrides num_train_epochs when > 0"})
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler_type: str = field(default="linear", metadata={"help": f"one of {', '.join(SCHEDULERS)}"})
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    max_grad_norm: float = field(default=1.0, metadata={"help": "global-norm clipping; 0 turns it off"})
    seed: int = 42

    # Precision and memory
    bf16: bool = field(default=False, metadata={"help": "bf16 weights and compute (fp32 master weights)"})
    fp32: bool = field(default=False, metadata={"help": "fp32 everywhere (the default)"})
    gradient_checkpointing: bool = False
    attn_implementation: str = field(default="sdpa", metadata={
        "help": "sdpa (torch's fused attention), eager, or flash_attention_2 (needs the flash-attn package and a GPU)"})
    offload_checkpoints: bool = field(default=False, metadata={
        "help": "with --gradient_checkpointing: each layer's saved input waits in pinned host memory until its "
                "recompute (as DeepSpeed's cpu_checkpointing), so the device holds one layer's, not every layer's"})
    deepspeed: Optional[str] = field(default=None, metadata={"help": "DeepSpeed JSON config (default: ZeRO-2)"})

    # Checkpoints and logging
    save_steps: int = field(default=500, metadata={"help": "checkpoint every N optimizer steps; 0 saves only at the end"})
    save_total_limit: Optional[int] = field(default=None, metadata={"help": "keep at most N checkpoints"})
    export_max_shard_size: str = field(default="5GB", metadata={
        "help": "largest safetensors shard of OUT/final (as save_pretrained's max_shard_size); the ranks write "
                "the shards in turn"})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={"help": "'auto' or a checkpoint folder"})
    logging_steps: int = field(default=10, metadata={"help": "console log every N steps (metrics.jsonl has every step)"})
    report_to: str = field(default="none", metadata={"help": f"one of {', '.join(REPORT_TO)}"})

    # Layer sampling (lisa, owlore); names as in the OwLore reference implementation
    lisa_activated_layers: int = field(default=5, metadata={"help": "layers trained at a time (gamma)"})
    lisa_interval_steps: int = field(default=50, metadata={"help": "optimizer steps between resamplings (K)"})
    lisa_prob_mode: Optional[str] = field(default=None, metadata={
        "help": f"one of {', '.join(PROB_MODES)}; default uniform for lisa, owl for owlore"})
    outlier_ratios: Optional[str] = field(default=None, metadata={
        "help": "OWL ratio file from tools/compute_outliers.py; computed and cached in OUT if absent"})
    # None: not given. Computed ratios then use the defaults below, and a given --outlier_ratios
    # file is checked only against the settings the user gave.
    owl_threshold_m: Optional[float] = field(default=None, metadata={
        "help": "outlier threshold M (times the layer mean; default 5)"})
    owl_nsamples: Optional[int] = field(default=None, metadata={
        "help": "calibration windows for outlier ratios (default 128)"})
    owl_seqlen: Optional[int] = field(default=None, metadata={"help": "calibration window length (default block_size)"})
    freeze_embeddings: bool = field(default=False, metadata={"help": "do not train embeddings and lm_head"})
    # projectors and randomized by docs/policies.md's figures: at K = 1 the same or better loss
    # with 18x fewer SVDs, and a randomized refresh 13-21x faster at 7B shapes at equal quality.
    inactive_state: str = field(default="projectors", metadata={
        "help": "state of layers that leave the active set: projectors (only GaLore's projectors kept on "
                "CPU, so a returning layer needs no new SVD), free, or offload (everything kept on CPU)"})
    galore_spread_refreshes: bool = field(default=False, metadata={
        "help": "stagger the SVD refreshes of a layer's matrices over the gap (changes when each refreshes)"})
    master_weights: str = field(default="fp32", metadata={
        "help": "with --bf16 in lisa/owlore/galore: fp32 (master copies), none (fp32 moments only) or "
                "pure_bf16 (bf16 moments, as the reference)"})
    reduce_dtype: str = field(default="fp32", metadata={
        "help": "lisa/owlore/galore: dtype of the gradient reduction to owners, fp32 or bf16 (half the traffic)"})
    update_in_backward: bool = field(default=False, metadata={
        "help": "lisa/owlore/galore: update each owned tensor as soon as its reduced gradient is complete "
                "(last micro-batch's backward) and free it; needs --max_grad_norm 0"})
    galore: bool = field(default=False, metadata={"help": "with --method lisa: the reference's switch for owlore"})
    galore_rank: int = 256
    galore_update_proj_gap: int = 100
    galore_scale: float = 1.0
    galore_proj_type: str = field(default="std", metadata={"help": "std, reverse_std, left or right"})

    # LoRA (peft)
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: str = field(default="q_proj,v_proj", metadata={
        "help": "comma-separated module names, or all-linear"})
    galore_svd: str = field(default="randomized", metadata={
        "help": "randomized (Halko range finder) or exact (galore-torch's full SVD) projector refresh"})
    galore_svd_signs: str = field(default="canonical", metadata={
        "help": "canonical (reproducible across ranks and hardware) or lapack (galore-torch's arbitrary signs)"})

    # Cluster runtime
    ddp_timeout: int = field(default=1800, metadata={
        "help": "seconds any collective may wait for the other ranks before the run fails (a dead or hung rank)"})

    # Set by the deepspeed launcher; accepted and ignored (LOCAL_RANK in the environment is used).
    local_rank: int = -1

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    @property
    def layerwise(self) -> bool:
        return self.method in LAYERWISE_METHODS

    @property
    def fused(self) -> bool:
        return self.method in FUSED_METHODS

    @property
    def low_rank(self) -> bool:
        return self.method in ("owlore", "galore")

    @property
    def prob_mode(self) -> str:
        return self.lisa_prob_mode or ("owl" if self.method == "owlore" else "uniform")

    def validate(self) -> None:
        """Checks that need no file access; raises UserInputError naming the flag."""
        if self.data_mix is not None:
            if self.dataset_path is not None:
                raise UserInputError("--data_mix and --dataset_path contradict each other; give one")
            # The mix is the dataset: carried as dataset_path, it is part of the run's identity.
            self.dataset_path = self.data_mix
        for name in ("model_name_or_path", "dataset_path", "output_dir"):
            if not getattr(self, name):
                raise UserInputError(f"--{name} is required")
        if self.bf16 and self.fp32:
            raise UserInputError("--bf16 and --fp32 contradict each other; give one")
        if self.galore and self.method == "lisa":
            self.method = "owlore"  # the reference spells OwLore as LISA + --galore
        _check_choice("method", self.method, METHODS)
        if self.lisa_prob_mode is not None:
            _check_choice("lisa_prob_mode", self.lisa_prob_mode, PROB_MODES)
        _check_choice("inactive_state", self.inactive_state, ("free", "offload", "projectors"))
        _check_choice("galore_proj_type", self.galore_proj_type, ("std", "reverse_std", "left", "right"))
        _check_choice("galore_svd", self.galore_svd, ("exact", "randomized"))
        _check_choice("galore_svd_signs", self.galore_svd_signs, ("canonical", "lapack"))
        _check_choice("master_weights", self.master_weights, MASTER_POLICIES)
        _check_choice("reduce_dtype", self.reduce_dtype, ("fp32", "bf16"))
        _check_choice("packing_attention", self.packing_attention, PACKING_ATTENTION)
        for name in ("lisa_activated_layers", "lisa_interval_steps", "galore_rank", "galore_update_proj_gap"):
            if getattr(self, name) < 1:
                raise UserInputError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ("owl_nsamples", "owl_seqlen"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserInputError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.owl_threshold_m is not None and not self.owl_threshold_m > 0:
            raise UserInputError(f"--owl_threshold_m must be > 0, got {self.owl_threshold_m}")
        if self.outlier_ratios is not None and not os.path.isfile(self.outlier_ratios):
            raise UserInputError(f"--outlier_ratios {self.outlier_ratios}: file not found")
        _check_choice("lr_scheduler_type", self.lr_scheduler_type, SCHEDULERS)
        _check_choice("report_to", self.report_to, REPORT_TO)
        for name in ("block_size", "per_device_train_batch_size", "gradient_accumulation_steps", "lora_r"):
            if getattr(self, name) < 1:
                raise UserInputError(f"--{name} must be at least 1, got {getattr(self, name)}")
        _check_choice("attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        if self.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise UserInputError("--attn_implementation flash_attention_2: the flash-attn package is not installed; "
                                 "use sdpa")
        if self.offload_checkpoints and not self.gradient_checkpointing:
            raise UserInputError("--offload_checkpoints: offloads the layer checkpoints, so it needs "
                                 "--gradient_checkpointing")
        if self.update_in_backward and not self.layerwise:
            raise UserInputError(f"--update_in_backward: applies to lisa, owlore and galore, not --method {self.method} "
                                 "(lomo/adalomo always update in backward)")
        if self.update_in_backward and self.max_grad_norm > 0:
            raise UserInputError(
                f"--update_in_backward with --max_grad_norm {self.max_grad_norm}: clipping by the global norm needs "
                "every gradient before the first update; give --max_grad_norm 0")
        if self.fused and self.gradient_accumulation_steps > 1:
            raise UserInputError(
                f"--gradient_accumulation_steps {self.gradient_accumulation_steps}: --method {self.method} updates each "
                "weight inside backward and frees its gradient, so gradients cannot accumulate; use 1 and raise "
                "--per_device_train_batch_size instead")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserInputError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target_modules.strip(" ,"):
            raise UserInputError("--lora_target_modules is empty; give module names such as q_proj,v_proj")
        if self.streaming:
            if self.max_steps <= 0:
                raise UserInputError("--streaming: the stream's length is not known in advance; give --max_steps")
            if self.data_mix is not None or self.packing:
                raise UserInputError("--streaming packs one corpus into windows; it does not take --data_mix or "
                                     "--packing (preprocess the corpora with tools/preprocess_data.py for a blend; "
                                     "--packing is for SFT examples)")
            if self.streaming_shuffle_windows < 1:
                raise UserInputError(f"--streaming_shuffle_windows must be at least 1, got {self.streaming_shuffle_windows}")
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            raise UserInputError("give --max_steps > 0 or --num_train_epochs > 0")
        if self.learning_rate < 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise UserInputError("--learning_rate, --weight_decay and --max_grad_norm must be >= 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise UserInputError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.save_steps < 0 or self.warmup_steps < 0 or self.logging_steps < 1:
            raise UserInputError("--save_steps and --warmup_steps must be >= 0 and --logging_steps >= 1")
        if self.ddp_timeout < 1:
            raise UserInputError(f"--ddp_timeout must be at least 1 second, got {self.ddp_timeout}")
        from owlore_ds.export import parse_size

        parse_size(self.export_max_shard_size, "--export_max_shard_size")  # bad input fails before training
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise UserInputError(f"--save_total_limit must be at least 1, got {self.save_total_limit}")
        if self.overwrite_output_dir and self.resume_from_checkpoint not in (None, "auto"):
            raise UserInputError("--overwrite_output_dir contradicts --resume_from_checkpoint PATH; give one")

    def owl_settings(self) -> dict[str, Any]:
        """The settings computed OWL ratios use: threshold_m, nsamples, seqlen."""
        return {"threshold_m": OWL_THRESHOLD_M if self.owl_threshold_m is None else float(self.owl_threshold_m),
                "nsamples": OWL_NSAMPLES if self.owl_nsamples is None else self.owl_nsamples,
                "seqlen": self.owl_seqlen or self.block_size}

    def total_steps(self, steps_per_epoch: int) -> int:
        if self.max_steps > 0:
            return self.max_steps
        return max(1, math.ceil(self.num_train_epochs * steps_per_epoch))

    def warmup_for(self, total_steps: int) -> int:
        return self.warmup_steps if self.warmup_steps > 0 else math.ceil(self.warmup_ratio * total_steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Options that change what is trained. A run resumed in an output dir must agree on
# these with the run that wrote it; the rest (logging, saving, step budget, launcher
# details, per-device split of the global batch) may change between sessions.
RUN_IDENTITY_FIELDS = (
    "model_name_or_path", "dataset_path", "block_size", "no_shuffle", "method",
    "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
    "lr_scheduler_type", "warmup_steps", "warmup_ratio", "max_grad_norm", "seed", "bf16",
    "lisa_activated_layers", "lisa_interval_steps", "lisa_prob_mode", "freeze_embeddings", "inactive_state",
    "galore_rank", "galore_update_proj_gap", "galore_scale", "galore_proj_type", "galore_svd",
    "galore_svd_signs", "master_weights", "galore_spread_refreshes",
    "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
)
# Identity fields added later: recorded only when not at their default, so that runs
# written before they existed still resume.
RUN_IDENTITY_OPTIONAL = {"packing": False, "packing_attention": "causal", "streaming": False, "text_key": "text",
                         "streaming_shuffle_windows": 1000}


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UserInputError(f"--{name} must be one of {', '.join(choices)}; got {value!r}")


def _parse_bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _field_type(f: dataclasses.Field) -> type:
    # Annotations are strings under `from __future__ import annotations`.
    text = str(f.type)
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if text in (name, f"Optional[{name}]"):
            return kind
    return str


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like UserInputError
        raise UserInputError(f"command line: {message}")


def build_parser() -> argparse.ArgumentParser:
    # Defaults are suppressed so that we can tell flags given on the command line
    # (which override the YAML file) from dataclass defaults.
    parser = _Parser(prog="train.py", description="owlore-ds trainer", argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file with the same keys as the flags")
    for f in dataclasses.fields(TrainConfig):
        kind = _field_type(f)
        help_text = f.metadata.get("help", "")
        flags = [f"--{f.name}"] + (["--local-rank"] if f.name == "local_rank" else [])
        if kind is bool:
            # `--bf16` and `--bf16 true` both work, as with HfArgumentParser.
            parser.add_argument(*flags, type=_parse_bool, nargs="?", const=True, help=help_text)
        else:
            parser.add_argument(*flags, type=kind, help=help_text)
    return parser


def _coerce_yaml_value(path: str, key: str, value: Any, f: dataclasses.Field) -> Any:
    kind = _field_type(f)
    if value is None:
        return None
    try:
        if kind is bool:
            return value if isinstance(value, bool) else _parse_bool(value)
        return kind(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise UserInputError(f"{path}: key {key!r} expects {kind.__name__}, got {value!r}") from None


def load_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise UserInputError(f"--config {path}: file not found")
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as exc:
        raise UserInputError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{path}: expected a mapping of option names to values")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    values = {}
    for key, value in data.items():
        if key not in fields:
            raise UserInputError(f"{path}: unknown key {key!r}")
        values[key] = _coerce_yaml_value(path, key, value, fields[key])
    return values


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    given = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    config_path = given.pop("config", None)
    if config_path:
        values.update(load_yaml(config_path))
    values.update(given)
    config = TrainConfig(**values)
    config.validate()
    return config
