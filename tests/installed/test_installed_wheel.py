"""The package as a user installs it: the wheel, built from the sdist, in a fresh environment.

``make test-wheel`` (a stage of ``make test``) builds the sdist and from it the wheel (``python -m build``),
installs the wheel into a new virtual environment ``.venv-wheel`` (pinned by constraints.txt) and runs
this file with ``REGFW_WHEEL_VENV`` naming that environment. Every check runs the fresh environment's
interpreter or its ``regfw`` script in a subprocess, from a temporary directory, without PYTHONPATH: the
checkout can never be imported, only what the wheel installed. A plain run of the suite leaves this folder
out (tests/conftest.py); ``pytest tests/installed`` without the environment fails rather than skips.

Independent commands run side by side (a thread each, so the two cores overlap them); the generated
plugin is pip-installed only after them, so no other command sees a half-installed package.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import tomllib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: import package -> source folder, as the wheel is built (``[tool.setuptools] package-dir``)
PACKAGE_DIRS: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
VERSION: str = PYPROJECT["project"]["version"]
BUILT_INS: set[str] = set(PYPROJECT["project"]["entry-points"]["regfw"])
PLUGIN = "my_noise"
#: a short fit: one epoch on a fifth of the digits, MC dropout with a few samples at its validation
FIT_OVERRIDES = ["trainer.max_epochs=1", "data.train_fraction=0.2", "uncertainty.samples=8",
                 "uncertainty.every_n_epochs=1", "trainer.enable_progress_bar=false",
                 "trainer.enable_model_summary=false", "run.dir=runs"]
TIMEOUT_S = 300

# Run in the fresh interpreter: import every module of every import package, walking the installed
# packages (never a list), and report where each came from and which files each package holds.
WALK = r"""
import importlib, json, os, pkgutil, sys, sysconfig, traceback
result = {"purelib": sysconfig.get_paths()["purelib"], "sys_path": sys.path, "modules": {}, "scripts": [],
          "errors": {}, "files": {}}
def failed(name):
    exc = sys.exc_info()[1]
    missing = [e.name for e in (exc, exc.__cause__) if isinstance(e, ModuleNotFoundError)]
    result["errors"][name] = {"missing": (missing or [None])[0], "message": str(exc),
                              "traceback": traceback.format_exc()}
for top in sys.argv[1:]:
    try:
        package = importlib.import_module(top)
    except Exception:
        failed(top)
        continue
    result["modules"][top] = package.__file__
    root = os.path.dirname(package.__file__)
    result["files"][top] = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root)
                                  for f in fs if "__pycache__" not in d)
    for info in pkgutil.walk_packages(package.__path__, top + ".", onerror=failed):
        if info.name.rsplit(".", 1)[-1] == "__main__":  # a script: importing it would run it
            result["scripts"].append(info.name)
            continue
        try:
            result["modules"][info.name] = importlib.import_module(info.name).__file__
        except Exception:
            failed(info.name)
print(json.dumps(result))
"""


def source_modules() -> set[str]:
    """Every module and package the checkout's import packages hold, named as installed."""
    found = set()
    for package, folder in PACKAGE_DIRS.items():
        base = ROOT / folder
        for path in base.rglob("*.py"):
            parts = path.relative_to(base).with_suffix("").parts
            # a module belongs to the package only if every folder on the way is a package
            if all((base.joinpath(*parts[:i]) / "__init__.py").is_file() for i in range(len(parts))):
                names = parts[:-1] if parts[-1] == "__init__" else parts
                found.add(".".join((package, *names)))
    return found


def source_data_files(package: str) -> set[str]:
    """The files other than Python sources that the wheel must carry for ``package`` (its package data)."""
    base = ROOT / PACKAGE_DIRS[package]
    return {str(p.relative_to(base)) for p in base.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}


