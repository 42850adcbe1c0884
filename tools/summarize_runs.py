#!/usr/bin/python3
"""One line per run directory from its metrics.jsonl: the final test accuracy of each phase (the
last evaluated epoch), the last epoch's training accuracy (augmented, with drop-path) and the
training seconds and images of every phase.

  tools/summarize_runs.py [--cost PHASE=MS_PER_IMAGE,...] RUN_DIR [RUN_DIR ...]

With --cost (as tools/plot_compute.py), the summed step-cost of every phase in seconds, and the
wall-clock step-cost with the module phases run in parallel (meta + the slowest module +
fine-tuning), are added.
"""
import json
import os
import sys

from plot_compute import metrics_file, parse_cost  # the same runs, read the same way




def phases(run_dir):
    out = {}
    with open(metrics_file(run_dir)) as f:
        for line in f:
            m = json.loads(line)
            p = out.setdefault(m["phase"], {"images": 0.0, "seconds": 0.0})
            p["epoch"] = m["epoch"]
            p["seconds"] = m["seconds"]
            p["train_accuracy"] = m["train_accuracy"]
            p["last_images"] = m["images"]
            if "test_accuracy" in m:
                p["test_accuracy"] = m["test_accuracy"]
    # images per phase: `images` is cumulative over the phases of a run, in file order
    prev = 0.0
    for name, p in out.items():
        p["images"] = p["last_images"] - prev
        prev = p["last_images"]
    return out


def main(argv):
    cost, argv = parse_cost(argv)
    if len(argv) < 2:
        sys.exit(__doc__)
    for run in argv[1:]:
        ps = phases(run)
        last = list(ps.values())[-1]
        parts = [f"{name} {p.get('test_accuracy', float('nan')):.4f}" for name, p in ps.items()]
        secs = sum(p["seconds"] for p in ps.values())
        line = (f"{os.path.basename(run.rstrip('/'))}: final {last.get('test_accuracy', float('nan')):.4f} "
                f"(train {last['train_accuracy']:.4f}) | {' / '.join(parts)} | {secs:.0f} s measured")
        if cost:
            each = {name: p["images"] * cost[name] / 1000.0 for name, p in ps.items()}
            modules = [v for k, v in each.items() if k.startswith("module")]
            wall = sum(v for k, v in each.items() if not k.startswith("module")) + (max(modules) if modules else 0)
            line += f" | step-cost {sum(each.values()):.0f} s summed, {wall:.0f} s with parallel modules"
        print(line)


if __name__ == "__main__":
    main(sys.argv)
