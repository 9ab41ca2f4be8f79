"""Summary of a turn probe's file (bench/reactor_probe/sitecustomize.py): for turns with at least
10, 20 and 30 ms of work, how their time split between the reactor on a CPU, runnable waiting
for one, and off the CPU (the interpreter lock), and the store thread's CPU meanwhile."""
import sys

rows = []
for line in open(sys.argv[1]):
    parts = line.split()
    if parts[0] == "T":
        fields = dict(zip(parts[1::2], map(float, parts[2::2])))
        rows.append(fields)
for least in (10, 20, 30):
    chosen = [r for r in rows if r["work"] >= least]
    if not chosen:
        continue
    work = sum(r["work"] for r in chosen)
    on_cpu = sum(r["oncpu"] for r in chosen)
    runnable = sum(r["runq"] for r in chosen)
    store = sum(r["store"] for r in chosen)
    print(f"turns with >= {least} ms of work: {len(chosen)}, {work:.0f} ms: reactor on a CPU "
          f"{on_cpu / work:.0%}, runnable {runnable / work:.0%}, waiting for the lock "
          f"{1 - (on_cpu + runnable) / work:.0%}; store thread on a CPU meanwhile "
          f"{store / work:.0%}; longest {max(r['work'] for r in chosen):.0f} ms")
