#!/usr/bin/python3
"""Test accuracy against training compute (training seconds, all phases counted) for one or
more runs, drawn with gnuplot from the runs' metrics.jsonl files.

  tools/plot_compute.py OUT.png LABEL=RUN_DIR [LABEL=RUN_DIR ...]

Each RUN_DIR holds the metrics.jsonl written by train_e2e or incubate. For an incubation run
the phases are chained in file order (meta, module0..3, finetune): the x value of a point is
the training time of every earlier phase plus its own. Module phases evaluate the hybrid, so
their points show the hybrid's accuracy.
"""
import json
import os
import subprocess
import sys
import tempfile


def series(run_dir):
    points, offset, phase, last = [], 0.0, None, 0.0
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            if m["phase"] != phase:
                offset += last
                phase, last = m["phase"], 0.0
            last = m["seconds"]
            points.append((offset + m["seconds"], m["test_accuracy"], m["phase"]))
    return points


def main(argv):
    if len(argv) < 3:
        sys.exit(__doc__)
    out, runs = argv[1], [a.split("=", 1) for a in argv[2:]]
    tmp = tempfile.mkdtemp()
    plots = []
    for i, (label, run_dir) in enumerate(runs):
        dat = os.path.join(tmp, f"{i}.dat")
        with open(dat, "w") as f:
            for x, y, phase in series(run_dir):
                f.write(f"{x:.1f} {y:.4f} {phase}\n")
        plots.append(f"'{dat}' using 1:2 with linespoints title '{label}'")
    script = f"""set terminal pngcairo size 900,600 enhanced font 'sans,11'
set output '{out}'
set xlabel 'training compute (seconds on 2 cores, all phases)'
set ylabel 'test accuracy'
set key bottom right
set grid
plot {', '.join(plots)}
"""
    subprocess.run(["gnuplot"], input=script, text=True, check=True)


if __name__ == "__main__":
    main(sys.argv)
