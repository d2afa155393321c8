"""Cluster runtime: SLURM variables, collective timeouts, durable checkpoints, failure
agreement and preemption, all with real processes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (ROOT, assert_same_weights, base_env, common_args, final_weights, launch_command,
                      processes_writing, run_training, start_slurm_tasks)
from owlore_ds.distributed import expand_nodelist, free_port, map_launcher_env, remove_shm_buffers
from owlore_ds.errors import UserInputError
from owlore_ds.metrics import read_metrics

ZERO2 = ROOT / "ds_configs" / "zero2.json"


@pytest.mark.parametrize("nodelist,hosts", [
    ("n1,n2", ["n1", "n2"]),
    ("node[01-04,07],gpu-a3", ["node01", "node02", "node03", "node04", "node07", "gpu-a3"]),
    ("gpu-a3,node[8-10]", ["gpu-a3", "node8", "node9", "node10"]),
    ("node[098-101]", ["node098", "node099", "node100", "node101"]),
    ("r[1-2]n[3,5]", ["r1n3", "r1n5", "r2n3", "r2n5"]),
    ("a[1]-ib,b", ["a1-ib", "b"]),
    ("single", ["single"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["node[01-04", "node[4-2]", "node[a-b]", ""])
def test_bad_nodelist_is_refused(nodelist):
    with pytest.raises(UserInputError, match="SLURM_JOB_NODELIST"):
        expand_nodelist(nodelist)


def test_slurm_variables_map_to_torch_ones():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
           "SLURM_JOB_NODELIST": "node[07-10]", "SLURM_JOB_ID": "123456"}
    map_launcher_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["NODE_RANK"]) == ("5", "8", "1", "2")
    assert env["MASTER_ADDR"] == "node07"
    assert env["MASTER_PORT"] == str(20000 + 123456 % 20000)
    # An exported MASTER_ADDR/PORT wins; a launcher's RANK wins over SLURM's (torchrun in sbatch);
    # MPI's wins too (mpirun in an sbatch script inherits the script's SLURM_PROCID=0).
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1,n2", "MASTER_ADDR": "head",
           "MASTER_PORT": "1234"}
    map_launcher_env(env)
    assert (env["RANK"], env["LOCAL_RANK"], env["MASTER_ADDR"], env["MASTER_PORT"]) == ("1", "0", "head", "1234")
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
           "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    map_launcher_env(env)
    assert (env["RANK"], env["LOCAL_RANK"]) == ("3", "1")
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1",
           "MPI_LOCALNRANKS": "2"}
    map_launcher_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("1", "2", "127.0.0.1")
    with pytest.raises(UserInputError, match="MASTER_ADDR"):
        map_launcher_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


def test_mpich_variables_of_a_two_host_job_map_to_torch_ones():
    """What MPICH's hydra sets for rank 2 of `mpirun -np 4 -hosts a:2,b:2` (the first rank of the
    second host): RANK follows PMI_RANK, LOCAL_RANK MPI_LOCALRANKID; several hosts need MASTER_ADDR."""
    env = {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2",
           "MASTER_ADDR": "a", "MASTER_PORT": "1234"}
    map_launcher_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("2", "4", "0", "a")
    with pytest.raises(UserInputError, match="MASTER_ADDR"):
        map_launcher_env({"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"})


def _run_slurm_tasks(args: list[str], ntasks: int, timeout: int = 300) -> list[subprocess.CompletedProcess]:
    port = free_port()
    tasks = start_slurm_tasks(args, ntasks, port, nodelist="localhost,gpu-b[01-02]", stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        outputs = [task.communicate(timeout=timeout) for task in tasks]
    finally:
        for task in tasks:
            task.kill()
        remove_shm_buffers(port)
    for task, (stdout, stderr) in zip(tasks, outputs):
        assert task.returncode == 0, f"task failed ({task.returncode}):\n{stdout[-2000:]}\n{stderr[-4000:]}"
    return outputs


@pytest.mark.parametrize("method", ["full", "owlore"])
def test_two_slurm_tasks_equal_one_process(tmp_path, make_tiny_model, task_data, method):
    """Two `srun` tasks (variables set by hand, MASTER_ADDR from the node list) train as one
    process with the same global batch of 4."""
    model = make_tiny_model("llama", num_layers=4)
    extra = dict(deepspeed=ZERO2, max_steps=4)
    if method == "owlore":
        extra.update(method="owlore", lisa_activated_layers=2, lisa_interval_steps=2, owl_nsamples=4,
                     galore_rank=8, galore_update_proj_gap=3, galore_scale=0.5)
    one, two = tmp_path / "one", tmp_path / "two"
    run_training(common_args(model, task_data, one, per_device_train_batch_size=4, **extra))
    _run_slurm_tasks(common_args(model, task_data, two, per_device_train_batch_size=1, gradient_accumulation_steps=2,
                                 **extra), ntasks=2)
    import json

    assert json.loads((two / "checkpoint-4" / "trainer_state.json").read_text())["world_size"] == 2
    losses_one, losses_two = [m["loss"] for m in read_metrics(one)], [m["loss"] for m in read_metrics(two)]
    assert len(losses_two) == 4
    assert losses_two == pytest.approx(losses_one, rel=1e-5)
    assert_same_weights(final_weights(one), final_weights(two))


def _wait_for_steps(out, steps: int, tasks: list[subprocess.Popen], deadline_s: float = 240) -> None:
    """Waits until rank 0 has logged `steps` optimizer steps (training is under way)."""
    deadline = time.time() + deadline_s
    while len(read_metrics(out)) < steps if (out / "metrics.jsonl").exists() else True:
        assert all(task.poll() is None for task in tasks), "a task ended before training was under way"
        assert time.time() < deadline, "training did not start"
        time.sleep(0.05)


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
def test_a_dead_or_hung_rank_ends_the_others_within_ddp_timeout(tmp_path, tiny_llama, task_data, fault):
    """Rank 1 is killed (or stopped: alive but never answering) mid-run; rank 0 must exit non-zero
    within --ddp_timeout (20 s here) plus its shutdown, not wait for DeepSpeed's 10 minutes."""
    out, port, timeout_s = tmp_path / "out", free_port(), 20
    args = common_args(tiny_llama, task_data, out, deepspeed=ZERO2, per_device_train_batch_size=1, max_steps=100000,
                       ddp_timeout=timeout_s)
    tasks = start_slurm_tasks(args, 2, port, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_steps(out, 3, tasks)
        tasks[1].send_signal(fault)
        start = time.time()
        _, stderr = tasks[0].communicate(timeout=timeout_s + 60)
        elapsed = time.time() - start
    finally:
        for task in tasks:
            task.kill()
            task.wait()
        remove_shm_buffers(port)
    assert tasks[0].returncode not in (0, None), stderr[-3000:]
    assert elapsed < timeout_s + 40, elapsed
    if fault == signal.SIGSTOP:  # nothing but the timeout can end a wait for a live, silent peer
        assert elapsed > timeout_s - 5, elapsed
        assert "timed out" in stderr.lower(), stderr[-3000:]


def _folder_bytes(folder) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs (development machines and CI run as root)")
@pytest.mark.parametrize("method", ["full", "owlore"])
def test_a_save_that_fills_the_disk_fails_on_every_rank_and_resume_equals_straight(tmp_path, tiny_llama, task_data,
                                                                                   method):
    """The output folder is a small tmpfs: checkpoint-2 fits, checkpoint-4 fills it. Both
    ranks exit non-zero within 60 s naming the file; checkpoint-4 stays `.tmp`; resumed
    elsewhere from checkpoint-2, the run equals a straight one. full writes through DeepSpeed's
    engine (ZeRO-2), owlore its own weight shards and state under ZeRO-3."""
    args = dict(deepspeed=ZERO2, per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=6,
                save_steps=2, resume_from_checkpoint="auto")
    if method == "owlore":
        args.update(method="owlore", deepspeed=ROOT / "ds_configs" / "zero3.json", lisa_activated_layers=1,
                    lisa_interval_steps=2, owl_nsamples=4, galore_rank=8)
    straight = tmp_path / "straight"
    run_training(common_args(tiny_llama, task_data, straight, **args), nproc=2)
    checkpoint_bytes = _folder_bytes(straight / "checkpoint-2")
    import torch

    for rank in range(2):  # our own files hold plain tensors: no pickle needed to read them
        state = torch.load(straight / "checkpoint-2" / f"rng_state_{rank}.pth", weights_only=True)
        assert isinstance(state["numpy"]["keys"], torch.Tensor) and state["numpy"]["keys"].numel() == 624
    mount = tmp_path / "small"
    mount.mkdir()
    size_kb = int(checkpoint_bytes * 1.5) // 1024  # room for one checkpoint and the logs, not two
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mount)], check=True)
    port = free_port()
    try:
        out = mount / "out"
        tasks = start_slurm_tasks(common_args(tiny_llama, task_data, out, cache_dir=tmp_path / "cache", **args), 2,
                                  port, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            _wait_for_steps(out, 3, tasks)
            start = time.time()
            stderrs = [task.communicate(timeout=120)[1] for task in tasks]
            elapsed = time.time() - start
        finally:
            for task in tasks:
                task.kill()
                task.wait()
        assert [task.returncode for task in tasks] == [1, 1], [stderr[-3000:] for stderr in stderrs]
        assert elapsed < 60, elapsed
        for rank, stderr in enumerate(stderrs):
            errors = re.findall(r"error: rank (\d): (.*)", stderr)  # one line, after tqdm's bar on rank 0
            assert len(errors) == 1 and errors[0][0] == str(rank), stderr[-3000:]
            # Each failing rank's file, and a reason that says the disk is full.
            assert re.search(rf"on rank \d: {out}/checkpoint-4\.tmp/\S+: .* \(\d+ bytes free on its filesystem\)",
                             errors[0][1]), errors[0][1]
        assert (out / "checkpoint-2" / "trainer_state.json").is_file()
        assert not (out / "checkpoint-4").exists() and (out / "checkpoint-4.tmp").is_dir()
        resumed = tmp_path / "resumed"
        shutil.copytree(out, resumed)
    finally:
        subprocess.run(["umount", str(mount)], check=True)
        remove_shm_buffers(port)
    result = run_training(common_args(tiny_llama, task_data, resumed, **args), nproc=2)
    assert "resumed from" in result.stdout + result.stderr and "at step 2" in result.stdout + result.stderr
    assert not (resumed / "checkpoint-4.tmp").exists()  # the stale partial save is gone
    assert [m["loss"] for m in read_metrics(resumed)] == [m["loss"] for m in read_metrics(straight)]
    assert_same_weights(final_weights(straight), final_weights(resumed), atol=0)


_FILL_AND_SAVE = """
import errno, sys, torch
from owlore_ds.checkpoint import torch_save
folder, fill, to_file = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "file"
with open(folder + "/filler", "wb") as fh:
    fh.write(bytes(fill))
state = {"a": torch.arange(30000.0), "b": {"c": torch.ones(7, dtype=torch.bfloat16)}, "step": 3}
try:
    if to_file:
        with open(folder + "/state.pt", "wb") as fh:
            torch_save(state, fh)
    else:
        torch_save(state, folder + "/state.pt")
except OSError as exc:
    sys.exit(3 if exc.errno == errno.ENOSPC else 4)
loaded = torch.load(folder + "/state.pt", weights_only=True)
sys.exit(0 if torch.equal(loaded["a"], state["a"]) and loaded["step"] == 3 else 5)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs (development machines and CI run as root)")
def test_torch_save_on_a_full_disk_raises_enospc_wherever_the_disk_fills(tmp_path):
    """torch's zip writer can end the process with SIGABRT when a write fails (the C++ stream
    throws through the zip library's C frames); checkpoint.torch_save raises OSError(ENOSPC)
    instead, whichever record the disk fills in, to a path or to an open file. A save that
    fits loads back equal."""
    mount = tmp_path / "small"
    mount.mkdir()
    size = 256 * 1024
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size // 1024}k", "tmpfs", str(mount)], check=True)
    try:
        outcomes = set()
        for fill in (0, size - 120_000, size - 60_000, size - 4096, size):
            for to in ("path", "file"):
                for path in mount.iterdir():
                    path.unlink()
                done = subprocess.run([sys.executable, "-c", _FILL_AND_SAVE, str(mount), str(fill), to], cwd=ROOT,
                                      env=base_env(0), capture_output=True, text=True)
                assert done.returncode in (0, 3), (fill, to, done.returncode, done.stderr[-2000:])
                outcomes.add(done.returncode)
        assert outcomes == {0, 3}  # both a save that fits and one that fills the disk were tried
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_only_stale_checkpoint_tmp_folders_are_removed(tmp_path):
    from owlore_ds.checkpoint import remove_stale_tmp

    for name in ("checkpoint-3.tmp", "checkpoint-12.tmp", "checkpoint-3", "checkpoint-x.tmp", "checkpoint-3.tmpx",
                 "final.tmp", "mycheckpoint-3.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "file").write_text("x")
    (tmp_path / "checkpoint-5.tmp").write_text("a file, not a save's folder")
    removed = remove_stale_tmp(str(tmp_path))
    assert sorted(removed) == sorted(str(tmp_path / n) for n in ("checkpoint-3.tmp", "checkpoint-12.tmp"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-3", "checkpoint-3.tmpx", "checkpoint-5.tmp", "checkpoint-x.tmp", "final.tmp", "mycheckpoint-3.tmp"]


def test_sigusr1_on_one_rank_stops_every_rank_after_a_checkpoint(tmp_path, tiny_llama, task_data):
    """SLURM signals every task, but at different moments; here only rank 1 gets SIGUSR1. Both
    ranks finish the same step, write its checkpoint and exit with the preemption status."""
    from owlore_ds.preemption import PREEMPTED_EXIT

    out, port = tmp_path / "out", free_port()
    args = common_args(tiny_llama, task_data, out, deepspeed=ZERO2, per_device_train_batch_size=1, max_steps=100000,
                       save_steps=0)
    tasks = start_slurm_tasks(args, 2, port, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_steps(out, 3, tasks)
        tasks[1].send_signal(signal.SIGUSR1)
        stderrs = [task.communicate(timeout=120)[1] for task in tasks]
    finally:
        for task in tasks:
            task.kill()
            task.wait()
        remove_shm_buffers(port)
    assert [task.returncode for task in tasks] == [PREEMPTED_EXIT] * 2, stderrs
    last_step = read_metrics(out)[-1]["step"]
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{last_step}"]
    assert not (out / "final").exists()
    assert "preempted (SIGUSR1)" in stderrs[1] and "preempted (another rank's signal)" in stderrs[0]


def test_sigterm_to_torchrun_saves_the_current_step_and_resume_equals_straight(tmp_path, tiny_llama, task_data):
    from owlore_ds.preemption import PREEMPTED_EXIT

    args = dict(deepspeed=ZERO2, per_device_train_batch_size=2, max_steps=40, save_steps=0,
                resume_from_checkpoint="auto", learning_rate=1e-3)
    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    run_training(common_args(tiny_llama, task_data, straight, **args), nproc=2)
    port, log = free_port(), tmp_path / "launcher.log"
    with open(log, "w") as log_file:
        launcher = subprocess.Popen(
            launch_command("torchrun", 2, port, common_args(tiny_llama, task_data, preempted, **args)),
            env=base_env(port), cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_steps(preempted, 5, [launcher])
        os.killpg(launcher.pid, signal.SIGTERM)  # what a scheduler does to the job's launcher
        launcher.wait(timeout=60)
    finally:
        launcher.kill()
        launcher.wait()
        remove_shm_buffers(port)
    output = log.read_text()
    assert launcher.returncode != 0
    deadline = time.time() + 10
    while processes_writing(preempted):
        assert time.time() < deadline, "a rank outlived its launcher"
        time.sleep(0.1)
    last_step = read_metrics(preempted)[-1]["step"]
    assert 5 <= last_step < 40
    assert [p.name for p in preempted.glob("checkpoint-*")] == [f"checkpoint-{last_step}"]
    assert output.count(f"exiting with status {PREEMPTED_EXIT}") == 2, output[-3000:]  # rank 0 and rank 1
    result = run_training(common_args(tiny_llama, task_data, preempted, **args), nproc=2)
    assert f"at step {last_step}" in result.stdout + result.stderr
    assert [m["loss"] for m in read_metrics(preempted)] == [m["loss"] for m in read_metrics(straight)]
    assert_same_weights(final_weights(straight), final_weights(preempted), atol=0)


def test_convert_overwrite_replaces_only_an_earlier_export(tmp_path, tiny_llama, task_data):
    out = tmp_path / "out"
    run_training(common_args(tiny_llama, task_data, out, per_device_train_batch_size=2, max_steps=1))

    def convert(destination, *flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "tools" / "convert_to_hf.py"), str(out / "checkpoint-1"),
                               str(destination), *flags], env=base_env(), cwd=ROOT, capture_output=True, text=True)

    user = tmp_path / "user"
    (user / "notes").mkdir(parents=True)
    (user / "thesis.txt").write_text("months of work")
    looks_like_export = tmp_path / "mixed"  # config and weights, but also a folder of the user's
    shutil.copytree(out / "final", looks_like_export)
    (looks_like_export / "evals").mkdir()
    before = {d: sorted(p.relative_to(d) for p in d.rglob("*")) for d in (user, looks_like_export)}
    for destination in (user, looks_like_export):
        for flags in (["--overwrite"], []):
            result = convert(destination, *flags)
            assert result.returncode == 2, result.stderr[-2000:]
            assert result.stderr.count("\n") == 1 and str(destination) in result.stderr, result.stderr
        assert sorted(p.relative_to(destination) for p in destination.rglob("*")) == before[destination]
    assert (user / "thesis.txt").read_text() == "months of work"

    earlier = tmp_path / "earlier"
    shutil.copytree(out / "final", earlier)
    (earlier / "owlore_ds_source.json").unlink()
    (earlier / "stale-extra.safetensors").write_bytes(b"")
    result = convert(earlier, "--overwrite")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (earlier / "owlore_ds_source.json").is_file() and not (earlier / "stale-extra.safetensors").exists()
    assert not list(tmp_path.glob(".earlier.export-*"))  # the temporary folder was renamed into place
    assert (earlier.stat().st_mode & 0o777) == (0o777 & ~_umask())  # as any folder the user makes
    from safetensors.torch import load_file

    assert_same_weights(final_weights(out), load_file(str(earlier / "model.safetensors")), atol=0)


def _node_args(method: str) -> dict:
    """Global batch 4: 1 example per rank on 4 ranks, fp32."""
    extra = dict(deepspeed=ZERO2, max_steps=4, per_device_train_batch_size=1)
    if method == "owlore":
        extra.update(method="owlore", lisa_activated_layers=2, lisa_interval_steps=2, owl_nsamples=4,
                     galore_rank=8, galore_update_proj_gap=3, galore_scale=0.5)
    return extra


@pytest.fixture(scope="module")
def one_node_run(tmp_path_factory, make_tiny_model, task_data):
    """The one-node, 4-rank run of a method (run once per module, shared by the launchers)."""
    model = make_tiny_model("llama", num_layers=4)
    runs: dict[str, object] = {}

    def get(method: str):
        if method not in runs:
            out = tmp_path_factory.mktemp(f"one-node-{method}") / "out"
            run_training(common_args(model, task_data, out, **_node_args(method)), nproc=4)
            runs[method] = out
        return model, runs[method]

    return get


def _two_node_commands(launcher: str, args: list[str], port: int, tmp_path) -> list[list[str]]:
    """The commands of a 4-rank job as two "nodes" of two ranks on this machine, rank 0's node at
    127.0.0.1; each node tokenizes into a cache folder of its own (`cache0`, `cache1`), so
    node-local work must follow LOCAL_RANK (RANK 2 is LOCAL_RANK 0 of node 1)."""
    if launcher == "mpirun":
        # One mpirun: hydra takes 127.0.0.1 and localhost for two hosts of 2 slots each
        # (PMI_RANK 2 and 3 get MPI_LOCALRANKID 0 and 1); rank 0's host is exported to all.
        # The node's cache folder is chosen per process from its rank (2 ranks per node).
        wrapper = ["sh", "-c", f'exec "$@" --cache_dir {tmp_path}/cache$((PMI_RANK / 2))', "node"]
        return [[str(Path(sys.executable).parent / "mpirun"), "-np", "4", "-hosts", "127.0.0.1:2,localhost:2",
                 "-genv", "MASTER_ADDR", "127.0.0.1", "-genv", "MASTER_PORT", str(port), *wrapper,
                 sys.executable, str(ROOT / "launch" / "train.py"), *args]]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n127.0.0.1 slots=2\n")
    return [launch_command(launcher, 2, port, args + ["--cache_dir", str(tmp_path / f"cache{node}")], nodes=(2, node),
                           hostfile=hostfile) for node in (0, 1)]


@pytest.mark.parametrize("method", ["full", "owlore"])
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed", "mpirun"])
def test_two_nodes_equal_one_node(tmp_path, one_node_run, task_data, launcher, method):
    """Two "nodes" of two ranks each (torchrun and the deepspeed launcher: one launcher per node;
    mpirun: one job over two host names) train as one node of four ranks with the same global
    batch. On node 1 RANK is 2 and 3 and LOCAL_RANK 0 and 1: node-local work (tokenizing into
    the node's cache) follows LOCAL_RANK, run-wide work (metrics, checkpoints' metadata, the
    export) RANK 0 alone."""
    model, one_node = one_node_run(method)
    two_nodes, port = tmp_path / "two_nodes", free_port()
    args = common_args(model, task_data, two_nodes, **{**_node_args(method), "cache_dir": None})
    launchers = [subprocess.Popen(command, env=base_env(port), cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
                 for command in _two_node_commands(launcher, args, port, tmp_path)]
    try:
        outputs = [launcher.communicate(timeout=300)[0] for launcher in launchers]
    finally:
        for launcher in launchers:
            launcher.kill()
            launcher.wait()
        remove_shm_buffers(port)
    assert [launcher.returncode for launcher in launchers] == [0] * len(launchers), \
        "".join(output[-3000:] for output in outputs)
    import json

    assert json.loads((two_nodes / "checkpoint-4" / "trainer_state.json").read_text())["world_size"] == 4
    # Each node's LOCAL_RANK 0 tokenized into the node's cache (RANK 0 and RANK 2).
    assert all(list((tmp_path / f"cache{node}" / "tokenized").glob("*/meta.json")) for node in (0, 1))
    metrics = read_metrics(two_nodes)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]  # one writer: RANK 0, not every LOCAL_RANK 0
    reference = read_metrics(one_node)
    if method == "owlore":
        assert [m["active_layers"] for m in metrics] == [m["active_layers"] for m in reference]
        assert json.loads((two_nodes / "outlier_ratios.json").read_text()) == \
            json.loads((one_node / "outlier_ratios.json").read_text())
    assert [m["loss"] for m in metrics] == [m["loss"] for m in reference]
    assert_same_weights(final_weights(one_node), final_weights(two_nodes), atol=0)


def test_ddp_timeout_flag():
    from owlore_ds.config import parse_args

    base = ["--dataset_path", "d.json", "--output_dir", "out"]
    assert parse_args(base).ddp_timeout == 1800  # Hugging Face's default
    assert parse_args(base + ["--ddp_timeout", "60"]).ddp_timeout == 60
    with pytest.raises(UserInputError, match="--ddp_timeout must be at least 1"):
        parse_args(base + ["--ddp_timeout", "0"])


def test_checkpoint_is_flushed_before_rename_and_pruning_comes_after(tmp_path, tiny_llama, task_data):
    """Traces the syscalls of a real run: every file of checkpoint-2 is fsynced under the .tmp
    name before the rename, the rename is flushed (fsync of OUT), and only then is the older
    checkpoint-1 deleted (--save_total_limit 1)."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("needs strace")
    out, trace = tmp_path / "out", tmp_path / "trace.txt"
    args = common_args(tiny_llama, task_data, out, per_device_train_batch_size=2, max_steps=2, save_steps=1,
                       save_total_limit=1)
    command = [strace, "-f", "-y", "-qq", "-e", "trace=fsync,rename,renameat,renameat2,unlink,unlinkat,rmdir",
               "-o", str(trace), *launch_command("python", 1, 0, args)]
    result = subprocess.run(command, env=base_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = trace.read_text().splitlines()
    tmp, final = f"{out}/checkpoint-2.tmp", f"{out}/checkpoint-2"
    renamed = next(i for i, line in enumerate(lines) if "rename" in line and f'"{tmp}"' in line and f'"{final}"' in line)
    synced = {re.search(r"fsync\(\d+<([^>]*)>", line).group(1) for line in lines[:renamed] if "fsync(" in line}
    written = [p for p in (out / "checkpoint-2").rglob("*")]
    assert written and all(str(p).replace(final, tmp, 1) in synced for p in written), \
        sorted(str(p) for p in written if str(p).replace(final, tmp, 1) not in synced)
    out_synced = next(i for i, line in enumerate(lines) if i > renamed and re.search(rf"fsync\(\d+<{out}>\)", line))
    pruned = [i for i, line in enumerate(lines) if re.search(r"(unlink|unlinkat|rmdir)\(.*checkpoint-1[/>\"]", line)]
    assert pruned and min(pruned) > out_synced
    assert not (out / "checkpoint-1").exists()


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np
    import torch

    from owlore_ds.checkpoint import _rng_state, _set_rng_state

    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    random.gauss(0, 1), np.random.standard_normal()  # leave cached Gaussians in both states
    torch.save(_rng_state(), tmp_path / "rng.pth")
    expected = (random.random(), random.gauss(0, 1), np.random.random(3).tolist(), np.random.standard_normal(),
                torch.rand(3).tolist())
    _set_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True))
    assert (random.random(), random.gauss(0, 1), np.random.random(3).tolist(), np.random.standard_normal(),
            torch.rand(3).tolist()) == expected


