"""Bundled architecture configs of the models users fine-tune, for benchmarks and the memory model.

No weights are needed: `architecture_config` builds a Hugging Face config, optionally cut
to fewer decoder layers while every layer keeps its real shape, so per-layer time and
memory measured on a 2-layer model are those of the full model.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from owlore_ds.errors import UserInputError

_LLAMA2 = dict(model_type="llama", vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
               rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu")

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(_LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32),
    "llama2-13b": dict(_LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40),
    "llama2-70b": dict(_LLAMA2, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8),
    "llama3-8b": dict(model_type="llama", vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
                      rope_theta=500000.0, tie_word_embeddings=False, hidden_act="silu", hidden_size=4096,
                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, max_position_embeddings=32768, rms_norm_eps=1e-5,
                       rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False, hidden_act="silu",
                       hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8),
    "qwen2-7b": dict(model_type="qwen2", vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6,
                     rope_theta=1000000.0, tie_word_embeddings=False, hidden_act="silu", hidden_size=3584,
                     intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4),
}


def architecture_config(name: str, num_layers: Optional[int] = None):
    """The Hugging Face config of a bundled architecture, cut to `num_layers` decoder layers if given."""
    from transformers import AutoConfig

    if name not in ARCHITECTURES:
        raise UserInputError(f"--model_config {name!r}: expected one of {', '.join(ARCHITECTURES)}")
    settings = dict(ARCHITECTURES[name])
    if num_layers is not None:
        if not 1 <= num_layers <= settings["num_hidden_layers"]:
            raise UserInputError(f"--num_layers {num_layers}: expected 1 to {settings['num_hidden_layers']} for {name}")
        settings["num_hidden_layers"] = num_layers
    model_type = settings.pop("model_type")
    return AutoConfig.for_model(model_type, **settings)


def load_config(spec: str, num_layers: Optional[int] = None):
    """A bundled architecture by name, or the config of a model folder or config.json, cut to
    `num_layers` decoder layers if given; errors name --model_config / --num_layers."""
    from transformers import AutoConfig

    if spec in ARCHITECTURES:
        return architecture_config(spec, num_layers)
    folder = os.path.dirname(spec) if spec.endswith(".json") else spec
    if not os.path.isfile(os.path.join(folder or ".", "config.json")):
        raise UserInputError(f"--model_config {spec}: neither a bundled architecture "
                             f"({', '.join(ARCHITECTURES)}) nor a folder with a config.json")
    try:
        config = AutoConfig.from_pretrained(folder or ".", local_files_only=True)
    except (ValueError, OSError, json.JSONDecodeError, KeyError) as exc:
        raise UserInputError(f"--model_config {spec}: not a usable model config ({str(exc).splitlines()[0]})") from None
    if num_layers is not None:
        if not 1 <= num_layers <= config.num_hidden_layers:
            raise UserInputError(f"--num_layers {num_layers}: expected 1 to {config.num_hidden_layers} for {spec}")
        config.num_hidden_layers = num_layers
    return config
