"""Per-step metrics: metrics.jsonl (always), the console, TensorBoard or Weights & Biases (rank 0 only)."""

from __future__ import annotations

import ctypes
import itertools
import json
import logging
import os
import platform
import re
from typing import TYPE_CHECKING, Any, Optional

from owlore_ds.errors import UserInputError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def _on_cpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


_SHARED_LIBRARY = re.compile(r"\.so(\.[0-9.]+)?$")
_MADV_POPULATE_READ = 22  # Linux 5.14


def _map_library_pages() -> None:
    """Maps every page of the loaded shared libraries into this process now.

    Code first run in training (backward, LAPACK, oneDNN kernels) would otherwise enter the
    resident set during the peak window. Those pages are file-backed and shared, not memory
    the run allocates, and their count depends on the page cache: the kernel's fault-around
    maps whichever neighbours of a faulting page are cached, so the same run measured 56 MiB
    of new library pages in step 1 in a freshly installed venv and about 40 MiB fewer in one
    whose files had partly left the cache. Mapped before the baseline, they are the same
    constant in both and peak_memory_bytes leaves them out."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    with open("/proc/self/maps") as fh:
        mappings = [line.split() for line in fh]
    for fields in mappings:
        if len(fields) < 6 or not _SHARED_LIBRARY.search(fields[5]) or fields[1].startswith("---"):
            continue
        start, end = (int(address, 16) for address in fields[0].split("-"))
        if libc.madvise(start, end - start, _MADV_POPULATE_READ) != 0:
            log.debug("could not map %s's pages (errno %d); CPU peaks include first-run code",
                      fields[5], ctypes.get_errno())
            return


def memory_baseline_bytes() -> int:
    """What the process holds before the model is built: on CPU the resident set
    (interpreter, libraries with all their pages, tokenized data), which peak_memory_bytes
    leaves out so that CPU figures compare with a GPU's max-allocated ones; on an
    accelerator 0."""
    if not _on_cpu():
        return 0
    _map_library_pages()
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def start_peak_window(model: torch.nn.Module) -> None:
    """Call once the model and optimizer are built: on CPU, makes every weight resident and
    resets the kernel's peak-RSS mark to the current resident set, so that the peak is the
    training's, with the whole model counted as a GPU's max-allocated counts it.

    from_pretrained maps the checkpoint file and may use its pages as the weights; a page
    never read (embedding rows of tokens not seen, frozen under lora) is not resident and
    would be missing from the figure. What came and went before is host memory a GPU run
    also spends and its max-allocated figure leaves out: tokenizing the data, and loading
    the checkpoint, whose file pages stay mapped while from_pretrained converts them (with
    --bf16 the fp32 file plus its bf16 copy)."""
    if not _on_cpu():
        return
    import torch

    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            if tensor.numel():
                tensor.max()  # reads every page
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # "reset the peak resident set size to the current value" (proc(5))
    except OSError:
        log.warning("could not reset the peak RSS mark; CPU peaks include loading the model")


def _own_peak_rss_bytes() -> int:
    # VmHWM, not getrusage's ru_maxrss: a process started by vfork+exec (Python's subprocess,
    # torchrun) inherits its parent's peak into ru_maxrss, and clear_refs does not reset that,
    # so ranks launched from a large process (pytest, a benchmark driver) read the parent's peak.
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError("/proc/self/status has no VmHWM line")


def peak_memory_bytes(baseline: int = 0) -> int:
    """Accelerator max-allocated bytes; on CPU, the process's peak resident set above `baseline`."""
    from deepspeed.accelerator import get_accelerator

    if _on_cpu():
        return _own_peak_rss_bytes() - baseline
    return int(get_accelerator().max_memory_allocated())


def read_metrics(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of OUT/metrics.jsonl, one per optimizer step ([] before the first)."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def package_versions(names: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of `names`, for the header of a report."""
    from importlib import metadata

    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def check_reporter(report_to: str) -> None:
    """Fails before training if the chosen reporter's package is missing."""
    module = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}.get(report_to)
    if module is None:
        return
    try:
        __import__(module)
    except ImportError:
        package = "tensorboard" if report_to == "tensorboard" else "wandb"
        raise UserInputError(f"--report_to {report_to} needs the {package} package: pip install {package}") from None


class MetricsLog:
    """Appends one JSON object per optimizer step; mirrors it to the chosen reporter."""

    def __init__(self, output_dir: str, report_to: str, run_config: dict[str, Any], resume_step: int):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._truncate_after(resume_step)
        self._writer: Any = None
        self._wandb: Any = None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(os.path.join(output_dir, "runs"))
        elif report_to == "wandb":
            import wandb

            self._wandb = wandb.init(config=run_config, dir=output_dir, resume="allow")

    def _truncate_after(self, step: int) -> None:
        """A resumed run rewrites the steps after its checkpoint, so drop the killed run's lines for them."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as fh:
            kept = [line for line in fh if line.strip() and json.loads(line)["step"] <= step]
        with open(self.path, "w") as fh:
            fh.writelines(kept)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        step = record["step"]
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._writer is not None:
            for key, value in numeric.items():
                self._writer.add_scalar(f"train/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in numeric.items()}, step=step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.finish()


def format_console(record: dict[str, Any], total_steps: int) -> str:
    grad: Optional[float] = record.get("grad_norm")
    grad_text = "n/a" if grad is None else f"{grad:.3f}"
    return (f"step {record['step']}/{total_steps} loss {record['loss']:.4f} lr {record['lr']:.3e} "
            f"grad_norm {grad_text} tokens/s {record['tokens_per_s']:.0f} "
            f"peak_mem {record['peak_memory_bytes'] / 2**30:.2f} GiB")


def device_description() -> dict[str, Any]:
    """The device benchmarks name beside their figures: the accelerator, or the CPU and its cores."""
    from deepspeed.accelerator import get_accelerator

    import torch

    accelerator = get_accelerator().device_name()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    if accelerator == "cpu":
        name = f"CPU: {cpu}, {cores} cores"
    else:
        backend = getattr(torch, accelerator, None)
        gpu = backend.get_device_name(0) if backend is not None and hasattr(backend, "get_device_name") else accelerator
        name = f"{gpu} x{get_accelerator().device_count()} (host {cpu}, {cores} cores)"
    return {"accelerator": accelerator, "name": name, "cpu": cpu, "cores": cores,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
