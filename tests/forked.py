"""dpbp's commands, each run in a fork of one process that imported them already.

    with Forks(["dpbp.train"], ROOT) as forks:
        r = forks.run("dpbp.train", args, cwd=..., env=..., timeout=60)   # CompletedProcess

is `python -m dpbp.train ARGS` (the module run as `__main__`, as `python -m` runs it)
without starting Python and importing numpy and dpbp again for every run: a short run
that stops at bad input costs a few tens of milliseconds instead of half a second. A
server process (`python -m tests.forked MODULE...`, started once, single-threaded)
imports the modules, then forks one child per run: the child takes the run's working
directory, environment and arguments, writes its stdout and stderr to files, and ends
with the command's exit code (or its signal). MPI is not started before the fork; each
child starts its own, as a fresh process does.

A run that outlives its timeout is killed and fails the test; the server ends when the
test session closes its pipe. Test code only: dpbp never imports it.
"""

import atexit
import importlib
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import traceback

import pytest


def serve(modules):
    """The server: import `modules`, then for each request line on stdin fork a child
    that runs it; answer the child's pid at once and its wait status when it ends."""
    for module in modules:
        importlib.import_module(module)
    requests, answers = sys.stdin.buffer, os.fdopen(os.dup(1), "w")
    for line in requests:
        run = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(run)   # never returns
        answers.write(json.dumps({"pid": pid}) + "\n")
        answers.flush()
        _, status = os.waitpid(pid, 0)
        answers.write(json.dumps({"status": status}) + "\n")
        answers.flush()


def child(run):
    """In the fork: become the command and end with its exit code."""
    code = 1
    try:
        os.closerange(3, 256)   # the server's pipes stay the server's
        os.setsid()   # its own process group, as a command started alone has
        os.chdir(run["cwd"])
        os.environ.clear()
        os.environ.update(run["env"])
        for fd, path in ((1, run["stdout"]), (2, run["stderr"])):
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, fd)
            os.close(out)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        sys.argv = [run["module"], *run["args"]]
        sys.modules.pop(run["module"], None)   # as `python -m` finds it: not yet imported
        runpy.run_module(run["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 -- as Python reports an uncaught exception
        traceback.print_exc()
    finally:
        atexit._run_exitfuncs()   # as the interpreter does on its way out (MPI_Finalize)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 -- a closed stream: nothing left to say
                pass
        os._exit(code)


class Forks:
    """The test side: a server for `modules`, and run() for each command."""

    def __init__(self, modules, root):
        self.root = root
        self.server = subprocess.Popen([sys.executable, "-m", "tests.forked", *modules],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       cwd=root, text=True, start_new_session=True)
        self._pending = b""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.stdin.close()
        try:
            self.server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()

    def _answer(self, timeout):
        """The server's next line, or None after `timeout` seconds without it (read from
        the pipe itself: a buffered reader would hide a line already read)."""
        fd = self.server.stdout.fileno()
        while b"\n" not in self._pending:
            if not select.select([fd], [], [], timeout)[0]:
                return None
            data = os.read(fd, 1 << 16)
            if not data:
                raise RuntimeError("the fork server ended")
            self._pending += data
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)

    def run(self, module, args, cwd, env, timeout):
        """`python -m MODULE ARGS` in a fork, as conftest.run_with_timeout runs it:
        a CompletedProcess with the exit code (-N for signal N) and both outputs."""
        with tempfile.TemporaryDirectory(prefix="dpbp-fork-") as tmp:
            run = dict(module=module, args=[str(a) for a in args], cwd=str(cwd),
                       env=env, stdout=os.path.join(tmp, "out"), stderr=os.path.join(tmp, "err"))
            self.server.stdin.write(json.dumps(run) + "\n")
            self.server.stdin.flush()
            pid = self._answer(60)["pid"]
            done = self._answer(timeout)
            if done is None:
                os.killpg(pid, signal.SIGKILL)
                self._answer(60)
                pytest.fail(f"python -m {module} {' '.join(run['args'])} did not finish in "
                            f"{timeout} s (forked)")
            status = done["status"]
            code = os.waitstatus_to_exitcode(status)
            with open(run["stdout"]) as out, open(run["stderr"]) as err:
                return subprocess.CompletedProcess([module, *args], code, out.read(), err.read())


if __name__ == "__main__":
    serve(sys.argv[1:])
