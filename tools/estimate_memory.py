"""Predicted per-device memory of a training run, by method (owlore_ds/memory_model.py).

    python tools/estimate_memory.py --model_config llama2-70b --method owlore --world_size 16 \
        --zero_stage 3 --micro_batch_size 1 --block_size 4096 --gradient_checkpointing

--model_config is a bundled architecture (owlore_ds/architectures.py) or a model folder /
config.json; --method all prints every method side by side. Figures are GB (1e9 bytes).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from owlore_ds import ds_config  # noqa: E402
from owlore_ds.architectures import load_config  # noqa: E402
from owlore_ds.cli import run_main  # noqa: E402
from owlore_ds.errors import UserInputError  # noqa: E402


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main() -> None:
    from owlore_ds.memory_model import METHODS, estimate, format_table

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_config", required=True, help="bundled name (llama2-7b, ...) or model folder")
    parser.add_argument("--num_layers", type=int, default=None, help="cut the depth, every layer keeps its shape")
    parser.add_argument("--method", default="all", help=f"one of {', '.join(METHODS)}, or all")
    parser.add_argument("--world_size", type=int, default=1)
    parser.add_argument("--zero_stage", type=int, default=None, help="default 2, or the --deepspeed config's")
    parser.add_argument("--deepspeed", help="a DeepSpeed config: its stage (unless --zero_stage is given) and "
                                            "stage3_max_live_parameters go to the model")
    parser.add_argument("--precision", default="bf16", help="bf16 or fp32")
    parser.add_argument("--fp32", action="store_true", help="same as --precision fp32")
    parser.add_argument("--micro_batch_size", type=int, default=1)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--update_in_backward", type=_bool, nargs="?", const=True, default=False,
                        help="lisa/owlore/galore: updates inside backward (needs --max_grad_norm 0 in training)")
    parser.add_argument("--block_size", type=int, default=512)
    parser.add_argument("--gradient_checkpointing", type=_bool, nargs="?", const=True, default=False)
    parser.add_argument("--offload_checkpoints", type=_bool, nargs="?", const=True, default=False,
                        help="with --gradient_checkpointing: the layers' inputs wait in host memory")
    parser.add_argument("--galore_svd", default="randomized", help="randomized or exact (galore/owlore refresh "
                                                                     "workspace), as the trainer's flag")
    parser.add_argument("--lisa_activated_layers", type=int, default=2)
    parser.add_argument("--galore_rank", type=int, default=256)
    parser.add_argument("--master_weights", default="fp32", help="fp32 or none (layer-sampled methods)")
    parser.add_argument("--freeze_embeddings", type=_bool, nargs="?", const=True, default=False)
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--lora_target_modules", default="q_proj,v_proj")
    parser.add_argument("--offload", type=_bool, nargs="?", const=True, default=False)
    parser.add_argument("--reduce_dtype", default="fp32", help="fp32 or bf16: lisa/owlore/galore gradient reduction")
    parser.add_argument("--device", default="cuda", help="cuda or cpu (AdamW temporaries, fixed overhead)")
    args = parser.parse_args()

    config = load_config(args.model_config, args.num_layers)
    live = None
    if args.deepspeed:
        ds = ds_config.read(args.deepspeed)
        args.zero_stage = ds_config.zero_stage(ds) if args.zero_stage is None else args.zero_stage
        live = ds_config.max_live_parameters(ds)
    args.zero_stage = 2 if args.zero_stage is None else args.zero_stage
    if args.method != "all" and args.method not in METHODS:
        raise UserInputError(f"--method {args.method!r}: expected one of {', '.join(METHODS)}, or all")
    methods = METHODS if args.method == "all" else (args.method,)
    kwargs = dict(world_size=args.world_size, zero_stage=args.zero_stage,
                  precision="fp32" if args.fp32 else args.precision, micro_batch_size=args.micro_batch_size,
                  block_size=args.block_size, gradient_checkpointing=args.gradient_checkpointing,
                  lisa_activated_layers=args.lisa_activated_layers, galore_rank=args.galore_rank,
                  master_weights=args.master_weights, freeze_embeddings=args.freeze_embeddings,
                  lora_r=args.lora_r, lora_target_modules=tuple(t for t in args.lora_target_modules.split(",") if t),
                  offload=args.offload, device=args.device, reduce_dtype=args.reduce_dtype,
                  gradient_accumulation_steps=args.gradient_accumulation_steps,
                  update_in_backward=args.update_in_backward, galore_svd=args.galore_svd,
                  offload_checkpoints=args.offload_checkpoints)
    if live is not None:
        kwargs["zero3_max_live_parameters"] = live
    estimates, skipped, errors = {}, [], []
    for method in methods:
        try:
            estimates[method] = estimate(config, method, **kwargs)
        except UserInputError as exc:
            errors.append(exc)
            skipped.append(f"{method}: {exc}")
    if not estimates:  # a flag wrong for every method is bad input, not a skipped method
        raise errors[0]
    print(f"{args.model_config}, {config.num_hidden_layers} layers, {args.world_size} device(s), "
          f"ZeRO-{args.zero_stage}, {kwargs['precision']}, micro-batch {args.micro_batch_size}, "
          f"block {args.block_size}, checkpointing {'on' if args.gradient_checkpointing else 'off'} (per device, GB)")
    print(format_table(estimates))
    for method, est in estimates.items():
        for note in est.notes:
            print(f"note: {method}: {note}")
    for line in skipped:
        print(f"skipped {line}")


if __name__ == "__main__":
    run_main(main)
