"""Entry point for every launcher:

    deepspeed launch/train.py --deepspeed ds_configs/zero2.json --model_name_or_path DIR ...
    torchrun --nproc_per_node N launch/train.py ...
    mpirun -np N python launch/train.py ...
    python launch/train.py ...            (one process; CPU with gloo when there is no GPU)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from owlore_ds.cli import run_main  # noqa: E402


def main() -> None:
    from owlore_ds.config import parse_args
    from owlore_ds.trainer import run

    run(parse_args())


if __name__ == "__main__":
    run_main(main)
