"""Shared fixtures: tiny real models with a real SentencePiece tokenizer, and real launches.

Models are random-initialized from small configs (no hub); the tokenizer is trained on
the shipped Shakespeare text in a second. Training runs are separate processes on CPU with
gloo: the ranks of a run are forked from a warm fork server (tests/forkserver.py: the same
ranks and process group, without ~10 s of imports per launch), or started by a real
launcher when the test names one or passes environment that only a fresh process reads.
OWLORE_TEST_FORKSERVER=0 runs everything under real launchers.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from owlore_ds.distributed import free_port, remove_shm_buffers  # noqa: E402
from forkserver import ForkServer  # noqa: E402
VENV_BIN = Path(sys.executable).parent
TRAIN = str(ROOT / "launch" / "train.py")
CORPUS = ROOT / "data" / "pretrain" / "train.txt"


def load_tool(name: str):
    """A script of tools/ loaded as a module (tools/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def base_env(port: Optional[int] = None) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if port is not None:
        env["MASTER_PORT"] = str(port)
    return env


def launch_command(launcher: str, nproc: int, port: int, args: list[str], script: str = TRAIN,
                   nodes: Optional[tuple[int, int]] = None, hostfile: Optional[Path] = None) -> list[str]:
    """The command line of `launcher`; `nodes` = (node count, this node's rank) makes a torchrun
    or deepspeed command one "node" of a multi-node job on this machine, with rank 0's node at
    127.0.0.1 (torchrun: static rendezvous; deepspeed: `--no_ssh` and `hostfile`, one line
    per node, `localhost slots=N` and `127.0.0.1 slots=N`, two names of this machine)."""
    python = sys.executable
    if launcher == "python":
        return [python, script, *args]
    if launcher == "torchrun":
        multi_node = ["--nnodes", str(nodes[0]), "--node_rank", str(nodes[1]), "--master_addr", "127.0.0.1"] if nodes else []
        return [str(VENV_BIN / "torchrun"), *multi_node, "--nproc_per_node", str(nproc), "--master_port", str(port),
                script, *args]
    if launcher == "deepspeed":
        if nodes:
            return [str(VENV_BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(nodes[1]),
                    "--master_addr", "127.0.0.1", "--master_port", str(port), script, *args]
        return [str(VENV_BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port), script, *args]
    if launcher == "mpirun":
        return [str(VENV_BIN / "mpirun"), "-np", str(nproc), python, script, *args]
    raise ValueError(launcher)


_fork_server: Optional[ForkServer] = None


def fork_server() -> ForkServer:
    """The session's fork server, started on first use (pytest_sessionfinish closes it)."""
    global _fork_server
    if _fork_server is None:
        _fork_server = ForkServer(base_env(), ROOT)
    return _fork_server


def pytest_sessionfinish(session, exitstatus):
    if _fork_server is not None:
        _fork_server.close()


def run_training(args: list[str], nproc: int = 1, launcher: Optional[str] = None, check: bool = True,
                 timeout: int = 300, script: str | Path = TRAIN,
                 extra_env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Runs launch/train.py (or another entry script) and returns the finished process (or what reads
    like one). A test that names a launcher gets it; so does one with extra_env, which may hold
    variables read only at process start (MALLOC_*). Otherwise the ranks come from the fork server."""
    port = free_port()
    env = {**base_env(port), **(extra_env or {})}
    forked = launcher is None and extra_env is None and os.environ.get("OWLORE_TEST_FORKSERVER", "1") != "0"
    launcher = launcher or ("python" if nproc == 1 else "torchrun")
    try:
        if forked:
            result = fork_server().run(str(script), [str(a) for a in args], nproc, env, timeout)
        else:
            result = subprocess.run(launch_command(launcher, nproc, port, args, str(script)), env=env, cwd=ROOT,
                                    capture_output=True, text=True, timeout=timeout)
    finally:
        remove_shm_buffers(port)  # left behind by ranks that were killed
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def start_slurm_tasks(args: list[str], ntasks: int, port: int, nodelist: str = "localhost",
                      extra_env: Optional[dict[str, str]] = None, **popen) -> list[subprocess.Popen]:
    """Starts `ntasks` plain `python launch/train.py` processes with the variables `srun` sets for
    the tasks of one node (and no RANK/MASTER_ADDR): what an sbatch job step looks like to us."""
    tasks = []
    for task in range(ntasks):
        env = {**base_env(port), "SLURM_PROCID": str(task), "SLURM_NTASKS": str(ntasks), "SLURM_LOCALID": str(task),
               "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": nodelist, **(extra_env or {})}
        tasks.append(subprocess.Popen(launch_command("python", 1, port, args), env=env, cwd=ROOT, **popen))
    return tasks


def processes_writing(output_dir: Path) -> list[int]:
    """The processes (launcher and ranks) whose command line names `output_dir`."""
    marker = f"\0{output_dir}\0".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                if marker in b"\0" + fh.read():
                    found.append(int(entry))
        except OSError:
            continue
    return [pid for pid in found if _alive(pid)]


def _kill_processes_writing(output_dir: Path) -> None:
    """SIGKILLs the launcher and every rank of the run writing `output_dir`. torchrun starts
    each rank in a session of its own, so killing the launcher's process group is not enough."""
    victims = processes_writing(output_dir)
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in victims:
        while _alive(pid):
            time.sleep(0.01)


def _alive(pid: int) -> bool:
    """False once `pid` is gone from /proc or a zombie (it may vanish while being read)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return not fh.read().split(") ")[1].startswith("Z")
    except (OSError, IndexError):
        return False


def straight_and_killed_runs(model: Path, data: Path, tmp_path: Path, nproc: int = 2, kill_after: int = 10,
                             **overrides) -> tuple[Path, Path]:
    """A straight run, and the same command SIGKILLed once checkpoint-`kill_after` exists and then
    run again (it resumes with --resume_from_checkpoint auto). Returns both output dirs."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_training(common_args(model, data, straight, **overrides), nproc=nproc)
    port = free_port()
    command = launch_command("torchrun", nproc, port, common_args(model, data, resumed, **overrides))
    proc = subprocess.Popen(command, env=base_env(port), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (resumed / f"checkpoint-{kill_after}").exists():
            assert proc.poll() is None, "training ended before the checkpoint appeared"
            assert time.time() < deadline, "the checkpoint did not appear"
            time.sleep(0.02)
    finally:
        _kill_processes_writing(resumed)
        proc.wait()
        remove_shm_buffers(port)  # left behind by ranks that were killed
    assert not (resumed / "final").exists(), "the run finished before it was killed"
    result = run_training(common_args(model, data, resumed, **overrides), nproc=nproc)
    # The second run must really train on from a checkpoint, not only export a finished one.
    match = re.search(r"resumed from \S+ at step (\d+)", result.stdout + result.stderr)
    assert match, "the second run did not resume"
    assert int(match.group(1)) < int(overrides["max_steps"]), "nothing was left to train after the resume"
    return straight, resumed


def final_weights(output_dir: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(output_dir) / "final" / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")


def relative_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||a - start|| over all weights: how far two runs ended apart, measured against
    how far training moved the weights.

    Why not a max-abs tolerance for Adam-family runs that reduce in another order (1 rank x 4
    examples against 2 ranks x 2, or 4 ranks whose fp32 sums depend on order): the gradients
    of the two runs differ by rounding, delta ~ 1e-7..1e-6 of the gradient's scale G. Adam's
    step lr * m / (sqrt(v) + eps) is nearly sign(g) while its history is short, and its
    derivative at g ~ 0 is 1/eps (eps = 1e-8): an element whose gradient nearly cancels
    (|g| < delta) can step differently by up to ~lr in one run than in the other. So the
    largest element difference is anything up to ~2 lr (6e-2 at lr 3e-2): a max-abs atol
    measures only whether such an element happened (1.08e-4 against 1e-4 on another machine).
    In norm it is bounded: a fraction p ~ delta / G of the N elements (1e-7..1e-6) is hit,
    each by <= ~lr, while every element moves ~lr per step over k steps, so the ratio is about
    sqrt(p * N) lr / (k sqrt(N) lr) = sqrt(p) / k: ~1e-4 at most for k = 8 (measured: 1.2e-4
    for full AdamW with 4 ranks, below 1e-5 for lisa/ZeRO-3). A real defect (a micro-batch
    missing or counted twice, a wrong owner, a stale shard) changes the gradient itself by
    O(1) relative, and the ratio by 1e-2 and more. ADAM_WEIGHT_TOLERANCE sits between.
    """
    assert a.keys() == b.keys()
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a) ** 0.5
    change = sum(float((a[k].double() - start[k].double()).pow(2).sum()) for k in a) ** 0.5
    assert change > 0
    return diff / change


# See relative_distance: ~sqrt(p) / k <= 1e-4 from rounding, >= 1e-2 from a defect.
ADAM_WEIGHT_TOLERANCE = 1e-3
# Losses of Adam-family runs compared across reduction orders: |dL| <= |grad L . dw|, and dw is
# at most ADAM_WEIGHT_TOLERANCE of a change that lowered the loss by a few % of itself, so
# |dL| / L <= 1e-3 x a few % ~ 1e-4 (measured 1.3e-5 on another machine, against a 1e-5 limit);
# a defect moves the losses after the first step by % (and a data error moves the first one).
ADAM_LOSS_RTOL = 1e-4


def initial_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def make_model(folder: Path, tokenizer_dir: Path, model_type: str, num_layers: int, hidden_size: int = 64,
               intermediate_size: int = 128, heads: int = 4, kv_heads: int = 2) -> Path:
    """A randomly initialised model of `model_type` saved with the test tokenizer (seed 0)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(
        model_type, hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=len(tokenizer), max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from tools.train_tokenizer import save_hf_tokenizer, train_sentencepiece

    folder = tmp_path_factory.mktemp("tokenizer")
    text = folder / "corpus.txt"
    text.write_text(CORPUS.read_text(encoding="utf-8")[:300_000], encoding="utf-8")
    train_sentencepiece([text], 512, folder)
    text.unlink()
    save_hf_tokenizer(folder, model_max_length=256)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer_dir) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir, "llama", 2)


@pytest.fixture(scope="session")
def make_tiny_model(tmp_path_factory, tokenizer_dir):
    def make(model_type: str, num_layers: int = 2) -> Path:
        return make_model(tmp_path_factory.mktemp(f"tiny-{model_type}"), tokenizer_dir, model_type, num_layers)

    return make


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    """A folder of .txt files: a few thousand tokens of real text."""
    folder = tmp_path_factory.mktemp("texts")
    text = CORPUS.read_text(encoding="utf-8")
    for i in range(3):
        (folder / f"part{i}.txt").write_text(text[i * 20_000 : (i + 1) * 20_000], encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def task_data() -> Path:
    """The embedded speaker task in LMFlow text2text format (answers of different lengths)."""
    return ROOT / "data" / "tasks" / "shakespeare_speaker" / "train.json"


def common_args(model: Path, data: Path, out: Path, **overrides) -> list[str]:
    """Flags of a short fp32 run; keyword overrides replace or add flags (value None drops one)."""
    flags = {"model_name_or_path": model, "dataset_path": data, "output_dir": out, "block_size": 64,
             "max_steps": 4, "learning_rate": 3e-3, "lr_scheduler_type": "linear", "warmup_steps": 1,
             "logging_steps": 1, "save_steps": 0, "seed": 7, "weight_decay": 0.01, "cache_dir": out.parent / "cache"}
    flags.update(overrides)
    args: list[str] = []
    for key, value in flags.items():
        if value is None:
            continue
        args += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return args
