"""Trains like launch/train.py, then saves the logits of the in-memory DeepSpeed model on fixed
inputs, so a test can compare them with a model converted from the checkpoint."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from owlore_ds import distributed as dist  # noqa: E402
from owlore_ds.config import parse_args  # noqa: E402


def main() -> None:
    cfg = parse_args()
    dist.init()
    from owlore_ds.trainer import Trainer

    trainer = Trainer(cfg)
    trainer.train()
    input_ids = torch.arange(2 * 24).reshape(2, 24) % trainer.model_config.vocab_size
    engine = trainer.method.engine  # every method family builds one DeepSpeed engine
    engine.eval()
    with torch.no_grad():  # every rank joins: under ZeRO-3 the forward gathers the shards
        logits = engine(input_ids=input_ids.to(trainer.device)).logits
    if dist.is_main():
        torch.save({"input_ids": input_ids, "logits": logits.cpu()}, os.environ["OWLORE_TEST_LOGITS"])
    dist.shutdown()


if __name__ == "__main__":
    main()
