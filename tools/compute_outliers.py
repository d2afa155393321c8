"""Compute OWL layerwise outlier ratios (DESIGN 1.1) of a local model on calibration data.

    python tools/compute_outliers.py --model_name_or_path DIR --dataset_path PATH \
        --nsamples 128 --seqlen 2048 --threshold_m 5 --output ratios.json

Scores one decoder layer at a time (one layer's activations in memory), on the GPU
when there is one. The JSON holds the ratios (percent, one per layer), M, nsamples,
seqlen, a hash of the calibration windows' tokens and a fingerprint of the model; the
trainer's --outlier_ratios refuses a file made for another model, or with an M, nsamples
or seqlen other than the --owl_threshold_m, --owl_nsamples or --owl_seqlen given with it.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from owlore_ds.cli import run_main  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--dataset_path", required=True, help="any dataset format the trainer reads")
    parser.add_argument("--output", required=True, help="the ratio JSON to write")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--threshold_m", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibration_order", choices=["random", "sequential"], default="random",
                        help="random windows (seeded), or the first nsamples windows in file order")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--bf16", action="store_true", help="load the model in bf16 (statistics stay fp32)")
    parser.add_argument("--cache_dir", default="~/.cache/owlore_ds")
    args = parser.parse_args()

    from owlore_ds.distributed import select_accelerator

    select_accelerator()
    from deepspeed.accelerator import get_accelerator

    from owlore_ds.data import calibration_windows, load_training_data
    from owlore_ds.errors import UserInputError
    from owlore_ds.modeling import check_block_size, load_model, load_tokenizer, read_model_config
    from owlore_ds.outliers import calibration_sha256, compute_layer_outlier_ratios, model_fingerprint, save_ratios

    for name in ("nsamples", "seqlen", "batch_size"):
        if getattr(args, name) < 1:
            raise UserInputError(f"--{name} must be at least 1")
    config = read_model_config(args.model_name_or_path)
    check_block_size(config, args.seqlen, args.model_name_or_path)
    tokenizer = load_tokenizer(args.model_name_or_path)
    data = load_training_data(args.dataset_path, tokenizer, args.model_name_or_path, args.seqlen, args.cache_dir,
                              config.vocab_size)
    windows = calibration_windows(data, args.nsamples, args.seqlen, args.seed, args.calibration_order == "sequential")
    model = load_model(args.model_name_or_path, "bf16" if args.bf16 else "fp32", gradient_checkpointing=False)
    device = get_accelerator().current_device_name()
    ratios = compute_layer_outlier_ratios(model, windows, args.threshold_m, args.batch_size, device=device)
    save_ratios(args.output, ratios, model_fingerprint(model), args.threshold_m, windows.shape[0], args.seqlen,
                calibration_sha256(windows))
    print(" ".join(f"{r:.3f}" for r in ratios))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    run_main(main)
