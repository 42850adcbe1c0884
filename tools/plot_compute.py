#!/usr/bin/python3
"""Test accuracy against training compute for one or more runs, drawn with gnuplot from the
runs' metrics.jsonl files.

  tools/plot_compute.py [--cost PHASE=MS_PER_IMAGE,...] OUT.png LABEL=RUN_DIR [LABEL=RUN_DIR ...]

Each RUN_DIR holds the metrics.jsonl written by train_e2e or incubate. Phases are chained in
file order (meta, module0..3, finetune): a point's x is the compute of every earlier phase plus
its own. Without --cost, compute is the training wall time the runs measured. With --cost, it
is images trained in each phase times that phase's cost per image (ms, from a benchmark on a
quiet machine, e.g. build/bench/incubation), which does not depend on what else the machine
was doing. Module phases evaluate the hybrid, so their points show the hybrid's accuracy.
"""
import json
import os
import subprocess
import sys
import tempfile



def metrics_file(run):
    """A run directory's metrics.jsonl, or a committed copy: RUN itself or RUN.metrics.jsonl."""
    for path in (os.path.join(run, "metrics.jsonl"), run, run + ".metrics.jsonl"):
        if os.path.isfile(path):
            return path
    sys.exit(f"no metrics.jsonl for '{run}'")

def series(run_dir, cost):
    """(compute, test accuracy, phase) per metrics line. `images` in the log is cumulative over
    the phases of a run, so consecutive lines differ by the images trained in that epoch."""
    points, x, prev_images, offset, phase, last = [], 0.0, 0.0, 0.0, None, 0.0
    with open(metrics_file(run_dir)) as f:
        for line in f:
            m = json.loads(line)
            if cost:
                if m["phase"] not in cost:
                    sys.exit(f"plot_compute: no --cost given for phase '{m['phase']}'")
                x += (m["images"] - prev_images) * cost[m["phase"]] / 1000.0
                prev_images = m["images"]
            else:  # seconds restart at each phase
                if m["phase"] != phase:
                    offset, phase = offset + last, m["phase"]
                last = m["seconds"]
                x = offset + last
            if "test_accuracy" in m:  # absent on epochs not evaluated (--eval-every)
                points.append((x, m["test_accuracy"], m["phase"]))
    return points


def parse_cost(argv):
    """An optional leading `--cost PHASE=MS_PER_IMAGE,...`: (the costs by phase, the other args)."""
    if len(argv) > 1 and argv[1] == "--cost":
        cost = {k: float(v) for k, v in (item.split("=") for item in argv[2].split(","))}
        return cost, argv[:1] + argv[3:]
    return {}, argv


def main(argv):
    cost, argv = parse_cost(argv)
    if len(argv) < 3:
        sys.exit(__doc__)
    out, runs = argv[1], [a.split("=", 1) for a in argv[2:]]
    tmp = tempfile.mkdtemp()
    plots = []
    for i, (label, run_dir) in enumerate(runs):
        dat = os.path.join(tmp, f"{i}.dat")
        with open(dat, "w") as f:
            for x, y, phase in series(run_dir, cost):
                f.write(f"{x:.1f} {y:.4f} {phase}\n")
        plots.append(f"'{dat}' using 1:2 with linespoints title '{label}'")
    xlabel = ("training compute (seconds of quiet-machine step time, all phases)" if cost
              else "training compute (measured training seconds on 2 cores, all phases)")
    script = f"""set terminal pngcairo size 900,600 enhanced font 'sans,11'
set output '{out}'
set xlabel '{xlabel}'
set ylabel 'test accuracy'
set key bottom right
set grid
plot {', '.join(plots)}
"""
    subprocess.run(["gnuplot"], input=script, text=True, check=True)


if __name__ == "__main__":
    main(sys.argv)
