#!/usr/bin/env python
"""Evaluate a Hugging Face model folder with lm-eval-harness (the `lm_eval` package).

    python tools/evaluate.py HF_FOLDER --tasks TASK[,TASK...] [--num_fewshot N] [--batch_size B]
        [--limit K] [--output PATH] [--include_path DIR] [--dtype auto|bfloat16|float16|float32]
        [--device DEV] [--allow_downloads] [--log_samples]

HF_FOLDER is a local model folder (``OUT/final`` of a run, or ``tools/convert_to_hf.py``'s
output); it is never looked up on a hub. The model runs with lm-eval's ``hf`` model type on
the device DeepSpeed's accelerator names (``cuda:0`` on a GPU machine, ``cpu`` without one).

Tasks: any lm-eval task, group or tag name, a task YAML file, or the preset ``paper``: the
OwLore paper's evaluation, MMLU 5-shot, boolq, piqa, social_iqa, hellaswag, winogrande,
arc_easy, arc_challenge and openbookqa 5-shot, and GSM8K (5-shot, lm-eval's own default
for it; the paper gives no count). ``--num_fewshot`` overrides every task's count.

Local tasks: ``data/lm_eval_tasks/`` is always included; it holds ``shakespeare_speaker``,
the embedded "who speaks these lines?" task read from ``data/tasks/shakespeare_speaker/``
(`acc` there is tools/score_task.py's ``choice_accuracy``). ``--include_path DIR`` adds
folders of your own task YAMLs.

Datasets of lm-eval's own tasks live on the Hugging Face Hub. Nothing is downloaded unless
``--allow_downloads`` is given (or HF_HUB_OFFLINE=0 is set): without it a task whose dataset
is not in the local cache fails at once with one line naming it, before the model is loaded.

Writes the results as JSON (``--output``, default ``HF_FOLDER/lm_eval_results.json``) and
prints lm-eval's table. Bad input (missing folder, no config.json, unknown task, a dataset
that cannot be had) ends with one line on stderr naming the argument, exit status 2.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import importlib.metadata
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from owlore_ds.cli import run_main  # noqa: E402
from owlore_ds.errors import UserInputError  # noqa: E402

LOCAL_TASKS = ROOT / "data" / "lm_eval_tasks"

# The OwLore paper's lm-eval tasks and shot counts. GSM8K's count is not stated there;
# 5 is what lm-eval's gsm8k task uses by default.
PAPER_TASKS: dict[str, int] = {
    "mmlu": 5,
    "boolq": 5,
    "piqa": 5,
    "social_iqa": 5,
    "hellaswag": 5,
    "winogrande": 5,
    "arc_easy": 5,
    "arc_challenge": 5,
    "openbookqa": 5,
    "gsm8k": 5,
}
PRESETS: dict[str, dict[str, int]] = {"paper": PAPER_TASKS}
DTYPES = ("auto", "bfloat16", "float16", "float32")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line with exit status 2, like the other entry points."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserInputError(message)


def _limit(text: str) -> int | float:
    # lm-eval reads a limit below 1 as a fraction of each task's examples.
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    if value >= 1:
        if not value.is_integer():
            raise argparse.ArgumentTypeError(f"must be a whole number of examples or a fraction below 1, got {text}")
        return int(value)
    return value


def _batch_size(text: str) -> int | str:
    if text == "auto" or text.startswith("auto:"):
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'auto', got {text!r}")
    return int(text)


def _non_negative(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", metavar="HF_FOLDER", type=Path, help="local Hugging Face model folder")
    parser.add_argument("--tasks", required=True,
                        help="comma-separated lm-eval task/group/tag names or YAML files, or 'paper'")
    parser.add_argument("--num_fewshot", type=_non_negative, default=None,
                        help="few-shot examples for every task (default: the preset's or the task's own)")
    parser.add_argument("--batch_size", type=_batch_size, default=16, help="integer or 'auto'")
    parser.add_argument("--limit", type=_limit, default=None,
                        help="first K examples of each task (or a fraction < 1); for quick checks")
    parser.add_argument("--output", type=Path, default=None,
                        help="results JSON (default HF_FOLDER/lm_eval_results.json)")
    parser.add_argument("--include_path", type=Path, action="append", default=[],
                        help="extra folder of task YAMLs (repeatable); data/lm_eval_tasks is always included")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: the model config's dtype")
    parser.add_argument("--device", default=None, help="default: DeepSpeed's accelerator (cuda:0 or cpu)")
    parser.add_argument("--allow_downloads", action="store_true",
                        help="let lm-eval fetch task datasets from the Hugging Face Hub")
    parser.add_argument("--log_samples", action="store_true",
                        help="also write every example's requests and responses to OUTPUT.samples.jsonl")
    return parser.parse_args(argv)


def expand_tasks(text: str, num_fewshot: int | None) -> dict[str, int | None]:
    """Task name -> few-shot count (None: the task's own default), presets expanded, order kept."""
    tasks: dict[str, int | None] = {}
    for name in (part.strip() for part in text.split(",")):
        if not name:
            continue
        for task, shots in PRESETS.get(name, {name: None}).items():
            tasks[task] = num_fewshot if num_fewshot is not None else shots
    if not tasks:
        raise UserInputError(f"--tasks: no task named in {text!r}")
    return tasks


def check_model_folder(model_dir: Path) -> Path:
    """The folder as an absolute path. Absolute, so that nothing reads it as a hub repository id."""
    if not model_dir.is_dir():
        raise UserInputError(f"HF_FOLDER: model folder not found: {model_dir}")
    if not (model_dir / "config.json").is_file():
        raise UserInputError(f"HF_FOLDER: no config.json in {model_dir} (expected a Hugging Face model folder, "
                             "e.g. OUT/final or the output of tools/convert_to_hf.py)")
    return model_dir.resolve()


def set_hub_access(allow_downloads: bool) -> None:
    """Offline unless asked. Must run before datasets / huggingface_hub are imported: they read these once."""
    if allow_downloads:
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "0"
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", os.environ["HF_HUB_OFFLINE"])


def _first_line(err: BaseException) -> str:
    text = str(err).strip().strip('"')
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _hub_reachable() -> bool:
    from huggingface_hub import constants

    return not constants.HF_HUB_OFFLINE


def load_tasks(task_manager, tasks: dict[str, int | None]) -> list:
    """lm-eval Task / Group objects for `tasks`, few-shot counts set, datasets loaded.

    Done before the model is loaded, so an unknown name or a dataset that cannot be had
    fails in seconds rather than after minutes of loading a 7B model.
    """
    from lm_eval.api.group import Group

    loaded_objects: list = []
    for name, shots in tasks.items():
        if name not in task_manager.task_index and not (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
            close = difflib.get_close_matches(name, task_manager.all_tasks, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserInputError(f"--tasks: unknown task {name!r} (not an lm-eval task, group or tag, nor a YAML "
                                 f"file; local tasks are in {LOCAL_TASKS.relative_to(ROOT)}, add folders with "
                                 f"--include_path){hint}")
        try:
            loaded = task_manager.load([name])
        except ConnectionError as err:  # datasets raises it for a hub dataset it cannot fetch
            if not _hub_reachable():
                raise UserInputError(
                    f"--tasks {name}: its dataset is not in the local cache and downloads are off ({_first_line(err)});"
                    " pass --allow_downloads to fetch it from the Hugging Face Hub, or use local task files"
                    " (--include_path)") from None
            raise UserInputError(f"--tasks {name}: cannot download its dataset ({_first_line(err)})") from None
        except Exception as err:  # a broken task YAML or data file is user input too; name it
            raise UserInputError(f"--tasks {name}: cannot load the task ({_first_line(err)})") from None
        for task in loaded["tasks"].values():
            # As lm-eval does for its own --num_fewshot: a task configured as 0-shot stays 0-shot.
            if shots is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=shots)
        group = loaded["groups"].get(name)
        # A group is passed whole so that lm-eval reports its aggregate (e.g. mmlu's mean).
        loaded_objects += [group] if isinstance(group, Group) else list(loaded["tasks"].values())
    return loaded_objects


def load_model(model_dir: Path, dtype: str, batch_size: int | str, device: str):
    """lm-eval's `hf` model on a local folder."""
    from lm_eval.api.registry import get_model

    try:
        return get_model("hf").create_from_arg_obj(
            {"pretrained": str(model_dir), "dtype": dtype}, {"batch_size": batch_size, "device": device})
    except (OSError, ValueError) as err:
        raise UserInputError(f"HF_FOLDER: cannot load a model and tokenizer from {model_dir} "
                             f"({_first_line(err)})") from None


def write_results(results: dict[str, Any], output: Path, extra: dict[str, Any], log_samples: bool) -> None:
    from lm_eval.utils import handle_non_serializable

    output.parent.mkdir(parents=True, exist_ok=True)
    summary = {key: value for key, value in results.items() if key != "samples"}
    summary["owlore_ds"] = extra
    output.write_text(json.dumps(summary, indent=2, default=handle_non_serializable) + "\n", encoding="utf-8")
    if log_samples:
        with open(output.with_suffix(".samples.jsonl"), "w", encoding="utf-8") as fh:
            for task, rows in results["samples"].items():
                for row in rows:
                    fh.write(json.dumps({"task": task, **row}, default=handle_non_serializable) + "\n")


def main() -> None:
    args = parse_args()
    model_dir = check_model_folder(args.model_dir)
    include = [LOCAL_TASKS] + args.include_path
    for folder in args.include_path:
        if not folder.is_dir():
            raise UserInputError(f"--include_path: folder not found: {folder}")
    tasks = expand_tasks(args.tasks, args.num_fewshot)
    output = args.output or model_dir / "lm_eval_results.json"
    set_hub_access(args.allow_downloads)

    from owlore_ds.distributed import select_accelerator

    select_accelerator()
    from deepspeed.accelerator import get_accelerator

    device = args.device or get_accelerator().device_name(0)

    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    task_manager = TaskManager(include_path=[str(p) for p in include])
    task_objects = load_tasks(task_manager, tasks)
    lm = load_model(model_dir, args.dtype, args.batch_size, device)
    # num_fewshot=None: each task keeps the count load_tasks gave it.
    results = lm_eval.simple_evaluate(model=lm, tasks=task_objects, num_fewshot=None, limit=args.limit,
                                      task_manager=task_manager, log_samples=args.log_samples)
    extra = {
        "command": shlex.join(["python", "tools/evaluate.py"] + sys.argv[1:]),
        "model_dir": str(model_dir),
        "tasks": tasks,
        "device": device,
        "dtype": args.dtype,
        "limit": args.limit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "lm_eval_version": importlib.metadata.version("lm_eval"),
    }
    write_results(results, output, extra, args.log_samples)
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    print(f"wrote {output}")


if __name__ == "__main__":
    run_main(main)
