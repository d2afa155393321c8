"""tools/benchmark_svd.py on a tiny architecture: every layer shape, both refreshes, and the
randomized projector keeping what the exact one keeps (the figures docs/policies.md quotes)."""

from __future__ import annotations

import json

from conftest import load_tool


def test_benchmark_svd_times_every_layer_shape(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "hidden_size": 96, "intermediate_size": 160,
                                  "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                                  "vocab_size": 128}))
    load_tool("benchmark_svd").main(["--model_config", str(config), "--rank", "16"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and " x " in line]
    assert sorted(row[0].strip() for row in rows) == ["160 x 96", "48 x 96", "96 x 160", "96 x 96"]
    for row in rows:
        exact, randomized = float(row[4]), float(row[5])
        # The exact projector keeps the most a rank-16 one can; the randomized one nearly as much.
        assert 0.5 < exact <= 1.01 and exact - 0.01 < randomized <= exact + 1e-3, row
