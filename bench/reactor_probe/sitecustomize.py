"""A measurement probe for `cimhes serve` (bench only, not part of cimhes): what each reactor turn
costs, and what the store's thread does meanwhile.

Put this folder on PYTHONPATH and name an output file; every `cimhes serve` started with that
environment (a bench's head-end) writes `$CIMHES_TURN_PROBE.<pid>`:

    PYTHONPATH=bench/reactor_probe CIMHES_TURN_PROBE=/tmp/turns python bench/concurrent_calls.py
    python bench/reactor_probe/report.py /tmp/turns.<pid>

One line per reactor turn with 10 ms or more of work (the poll's wait left out): its
runUntilCurrent and event handling, the reactor thread's time on a CPU and waiting runnable for
one (/proc/thread-self/schedstat; the rest of the turn it was off the CPU and not runnable:
waiting for the interpreter lock), and the store thread's CPU meanwhile. It wraps the reactor's
`runUntilCurrent` and poller, so it costs a little of what it measures.
"""
import os
import sys
import threading
import time

if os.environ.get("CIMHES_TURN_PROBE") and len(sys.argv) > 1 and sys.argv[1] == "serve":
    def _install(reactor):
        out = open(os.environ["CIMHES_TURN_PROBE"] + f".{os.getpid()}", "w")
        state = {"flush": time.monotonic()}
        run = reactor.runUntilCurrent
        poller = reactor._poller
        schedstat = os.open(f"/proc/self/task/{threading.get_native_id()}/schedstat", os.O_RDONLY)
        store = [t for t in threading.enumerate() if "store" in t.name]
        store_clock = time.pthread_getcpuclockid(store[0].ident) if store else None

        def sched():
            on_cpu, runnable, _ = os.pread(schedstat, 100, 0).split()
            return int(on_cpu) / 1e9, int(runnable) / 1e9

        def store_cpu():
            return time.clock_gettime(store_clock) if store_clock is not None else 0.0

        class Poller:
            def __getattr__(self, name):
                return getattr(poller, name)

            def poll(self, *args):
                started = time.perf_counter()
                events = poller.poll(*args)
                state["polled"] = time.perf_counter()
                state["wait"] = state["polled"] - started
                return events

        def run_until_current():
            try:
                measure()
            except Exception:  # a probe's fault must never stop the reactor's turn
                pass
            started = time.perf_counter()
            run()
            state["run"] = time.perf_counter() - started

        def measure():
            now = time.perf_counter()
            on_cpu, runnable = sched()
            cpu = store_cpu()
            if "polled" in state and state["polled"] >= state["t"]:
                whole = now - state["t"]
                work = whole - state["wait"]
                if work >= 0.010:
                    out.write(f"T work {work * 1000:.1f} run {state['run'] * 1000:.1f} "
                              f"oncpu {(on_cpu - state['sched'][0]) * 1000:.1f} "
                              f"runq {(runnable - state['sched'][1]) * 1000:.1f} "
                              f"wait {state['wait'] * 1000:.1f} store {(cpu - state['cpu']) * 1000:.1f}\n")
            state.update(t=now, sched=(on_cpu, runnable), cpu=cpu)
            if now - state["flush"] > 0.5:
                out.flush()
                state["flush"] = now

        # Installed from a call inside a turn: that turn is the first measured.
        state.update(t=time.perf_counter(), sched=sched(), cpu=store_cpu(), run=0.0)
        reactor._poller = Poller()
        reactor.runUntilCurrent = run_until_current

    def _wait_for_reactor():
        while not getattr(sys.modules.get("twisted.internet.reactor"), "running", False):
            time.sleep(0.05)
        reactor = sys.modules["twisted.internet.reactor"]
        reactor.callFromThread(_install, reactor)

    threading.Thread(target=_wait_for_reactor, daemon=True, name="turn-probe").start()