class Fresh:
    """Commands in the fresh environment, never with the checkout importable."""

    def __init__(self, venv: Path) -> None:
        self.venv = venv
        self.bin = venv / "bin"
        # No PYTHONPATH (or any PYTHON* setting), no regfw switches, no other environment's VIRTUAL_ENV.
        # Without PYTHONDONTWRITEBYTECODE the modules a command imports are compiled on first use and kept
        # (the environment is installed with --no-compile), so the later commands start faster.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "REGFW_", "VIRTUAL_ENV"))}
        self.env = {**env, "PATH": f"{self.bin}{os.pathsep}{env.get('PATH', '')}", "OMP_NUM_THREADS": "1",
                    "PYTHONUNBUFFERED": "1"}

    def run(self, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
        """``args[0]`` from the environment's bin/ (python, regfw, pip), the rest as given."""
        command = [str(self.bin / str(args[0])), *map(str, args[1:])]
        return subprocess.run(command, cwd=cwd, env=self.env, capture_output=True, text=True, timeout=TIMEOUT_S)


def explain(proc: subprocess.CompletedProcess[str]) -> str:
    """What a failed command printed, for the assertion message."""
    return (f"$ {' '.join(proc.args)}\nexit {proc.returncode}\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, explain(proc)
    return proc


@pytest.fixture(scope="module")
def fresh() -> Fresh:
    given = os.environ.get("REGFW_WHEEL_VENV")
    venv = Path(given) if given else ROOT / ".venv-wheel"
    if not (venv / "bin" / "regfw").is_file():
        pytest.fail(f"no fresh environment with the wheel installed at {venv}: run `make test-wheel`, which builds it")
    if list(venv.glob("lib/python*/site-packages/regfw_my_noise-*.dist-info")):
        pytest.fail(f"{venv} is not fresh (an earlier run installed regfw-my-noise): run `make test-wheel`, "
                    "which builds it anew")
    return Fresh(venv.resolve())


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("installed")


@pytest.fixture(scope="module")
def started(fresh: Fresh, work: Path) -> Iterator[dict[str, Future]]:
    """The independent command chains, started together; each test awaits the one it checks."""

    def fit_and_predict() -> dict[str, subprocess.CompletedProcess[str]]:
        out = {"init": fresh.run("regfw", "init", "cfg.yaml", cwd=work)}
        if out["init"].returncode == 0:
            out["plan"] = fresh.run("regfw", "plan", "cfg.yaml", cwd=work)
            out["fit"] = fresh.run("regfw", "fit", "cfg.yaml", *FIT_OVERRIDES, cwd=work)
            found = re.search(r"^checkpoint: +(.+)$", out["fit"].stdout, flags=re.M)
            if out["fit"].returncode == 0 and found:
                out["predict"] = fresh.run("regfw", "predict", "cfg.yaml", found.group(1), "--out", "preds.csv",
                                           "--samples", "8", cwd=work)
        return out

    chains: dict[str, Callable[[], object]] = {
        "walk": lambda: fresh.run("python", "-I", "-c", WALK, *PACKAGE_DIRS, cwd=work),
        "version": lambda: fresh.run("python", "-I", "-m", "regfw", "--version", cwd=work),
        "plugins": lambda: fresh.run("regfw", "plugins", cwd=work),
        "fit": fit_and_predict,
        "new-plugin": lambda: fresh.run("regfw", "new-plugin", PLUGIN, cwd=work),
    }
    with ThreadPoolExecutor(max_workers=len(chains)) as pool:
        futures = {name: pool.submit(chain) for name, chain in chains.items()}
        yield futures
        for future in futures.values():
            future.cancel()


def test_the_wheel_built_from_the_sdist_is_what_is_installed(fresh: Fresh, work: Path,
                                                             started: dict[str, Future]) -> None:
    dist = fresh.venv / "dist"
    assert sorted(p.name for p in dist.iterdir()) == [f"regfw-{VERSION}-py3-none-any.whl", f"regfw-{VERSION}.tar.gz"]
    proc = ok(fresh.run("python", "-I", "-c", "from importlib import metadata; d = metadata.distribution('regfw');"
                        "print(d.version); print(d.read_text('direct_url.json'))", cwd=work))
    version, direct_url = proc.stdout.split("\n", 1)
    assert version == VERSION
    assert json.loads(direct_url)["url"] == (dist / f"regfw-{VERSION}-py3-none-any.whl").as_uri()  # not editable
    proc = ok(started["version"].result())
    assert proc.stdout.strip() == f"regfw {VERSION}"  # python -m regfw runs the installed __main__


def test_every_module_of_every_import_package_imports_from_site_packages(fresh: Fresh,
                                                                         started: dict[str, Future]) -> None:
    result = json.loads(ok(started["walk"].result()).stdout)
    # A module may need an optional package (regfw.train.unified: the unified `lightning`). pip installed every
    # required one, so a package that is missing is optional: the import fails for it alone and says how
    # to install it.
    optional = {name: e for name, e in result["errors"].items()
                if e["missing"] and f"pip install {e['missing'].split('.')[0]}" in e["message"]}
    broken = {name: e["traceback"] for name, e in result["errors"].items() if name not in optional}
    assert broken == {}, "\n".join(f"{name}:\n{tb}" for name, tb in broken.items())
    purelib = Path(result["purelib"])
    assert purelib.is_relative_to(fresh.venv)
    outside = {name: path for name, path in result["modules"].items() if not Path(path).is_relative_to(purelib)}
    assert outside == {}, f"imported from outside {purelib}"
    # nothing of the checkout is importable: the only paths inside it are the fresh environment's own
    in_checkout = [p for p in result["sys_path"] if Path(p or ".").resolve().is_relative_to(ROOT)
                   and not Path(p).resolve().is_relative_to(fresh.venv)]
    assert in_checkout == [], result["sys_path"]
    # the installed packages hold exactly the checkout's modules: no sub-package left out, none extra
    installed = set(result["modules"]) | set(result["scripts"]) | set(optional)
    assert installed == source_modules(), (sorted(source_modules() - installed), sorted(installed - source_modules()))
    assert result["scripts"] == ["regfw.__main__"]
    # package data: the typing marker, the templates' configs and the plugin template with its dotfiles
    for package, files in result["files"].items():
        data = {f for f in files if not f.endswith(".py")}
        assert data == source_data_files(package), package
    assert "py.typed" in result["files"]["regfw"]
    assert {"starter.yaml", "demo.yaml", "plugin/.gitignore.tmpl"} <= set(result["files"]["regfw_templates"])


def test_regfw_plugins_lists_every_built_in(started: dict[str, Future]) -> None:
    proc = ok(started["plugins"].result())
    listed = {m.group(1): m.group(2) for m in re.finditer(r"^(\S+) (\S+) \(built-in; module regfw_plugins\.\w+\)$",
                                                         proc.stdout, flags=re.M)}
    assert set(listed) == BUILT_INS, proc.stdout
    assert set(listed.values()) == {VERSION}
    assert "Traceback" not in proc.stderr and "warning" not in proc.stderr.lower(), proc.stderr


def plan_rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.startswith("dropout ")]


def test_plan_fit_with_mc_dropout_and_predict_from_the_installed_package(work: Path,
                                                                         started: dict[str, Future]) -> None:
    out = started["fit"].result()
    ok(out["init"])
    assert (work / "cfg.yaml").is_file()

    # plan: the starter config's dropout on the MLP, rates from the table's ranges
    rows = plan_rows(ok(out["plan"]).stdout)
    assert [(r[1], r[2]) for r in rows] == [("body.0", "input"), ("body.0", "hidden"), ("body.2", "hidden")], rows
    ranges = {"input": (0.1, 0.2), "hidden": (0.3, 0.5)}
    assert all(ranges[r[2]][0] <= float(r[4]) <= ranges[r[2]][1] for r in rows), rows

    # fit: a checkpoint, the run's plan the same layers, and MC dropout measured a spread at validation
    fit = ok(out["fit"])
    run_dir = work / re.search(r"^run directory: +(.+)$", fit.stdout, flags=re.M).group(1)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert [r[:4] for r in plan_rows((run_dir / "plan.txt").read_text())] == [r[:4] for r in rows]
    mi = float(re.search(r"^  mc/mean_mi +([0-9.]+)", fit.stdout, flags=re.M).group(1))
    assert mi > 0, fit.stdout  # dropout active in MC mode: the samples differ
    with open(run_dir / "metrics.csv", newline="") as f:
        mc = [row for row in csv.DictReader(f) if row.get("mc/acc")]
    assert len(mc) == 1 and 0 <= float(mc[0]["mc/acc"]) <= 1

    # predict: one row per validation example, probabilities that sum to one, the referred rows counted
    proc = ok(out["predict"])
    found = re.search(r"^wrote preds\.csv: (\d+) predictions, (\d+) referred", proc.stdout, flags=re.M)
    assert found, proc.stdout
    with open(work / "preds.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == int(found.group(1)) > 0
    assert sum(row["refer"] == "True" for row in table) == int(found.group(2))
    for row in table:
        probs = [float(row[f"prob_{k}"]) for k in range(10)]
        assert math.isclose(sum(probs), 1.0, abs_tol=1e-4)
        assert int(row["prediction"]) == probs.index(max(probs))


@pytest.fixture(scope="module")
def plugin_installed(fresh: Fresh, work: Path, started: dict[str, Future]) -> Path:
    """The generated plugin pip-installed into the fresh environment, once every other command is done."""
    for future in started.values():
        future.exception()  # waits; a failure is reported by the test that checks it
    ok(started["new-plugin"].result())
    path = work / "regfw-my-noise"
    ok(fresh.run("pip", "install", "-q", "-c", ROOT / "constraints.txt", f"{path}[test]", cwd=work))
    return path


def test_new_plugin_writes_the_template_with_its_dotfiles(work: Path, started: dict[str, Future]) -> None:
    proc = ok(started["new-plugin"].result())
    path = work / "regfw-my-noise"
    made = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    assert made == [".gitignore", "README.md", "example.yaml", "pyproject.toml", "regfw_my_noise/__init__.py",
                    "tests/test_my_noise.py", "tests/test_typing.py"], made
    assert f"wrote regfw-my-noise/ (regularizer '{PLUGIN}')" in proc.stdout


def test_the_generated_plugin_installs_is_listed_and_passes_its_own_tests(fresh: Fresh, work: Path,
                                                                           plugin_installed: Path) -> None:
    with ThreadPoolExecutor(max_workers=2) as pool:
        listing = pool.submit(fresh.run, "regfw", "plugins", "--check", cwd=work)
        own = pool.submit(fresh.run, "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests",
                          cwd=plugin_installed)
        listing_proc, tests_proc = listing.result(), own.result()
    ok(listing_proc)
    assert f"{PLUGIN} 0.1.0 (regfw-my-noise; module regfw_my_noise)" in listing_proc.stdout, listing_proc.stdout
    assert re.search(rf"^  regularizers: {PLUGIN}$", listing_proc.stdout, flags=re.M), listing_proc.stdout
    ok(tests_proc)
    summary = tests_proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ passed in [0-9.]+s( \([0-9:]+\))?", summary), summary  # none skipped or failed
    assert int(summary.split()[0]) >= 10


def test_no_checkout_on_the_path_of_the_plugins_tests(fresh: Fresh, plugin_installed: Path) -> None:
    proc = ok(fresh.run("python", "-c", "import regfw, regfw_my_noise; print(regfw.__file__); "
                        "print(regfw_my_noise.__file__)", cwd=plugin_installed))
    regfw_file, plugin_file = map(Path, proc.stdout.split())
    assert regfw_file.is_relative_to(fresh.venv) and not regfw_file.is_relative_to(ROOT / "regfw")
    assert plugin_file.is_relative_to(plugin_installed)  # `python -m pytest` there imports the author's sources

