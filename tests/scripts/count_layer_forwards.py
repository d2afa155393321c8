"""Trains like launch/train.py and counts how often each decoder layer's MLP is entered, so a test can
tell whether gradient checkpointing really recomputes the layers in backward (twice a
micro-batch) or not (once). A pre-hook, because torch's recompute stops early, once the last
saved tensor exists (down_proj's input), before the MLP returns."""

import json
import os
import re
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from owlore_ds import distributed as dist  # noqa: E402
from owlore_ds.config import parse_args  # noqa: E402


def main() -> None:
    cfg = parse_args()
    dist.init()
    from owlore_ds.trainer import Trainer

    trainer = Trainer(cfg)
    counts: Counter = Counter()
    for name, module in trainer.method.engine.module.named_modules():
        found = re.search(r"layers\.(\d+)\.mlp$", name)
        if found:
            module.register_forward_pre_hook(lambda *_, index=int(found.group(1)): counts.update([index]))
    trainer.train()
    if dist.is_main():
        with open(os.environ["OWLORE_TEST_COUNTS"], "w") as fh:
            json.dump({"mlp_forwards": [counts[i] for i in sorted(counts)],
                       "training": trainer.method.engine.module.training}, fh)
    dist.shutdown()


if __name__ == "__main__":
    main()