def _two_slurm_tasks(args: list[str], port: int, timeout: int) -> tuple[list[int], list[str]]:
    """Two tasks started as srun would, run to their end: (exit codes, stderrs)."""
    tasks = start_slurm_tasks(args, 2, port, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        stderrs = [task.communicate(timeout=timeout)[1] for task in tasks]
    finally:
        for task in tasks:
            task.kill()
            task.wait()
        remove_shm_buffers(port)
    return [task.returncode for task in tasks], stderrs


def test_a_failed_final_export_fails_every_rank(tmp_path, tiny_llama, task_data):
    """OUT/final holds a folder of the user's: rank 0's export refuses it (exit 2) and rank 1,
    waiting for rank 0, fails at once with rank 0's reason; nothing of the user's is deleted."""
    out, port = tmp_path / "out", free_port()
    (out / "final").mkdir(parents=True)
    (out / "final" / "notes.txt").write_text("mine")
    args = common_args(tiny_llama, task_data, out, per_device_train_batch_size=1, max_steps=2,
                       resume_from_checkpoint="auto", ddp_timeout=600)
    returncodes, stderrs = _two_slurm_tasks(args, port, timeout=300)
    assert returncodes == [2, 1], stderrs
    assert re.search(rf"error: {out}/final: --overwrite replaces only an earlier export", stderrs[0]), stderrs[0][-2000:]
    assert re.search(rf"error: rank 1: exporting {out}/final failed on rank 0: {out}/final: --overwrite replaces",
                     stderrs[1]), stderrs[1][-2000:]
    assert (out / "final" / "notes.txt").read_text() == "mine" and (out / "checkpoint-2").is_dir()


def test_a_truncated_file_of_one_rank_fails_every_rank_before_loading(tmp_path, tiny_llama, task_data):
    out = tmp_path / "out"
    args = common_args(tiny_llama, task_data, out, deepspeed=ZERO2, per_device_train_batch_size=1, max_steps=2,
                       save_steps=1)
    run_training(args, nproc=2)
    bad = next((out / "checkpoint-1" / "global_step1").glob("*rank_1_*optim_states.pt"))
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    port = free_port()
    resume = args + ["--resume_from_checkpoint", str(out / "checkpoint-1"), "--max_steps", "3"]
    returncodes, stderrs = _two_slurm_tasks(resume, port, timeout=120)
    assert returncodes == [2, 2], stderrs
    assert f"error: {out}/checkpoint-1: corrupt checkpoint (global_step1/{bad.name} is truncated" in stderrs[0], \
        stderrs[0][-2000:]


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
