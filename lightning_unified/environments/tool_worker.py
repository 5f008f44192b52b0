"""Tool calls in a process of their own, which a timeout can stop.

A thread cannot be stopped: a tool that hangs in one keeps running, and a spinning one
takes the trainer's Python time for the rest of the run. So each call goes to a worker
process, and a call still running at its timeout is ended with its process (killed and
joined: nothing of it is left). Idle workers are kept for the next call, since starting one
costs far more than a call (``scripts/benchmark_tools.py``; docs/guides/environments.md has
the figures).

Workers come from a ``forkserver`` that has imported this package once: forking the
trainer itself would copy its threads' locks (torch's, CUDA's) into the child, and a fresh
``spawn`` would import torch and the tool's module again after every timeout. A call sends
the tool and its arguments pickled: a tool is a module-level function (or a
``functools.partial`` of one), or a method of a picklable object; that object travels with
the call and its state comes back after it, so a method can keep the episode's state as it
would in this process (what cannot be pickled, a client or a lock, must be left out by the
object's ``__getstate__``).
"""

from __future__ import annotations

import inspect
import json
import multiprocessing
import pickle
import threading
from dataclasses import dataclass

# how long a fresh worker may take to load a tool (import its module) before the call counts as failed;
# the tool's own timeout starts once it runs
START_SECONDS = 120.0
WORKER_NAME = "lightning_unified-tool"

_context = None
_idle: list[_Worker] = []
_lock = threading.Lock()


@dataclass
class Outcome:
    """A call's result as text (a str, or the value as JSON); or the exception the tool
    raised (``raised``: its type and message), or why it could not run (``error``), or that
    it ran past its timeout."""

    content: str | None = None
    raised: str | None = None
    error: str | None = None
    timed_out: bool = False


def _forkserver():
    global _context
    if _context is None:
        context = multiprocessing.get_context("forkserver")
        # the server imports the package once (torch, transformers), before any thread starts;
        # every worker forked from it starts with them loaded ("__main__" is the default's)
        context.set_forkserver_preload(["__main__", __name__])
        _context = context
    return _context


def _serve(connection) -> None:
    """A worker's loop: load a call, say it runs, run it, answer (the bound object's state too)."""
    while True:
        try:
            payload = connection.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            tool, arguments = pickle.loads(payload)
        except Exception as error:  # noqa: BLE001 - the trainer hears why
            connection.send(("error", f"the tool could not be loaded in its process ({type(error).__name__}: {error}); "
                                      f"define tools in a module, not in __main__ or a function"))
            continue
        connection.send(("running",))
        try:
            value = tool(**arguments)
            content = value if isinstance(value, str) else json.dumps(value, default=str)
            reply = ("value", content)
        except BaseException as error:  # noqa: BLE001 - every failure goes back to the policy
            reply = ("raised", f"{type(error).__name__}: {error}")
        try:
            connection.send((*reply, _state(tool)))
        except Exception as error:  # noqa: BLE001 - an object that cannot travel back
            connection.send(("error", f"the tool's object cannot be sent back ({type(error).__name__}: {error})"))


def _state(tool) -> bytes | None:
    """The pickled object a method is bound to (its state after the call), else None."""
    owner = getattr(tool, "__self__", None) if inspect.ismethod(tool) else None
    return None if owner is None or inspect.isclass(owner) else pickle.dumps(owner)


class _Worker:
    def __init__(self):
        context = _forkserver()
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child,), daemon=True, name=WORKER_NAME)
        self.process.start()
        child.close()

    def call(self, payload: bytes, timeout: float) -> tuple | None:
        """The worker's answer to one call; None when it runs past ``timeout`` seconds."""
        self.connection.send_bytes(payload)
        if not self.connection.poll(START_SECONDS):
            return ("error", f"the tool's process did not load it within {START_SECONDS:g} s")
        started = self.connection.recv()
        if started[0] != "running":
            return started
        return self.connection.recv() if self.connection.poll(timeout) else None

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.connection.close()


def check_picklable(tool) -> str | None:
    """Why ``tool`` cannot be sent to a worker process, or None when it can."""
    try:
        pickle.dumps(tool)
    except Exception as error:  # noqa: BLE001 - the caller names the tool
        return f"{type(error).__name__}: {error}"
    return None


def call_tool(tool, arguments: dict, timeout: float) -> Outcome:
    """``tool(**arguments)`` in a worker process, stopped (the process killed) after
    ``timeout`` seconds. A method's object gets the state the call left it in."""
    try:
        payload = pickle.dumps((tool, arguments))
    except Exception as error:  # noqa: BLE001 - arguments the policy wrote that cannot travel: the call fails
        return Outcome(error=f"the call cannot be sent to the tool's process ({type(error).__name__}: {error})")
    with _lock:
        worker = _idle.pop() if _idle else None
    worker = worker or _Worker()
    reply = None
    try:
        reply = worker.call(payload, timeout)
    except (EOFError, OSError):  # the tool ended its process (os._exit, a crash)
        reply = ("error", f"the tool's process ended (exit code {worker.process.exitcode})")
    finally:
        if reply is None or reply[0] == "error":
            worker.kill()
        else:
            with _lock:
                _idle.append(worker)
    if reply is None:
        return Outcome(timed_out=True)
    if reply[0] == "error":
        return Outcome(error=reply[1])
    kind, text, state = reply
    if state is not None and hasattr(tool.__self__, "__dict__"):
        try:
            tool.__self__.__dict__.update(pickle.loads(state).__dict__)
        except Exception as error:  # noqa: BLE001 - the object's state did not come back: the call fails
            return Outcome(error=f"the tool's object cannot be read back ({type(error).__name__}: {error})")
    return Outcome(content=text) if kind == "value" else Outcome(raised=text)


def close_tool_processes() -> None:
    """End the idle workers (the next call starts one again)."""
    with _lock:
        workers, _idle[:] = list(_idle), []
    for worker in workers:
        worker.kill()
