"""Benchmark a tool call in its own process (``lightning_unified.environments.tool_worker``)
against the plain call in the trainer's process, and against the thread the old code ran it
in, on the tool task's ``multiply``; the medians of ``--calls`` calls each, in one sitting:

- ``direct``: ``multiply(a, b)`` in this process (no timeout possible);
- ``thread``: a daemon thread started and joined per call (a timeout, but one that cannot
  stop a hung tool);
- ``process``: ``run_tool_call`` with a warm worker (pickle the call, send it, run, answer);
- ``first call``: the run's first call, which starts the forkserver (importing the package
  there once) and a worker; once per run;
- ``after a timeout``: a call right after a hung tool's process was killed, which forks a
  fresh worker from the forkserver.

    python scripts/benchmark_tools.py --calls 200
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from lightning_unified.environments.tool_worker import close_tool_processes
from lightning_unified.environments.tools import ToolCall, run_tool_call
from lightning_unified.tasks.multiply import multiply


def hang(a: int, b: int) -> int:
    """Sleep past any timeout.

    Args:
        a: The first factor.
        b: The second factor.
    """
    time.sleep(3600)
    return a * b


def timed(fn, calls: int) -> float:
    """Median seconds of ``fn()`` over ``calls`` calls."""
    seconds = []
    for _ in range(calls):
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def in_a_thread() -> None:
    out = {}
    thread = threading.Thread(target=lambda: out.update(value=multiply(123, 456)), daemon=True)
    thread.start()
    thread.join(10.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--timeouts", type=int, default=5, help="hung calls, each followed by a timed call")
    args = parser.parse_args()
    tools, call = {"multiply": multiply}, ToolCall("multiply", {"a": 123, "b": 456})
    started = time.perf_counter()
    assert run_tool_call(call, tools, 10.0).content == "56088"
    first = time.perf_counter() - started
    direct = timed(lambda: multiply(123, 456), args.calls)
    thread = timed(in_a_thread, args.calls)
    process = timed(lambda: run_tool_call(call, tools, 10.0), args.calls)
    after = []
    for _ in range(args.timeouts):
        assert run_tool_call(ToolCall("hang", {"a": 1, "b": 2}), {"hang": hang}, 0.2).timed_out
        started = time.perf_counter()
        run_tool_call(call, tools, 10.0)
        after.append(time.perf_counter() - started)
    close_tool_processes()
    print(f"direct           {direct * 1e6:10.1f} us")
    print(f"thread           {thread * 1e6:10.1f} us  ({thread / direct:.0f}x direct)")
    print(f"process          {process * 1e6:10.1f} us  ({process / direct:.0f}x direct, {process / thread:.1f}x thread)")
    print(f"after a timeout  {statistics.median(after) * 1e3:10.1f} ms  (median of {args.timeouts})")
    print(f"first call       {first:10.2f} s   (once per run: the forkserver imports the package)")


if __name__ == "__main__":
    main()
