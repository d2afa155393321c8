"""Turn a training checkpoint (any ZeRO stage, any world size) into a Hugging Face model folder.

    python tools/convert_to_hf.py OUT/checkpoint-N DEST [--dtype bf16|fp32] [--overwrite]

DEST then loads with AutoModelForCausalLM.from_pretrained(DEST, local_files_only=True)
and serves lm-eval-harness, vLLM or transformers. The default dtype is the run's.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from owlore_ds.cli import run_main  # noqa: E402


def main() -> None:
    from owlore_ds.distributed import select_accelerator

    select_accelerator()
    from owlore_ds.export import export_checkpoint

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="an OUT/checkpoint-N folder")
    parser.add_argument("destination", help="the Hugging Face folder to write")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: the run's precision")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty DEST")
    args = parser.parse_args()
    path = export_checkpoint(args.checkpoint, args.destination, args.dtype, args.overwrite)
    print(f"wrote {path}")


if __name__ == "__main__":
    run_main(main)
