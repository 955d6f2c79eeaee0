"""Mutation testing: do the tests catch single-line bugs in the folding, fusing and detection code?

    python benchmarks/mutation.py --target fold            # one target (about 10-30 min on 2 cores)
    python benchmarks/mutation.py --target all --jobs 4    # every target
    python benchmarks/mutation.py --target fold --show     # then print each surviving mutant's diff

Uses mutmut (``pip install mutmut``, >= 3.8). For each target, the tracked files of this checkout are
copied into ``--work/<target>`` (the checkout is never touched), a ``setup.cfg`` there tells mutmut
which file(s) to mutate and which test files to run, and ``mutmut run`` plants every mutant it can
make (one operator, constant or call changed at a time) and runs the tests that cover the mutated
function. A mutant is *killed* when a test fails, *survives* when every test passes; a *timeout*
(the tests ran far longer than without the mutant) counts as caught. The summary line per target is
``killed / (killed + survived + timeout)``; docs/testing.md records the last run and explains each
survivor that is equivalent (no test could kill it, because the behaviour does not change).

Targets and their tests (each target's tests are the files that claim to check it):
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# target: (files to mutate, test files that check them)
TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "fold": (("asrfx/algebra/fold.py",),
             ("tests/algebra/test_fold_math.py", "tests/algebra/test_fold_properties.py", "tests/passes/test_fold_rules.py")),
    "rules": (("asrfx/algebra/rules.py", "asrfx/passes/absorb.py"),
              ("tests/passes/test_plan.py", "tests/passes/test_fold_rules.py", "tests/passes/test_fold_agreement.py", "tests/algebra/test_fold_properties.py",
               "tests/passes/test_fuse.py", "tests/passes/test_fuse_properties.py", "tests/passes/test_gate_in_layers.py",
               "tests/passes/test_contract.py", "tests/passes/test_detect_records.py", "tests/passes/test_third_party_patterns.py")),
    "contract": (("asrfx/passes/contract.py",),
                 ("tests/passes/test_contract.py", "tests/passes/test_fuse.py", "tests/passes/test_no_silent_damage.py",
                  "tests/passes/test_convert.py", "tests/deploy/test_deploy.py")),
}
__doc__ += "".join(f"\n    {name:<9} {', '.join(files)}  <-  {', '.join(Path(t).name for t in tests)}"
                   for name, (files, tests) in TARGETS.items())


def _tracked(root: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line]


def prepare(target: str, work: Path) -> Path:
    """A copy of the tracked tree with mutmut's configuration for ``target``."""
    files, tests = TARGETS[target]
    scratch = work / target
    if scratch.exists():
        shutil.rmtree(scratch)
    for rel in _tracked(ROOT):
        src = ROOT / rel
        if src.is_file():
            (scratch / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, scratch / rel)
    (scratch / "setup.cfg").write_text(
        "[mutmut]\n"
        "source_paths=asrfx\n"
        "only_mutate=\n" + "".join(f"    {f}\n" for f in files)
        + "pytest_add_cli_args_test_selection=\n" + "".join(f"    {t}\n" for t in tests)
        + "pytest_add_cli_args=\n    -p\n    no:cacheprovider\n    -x\n    -q\n"
        + "also_copy=\n    tests/\n    benchmarks/\n    docs/\n"
    )
    return scratch


def run(target: str, work: Path, jobs: int) -> dict:
    scratch = prepare(target, work)
    # mutmut forks its workers from a process that already ran torch: a forked child that starts
    # torch's OpenMP thread pool again deadlocks (every mutant then "times out"); one thread each
    env = {**os.environ, "HYPOTHESIS_PROFILE": "mutation", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    mutmut = [sys.executable, "-m", "mutmut"]
    subprocess.run([*mutmut, "run", "--max-children", str(jobs)], cwd=scratch, env=env, check=False)
    subprocess.run([*mutmut, "export-cicd-stats"], cwd=scratch, env=env, check=True)
    stats = json.loads((scratch / "mutants" / "mutmut-cicd-stats.json").read_text())
    listing = subprocess.run([*mutmut, "results", "--all", "true"], cwd=scratch, env=env,
                             capture_output=True, text=True, check=False).stdout
    survivors = [line.split(":")[0].strip() for line in listing.splitlines() if line.strip().endswith(": survived")]
    stats["survivors"] = survivors
    return stats


def summary(target: str, stats: dict) -> str:
    killed, survived, timeout = stats.get("killed", 0), stats.get("survived", 0), stats.get("timeout", 0)
    untested = stats.get("no_tests", 0)
    caught = killed + timeout
    tested = caught + survived
    rate = 100.0 * caught / tested if tested else float("nan")
    overall = 100.0 * caught / (tested + untested) if tested + untested else float("nan")
    return (f"{target:<9} {tested + untested:4d} mutants: {killed} killed, {timeout} timed out, {survived} survived, "
            f"{untested} in code no selected test runs, {stats.get('skipped', 0)} skipped -> caught {rate:.1f}% "
            f"of those the tests run, {overall:.1f}% of all")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="fold", choices=[*TARGETS, "all"])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work", type=Path, default=Path("/tmp/asrfx-mutation"))
    parser.add_argument("--show", action="store_true", help="print the diff of every surviving mutant")
    parser.add_argument("--json", type=Path, help="write the counts and survivors per target to this file")
    args = parser.parse_args()
    try:
        import mutmut  # noqa: F401
    except ImportError:
        sys.exit("mutation testing needs mutmut: pip install 'mutmut>=3.8'")
    targets = list(TARGETS) if args.target == "all" else [args.target]
    results = {}
    for target in targets:
        results[target] = run(target, args.work, args.jobs)
        if args.show:
            for name in results[target]["survivors"]:
                subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=args.work / target, check=False)
    print()
    for target, stats in results.items():
        print(summary(target, stats))
        for name in stats["survivors"]:
            print(f"    survived: {name}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
