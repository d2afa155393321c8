"""A fork server for the tests: import torch, deepspeed, transformers, peft and owlore_ds once,
then fork the ranks of each training run from that warm process.

Why: a training launch spends ~8-20 s importing before it trains a tiny model for a few
seconds, and the suite launches ~125 of them. The ranks forked here are still real,
separate processes that set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* as torchrun would and
join a real gloo process group; only the imports are shared.

Fork safety. fork() copies only the calling thread, so the server must have exactly one
thread when it forks: no torch op runs here (torch starts its OpenMP/intra-op pool on the
first parallel op), no process group, no tokenizer, no DeepSpeed engine. `serve` checks
/proc/self/task before every fork and refuses to fork otherwise. Each rank:
  - starts a session of its own (os.setsid), as torchrun's ranks do, so tests can kill a
    rank's whole process group and the server is never in it;
  - gets the request's environment, working directory and sys.argv, fresh seeds for the
    Python and numpy generators (a forked child would otherwise repeat the server's), and
    stdout/stderr on files shared by all ranks (as torchrun's ranks share its streams);
  - runs the script as `python script.py` would (runpy, __main__), runs the atexit
    handlers and leaves with os._exit, so nothing of the server's state is torn down twice.
Like torchrun, when one rank fails the server SIGTERMs the others (SIGKILL 30 s later), so a
crashed rank cannot leave its peers waiting in a collective; a run past its timeout is
SIGKILLed whole. The server answers one request at a time (pytest runs tests one by one).

What cannot go through here: variables read when a process starts (MALLOC_*, OMP_*, and
anything a library reads at import time) cannot change per run, so runs with extra
environment use real launchers (conftest.run_training decides).

Protocol: one JSON line per request on the server's stdin, one JSON line per answer on its
stdout; the server's own prints go to its stderr.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

TERM_GRACE = 30.0  # seconds between SIGTERM and SIGKILL for the peers of a failed rank, as DeepSpeed's launcher


# --------------------------------------------------------------------------------------- server side

def _preload() -> None:
    """Imports what every training run imports; lazily loaded transformers modules included."""
    # owlore_ds.cli.setup_logging sets these before a launched script imports transformers and
    # huggingface_hub, which read them at import time; the warm imports must see the same.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import deepspeed  # noqa: F401
    import deepspeed.runtime.engine  # noqa: F401
    import deepspeed.runtime.zero.stage3  # noqa: F401
    import deepspeed.runtime.zero.stage_1_and_2  # noqa: F401
    import galore_torch  # noqa: F401
    import numpy  # noqa: F401
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    import transformers.integrations.deepspeed  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    import importlib
    import pkgutil

    import owlore_ds
    for module in pkgutil.walk_packages(owlore_ds.__path__, "owlore_ds."):
        importlib.import_module(module.name)
    del transformers


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _exit_code(exc: SystemExit) -> int:
    """What the interpreter makes of sys.exit(value)."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def _rank_main(request: dict, rank: int, stdout_fd: int, stderr_fd: int, protocol_fds: tuple[int, int]) -> None:
    """Runs in the forked rank; never returns."""
    code = 1
    try:
        os.setsid()
        for fd in protocol_fds:
            os.close(fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(stdout_fd, 1)
        os.dup2(stderr_fd, 2)
        for fd in (devnull, stdout_fd, stderr_fd):
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        nproc = request["nproc"]
        if nproc > 1 or request["launcher_env"]:
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                              LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1")
        import random

        import numpy
        random.seed()
        numpy.random.seed()
        sys.argv = [request["script"], *request["args"]]
        import runpy
        try:
            runpy.run_path(request["script"], run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc)
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        import atexit
        atexit._run_exitfuncs()
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _kill_groups(pids, sig: int) -> None:
    for pid in pids:
        try:
            os.killpg(pid, sig)  # each rank leads its own session and process group
        except (ProcessLookupError, PermissionError):
            pass


def _run(request: dict, protocol_fds: tuple[int, int]) -> dict:
    """Forks the ranks of one run and waits for them; returns their exit codes."""
    threads = _threads()
    if threads != 1:
        return {"error": f"refusing to fork: the server has {threads} threads"}
    stdout_fd = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    stderr_fd = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    ranks: dict[int, int] = {}
    try:
        for rank in range(request["nproc"]):
            pid = os.fork()
            if pid == 0:
                _rank_main(request, rank, stdout_fd, stderr_fd, protocol_fds)
            ranks[pid] = rank
    finally:
        os.close(stdout_fd)
        os.close(stderr_fd)
    codes: dict[int, int] = {}
    deadline = time.monotonic() + request["timeout"]
    kill_at: Optional[float] = None
    first_failure = 0  # the status of the rank that failed first, not of the peers killed after it
    timed_out = False
    try:
        while len(codes) < len(ranks):
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid:
                codes[ranks[pid]] = os.waitstatus_to_exitcode(status)
                if codes[ranks[pid]] != 0 and kill_at is None:
                    first_failure = codes[ranks[pid]]
                    _kill_groups([p for p in ranks if ranks[p] not in codes], signal.SIGTERM)
                    kill_at = time.monotonic() + TERM_GRACE
                continue
            now = time.monotonic()
            if now > deadline and not timed_out:
                timed_out = True
                _kill_groups([p for p in ranks if ranks[p] not in codes], signal.SIGKILL)
            elif kill_at is not None and now > kill_at:
                _kill_groups([p for p in ranks if ranks[p] not in codes], signal.SIGKILL)
            time.sleep(0.02)
    finally:
        living = [p for p in ranks if ranks[p] not in codes]
        if living:  # the server itself is being interrupted: leave no rank behind
            _kill_groups(living, signal.SIGKILL)
            for pid in living:
                os.waitpid(pid, 0)
    return {"codes": [codes[rank] for rank in range(len(ranks))], "first_failure": first_failure,
            "timed_out": timed_out}


def serve() -> None:
    # The protocol gets fds of its own; fd 1 goes to stderr so that a library printing at
    # import cannot corrupt the answers.
    requests_fd, answers_fd = os.dup(0), os.dup(1)
    os.dup2(2, 1)
    requests, answers = os.fdopen(requests_fd, "r"), os.fdopen(answers_fd, "w")
    started = time.monotonic()
    _preload()
    import logging
    # A launched script configures the root logger itself (cli.setup_logging): nothing here may have.
    ready = {"threads": _threads(), "root_handlers": len(logging.getLogger().handlers),
             "seconds": time.monotonic() - started}
    answers.write(json.dumps(ready) + "\n")
    answers.flush()
    for line in requests:
        try:
            answer = _run(json.loads(line), (requests_fd, answers_fd))
        except Exception as exc:  # an answer, not a dead server: the test reports it
            answer = {"error": repr(exc)}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


# --------------------------------------------------------------------------------------- client side

class ForkServer:
    """The test side: starts the server (once per session) and runs trainings through it."""

    def __init__(self, env: dict[str, str], cwd: Path, start_timeout: float = 600):
        self.env, self.cwd = env, cwd
        self.folder = Path(tempfile.mkdtemp(prefix="owlore-forkserver-"))
        self.log = self.folder / "server.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=log, env=env, cwd=cwd, text=True, bufsize=1)
        ready = self._answer(start_timeout)
        if ready["threads"] != 1 or ready["root_handlers"]:
            self.close()
            raise RuntimeError(f"fork server is not a clean parent after its imports: {ready}")
        self.import_seconds = ready["seconds"]
        self.count = 0

    def _answer(self, timeout: float) -> dict:
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            raise RuntimeError(f"fork server gave no answer (exit {self.proc.poll()}):\n{self.log.read_text()[-5000:]}")
        return json.loads(line)

    def run(self, script: str, args: list[str], nproc: int, env: dict[str, str], timeout: float,
            launcher_env: bool = False) -> subprocess.CompletedProcess:
        """Runs `script args` as `nproc` forked ranks; the result reads like subprocess.run's.
        Without launcher_env a single rank gets no RANK/WORLD_SIZE variables, as `python script`."""
        self.count += 1
        stdout, stderr = self.folder / f"{self.count}.out", self.folder / f"{self.count}.err"
        request = dict(script=script, args=[str(a) for a in args], nproc=nproc, env=env, cwd=str(self.cwd),
                       timeout=timeout, stdout=str(stdout), stderr=str(stderr), launcher_env=launcher_env)
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        # The server enforces `timeout` and the TERM grace; this margin only catches a dead server.
        answer = self._answer(timeout + TERM_GRACE + 60)
        out = stdout.read_text(errors="replace") if stdout.exists() else ""
        err = stderr.read_text(errors="replace") if stderr.exists() else ""
        stdout.unlink(missing_ok=True)
        stderr.unlink(missing_ok=True)
        command = ["forkserver", f"nproc={nproc}", script, *request["args"]]
        if "error" in answer:
            raise RuntimeError(f"fork server: {answer['error']}")
        if answer["timed_out"]:
            raise subprocess.TimeoutExpired(command, timeout, output=out, stderr=err)
        # The status of the rank that failed first (torchrun names that rank in its summary); with one rank,
        # the process's own status, as `python script` would give.
        return subprocess.CompletedProcess(command, answer["first_failure"], out, err)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # the server leaves its loop at end of input
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        import shutil
        shutil.rmtree(self.folder, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # owlore_ds from this checkout
    serve()
