"""The whole pipelines before/after repeat-vectorized evaluation: `make demo` and the input-curvature study, each run
twice on the same code, once with every evaluation on aihwkit's tiles one repeat at a time (the path hetcomp had
before repeats were vectorized, selected for the whole process by ``HETCOMP_EXACT_TILES=1``) and once with the
default (vectorized where the graph folds).

    python bench/pipeline_timing.py [--out bench/results/pipeline_timing_cpu.txt] [--skip-demo]

Each run is a fresh process in its own scratch folder (so LAFT checkpoints under build/laft are not reused between
the two), with the trained digits CNN's cached weights copied in (training is not what is timed). Run alone: two
torch jobs on a small CPU slow each other many times over.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(command: list[str], exact_tiles: bool) -> tuple[float, str]:
    """(wall seconds, stdout) of ``command`` in a scratch folder holding a copy of build/weights."""
    with tempfile.TemporaryDirectory(prefix="hetcomp-timing-") as scratch:
        weights = ROOT / "build" / "weights"
        if weights.is_dir():
            shutil.copytree(weights, Path(scratch) / "build" / "weights")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HETCOMP_EXACT_TILES": "1" if exact_tiles else "0"}
        start = time.perf_counter()
        done = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def stage_seconds(stdout: str) -> dict[str, tuple[float, float]]:
    """The demo's per-strategy (compile s, evaluate s) from its lines '... (compile X s, evaluate Y s)'."""
    found = {}
    for line in stdout.splitlines():
        match = re.search(r"\(compile ([0-9.]+) s, evaluate ([0-9.]+) s\)$", line)
        if match and line.startswith("  "):  # "  <label padded to 26> <evaluation>  (compile ...)"
            found[line[2:28].strip()] = (float(match.group(1)), float(match.group(2)))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pipeline_timing_cpu.txt")
    parser.add_argument("--skip-demo", action="store_true", help="time the curvature study only")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    jobs = {"curvature study (hetcomp curvature, test split, 3 repeats x 8 profiles)":
            [python, "-m", "hetcomp", "curvature", str(ROOT / "examples" / "digits_cnn.py") + ":build",
             "--out", "curvature"]}
    if not args.skip_demo:
        jobs = {"make demo (examples/demo.py)": [python, str(ROOT / "examples" / "demo.py")], **jobs}
    import torch

    lines = [f"whole pipelines on {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}: every "
             "evaluation on aihwkit's tiles (HETCOMP_EXACT_TILES=1, the path before #15) vs the default"]
    for name, command in jobs.items():
        before, before_out = run(command, exact_tiles=True)
        after, after_out = run(command, exact_tiles=False)
        transcript = args.out.with_name(args.out.stem + ("_demo" if "demo" in name else "_curvature") + ".txt")
        transcript.write_text(after_out)  # what the default path printed, for the README's tables
        lines.append(f"{name}: {before:.1f} s -> {after:.1f} s ({before / after:.2f}x)")
        stages_before, stages_after = stage_seconds(before_out), stage_seconds(after_out)
        for label, (compile_before, eval_before) in stages_before.items():
            compile_after, eval_after = stages_after.get(label, (float("nan"), float("nan")))
            lines.append(f"  {label:26s} compile {compile_before:6.1f} -> {compile_after:6.1f} s   evaluate "
                         f"{eval_before:6.1f} -> {eval_after:6.1f} s")
        print("\n".join(lines[-1 - len(stages_before):]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
