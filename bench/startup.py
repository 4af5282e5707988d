"""Command-line start-up: CPU time of ``regfw plan``, ``regfw plugins``, ``regfw init`` and config
errors, next to ``import torch`` and ``regfw --help``, measured side by side in one run; ends with
the ratio ``regfw plan`` / ``import torch`` (target: at most 1.15) and whether ``regfw plugins`` and
``regfw --help`` stay within 0.3 s.

Each command runs in a fresh interpreter; the CPU time (user + system of the child) is the median
of interleaved repeats, so a busy machine affects all alike. A first probe run of each command
records whether it imports torch: for those that do (``plan`` and ``plugins`` build plugins and
models, and a regularizer-section error needs the plugin's settings class), the honest figure is
the overhead above ``import torch`` in the same run, printed beside the total; the others should
cost about what ``regfw --help`` does. The children may write bytecode caches (an installed package
has them; ``PYTHONDONTWRITEBYTECODE`` is dropped from their environment), and one unmeasured round
runs first.

Usage: ``python bench/startup.py [--repeats N]``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
PROBE = ("import json, runpy, sys\nsys.argv = ['regfw', *sys.argv[1:]]\ntry:\n    runpy.run_module('regfw', "
         "run_name='__main__')\nexcept SystemExit:\n    pass\nprint('\\nPROBE ' + json.dumps({m: m in sys.modules "
         "for m in ('torch', 'pytorch_lightning', 'omegaconf')}))")


def run(cmd: list[str]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one run of ``cmd``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def imports_of(args: list[str]) -> dict[str, bool]:
    """Which heavy packages ``regfw ARGS`` leaves in ``sys.modules``."""
    out = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         check=False).stdout
    line = next((x for x in out.splitlines() if x.startswith("PROBE ")), None)
    return json.loads(line[len("PROBE "):]) if line else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    py = sys.executable
    tmp = tempfile.mkdtemp(prefix="regfw-startup-")
    commands = {
        "regfw --help": ["--help"],
        "regfw plan templates/demo.yaml": ["plan", "templates/demo.yaml"],
        "regfw plugins": ["plugins"],
        "regfw init NEW.yaml": ["init", os.path.join(tmp, "new.yaml"), "--force"],
        "error: missing config file": ["plan", os.path.join(tmp, "missing.yaml")],
        "error: trainer.max_epoch=3 (unknown key)": ["plan", "templates/demo.yaml", "trainer.max_epoch=3"],
        "error: uncertainty.samples=1": ["plan", "templates/demo.yaml", "uncertainty.samples=1"],
        "error: regularizers.dropout.hiden=0.3": ["plan", "templates/demo.yaml", "regularizers.dropout.hiden=0.3"],
    }
    cases = {"python -c 'import torch'": [py, "-c", "import torch"],
             "python -c 'import pytorch_lightning'": [py, "-c", "import torch, pytorch_lightning"],
             **{name: [py, "-m", "regfw", *a] for name, a in commands.items()}}
    imported = {name: imports_of(a) for name, a in commands.items()}
    for cmd in cases.values():  # warm-up: bytecode caches, the page cache
        run(cmd)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
    for _ in range(args.repeats):
        for name, cmd in cases.items():
            times[name].append(run(cmd))
    cpu = {k: statistics.median(c for c, _ in v) for k, v in times.items()}
    wall = {k: statistics.median(w for _, w in v) for k, v in times.items()}
    torch_cpu = cpu["python -c 'import torch'"]
    print(f"start-up, median of {args.repeats} interleaved runs (CPU = user + system of the process)")
    print(f"    {'':44} {'CPU s':>6} {'above import torch':>19} {'wall s':>7}  imports torch")
    for name in cases:
        info = imported.get(name)
        uses_torch = info.get("torch") if info else None
        above = f"{cpu[name] - torch_cpu:+.2f} s" if uses_torch else ""
        flag = "" if info is None else ("yes" if uses_torch else "no") + (
            ", Lightning" if info.get("pytorch_lightning") else "")
        print(f"    {name:<44} {cpu[name]:6.2f} {above:>19} {wall[name]:7.2f}  {flag}")
    plan = "regfw plan templates/demo.yaml"
    ratios = sorted(p / t for p, t in zip((c for c, _ in times[plan]),
                                          (c for c, _ in times["python -c 'import torch'"]), strict=True))
    ratio = cpu[plan] / torch_cpu
    print(f"regfw plan / import torch, CPU: {ratio:.3f}x (target <= 1.15: {'met' if ratio <= 1.15 else 'NOT met'}; "
          f"the {len(ratios)} side-by-side pairs: {', '.join(f'{r:.2f}' for r in ratios)})")
    for name in ("regfw plugins", "regfw --help"):
        print(f"{name}, CPU: {cpu[name]:.3f} s (target <= 0.3 s: {'met' if cpu[name] <= 0.3 else 'NOT met'})")


if __name__ == "__main__":
    main()
