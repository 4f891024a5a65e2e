"""Run every `benchmarks/bench_*.py` and print one table of their ratios.

Each benchmark prints machine-readable lines `RESULT {json}` through
`_runner.report_ratio(benchmark, backend, metric, ratio, target)`; this
script runs them one after the other (each in its own process, its output
shown as it comes, indented), collects those lines and prints:

    benchmark  backend  metric  ratio  target  met?

`met?` is `yes`/`NO` for a target such as `<= 1.10` or `>= 50`, and `-` for
an informative number without a target. A benchmark that exits nonzero or
prints no RESULT line is listed as failed and makes the exit status 1;
missed targets do too with `--strict`.

How each script is called:
- one that takes `--backends` (its own flag, or `_runner.run_per_backend`'s)
  gets the requested backends once; any other runs once per backend with
  `KERAS_BACKEND` set;
- `--quick` is passed to scripts that take it; scripts without it get
  the smaller sizes in `QUICK_FALLBACK` when they take those flags (and run
  at their defaults otherwise);
- `--args "bench_x=--hidden 2048 --layers 8"` appends flags to one script
  (repeatable; explicit flags win over `--quick`'s sizes).

On this project's CPU machines (2 cores):

    python benchmarks/run_all.py --quick --backends jax    # a few minutes
    python benchmarks/run_all.py                           # the issues' sizes: long

On a GPU machine (the ratios then measure GPU kernels; the issues' targets
were set for these sizes on CPU, so read GPU numbers as new measurements):

    python -m venv .venv && . .venv/bin/activate
    pip install -e ".[dev]"                # without constraints.txt: it pins the CPU torch
    pip install -U "jax[cuda12]"           # CUDA jax
    pip install -U torch --index-url https://download.pytorch.org/whl/cu124   # CUDA torch
    python -c "import jax, torch; print(jax.devices(), torch.cuda.is_available())"
    python benchmarks/run_all.py --backends jax torch
    # larger sizes, per script:
    python benchmarks/run_all.py --backends jax torch \\
        --args "bench_flexlora=--hidden 2048 --layers 8 --seq 512 --batch 8" \\
        --args "bench_lora_vs_builtin=--hidden 2048 --layers 8 --seq 512 --batch 8" \\
        --args "bench_sinc_memory=--hidden 4096 --intermediate 16384"

(tensorflow finds a GPU only with its CUDA build, `pip install
"tensorflow[and-cuda]"`, whose CUDA libraries may clash with torch's; keep
it on CPU or use a separate environment for it.)
"""

import argparse
import json
import operator
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _runner import gemma_parser  # noqa: E402  (the shared driver's flags)

_RUNNER_FLAGS = {flag for action in gemma_parser("")._actions for flag in action.option_strings}

#: Smaller sizes for scripts that have size flags but no `--quick` of their own.
QUICK_FALLBACK = {
    "bench_lora_vs_builtin": ["--hidden", "128", "--layers", "2", "--seq", "32",
                              "--batch", "2", "--rounds", "3"],
    "bench_sinc_memory": ["--hidden", "256", "--intermediate", "1024", "--seq", "64"],
}

_COMPARE = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}
_TARGET = re.compile(r"^\s*(<=|>=|<|>)\s*([-+0-9.eE]+)\s*$")


def target_met(ratio, target):
    """`True`/`False` for a target like `"<= 1.10"`, `None` when there is none.

    Raises a `ValueError` for a target text that is neither empty nor
    `<op> <number>`.
    """
    if not target.strip():
        return None
    match = _TARGET.match(target)
    if match is None:
        raise ValueError(
            f"Cannot read the target {target!r}: write it as '<= 1.1', '>= 50', '< x' or "
            "'> x', or '' for an informative number."
        )
    return bool(_COMPARE[match.group(1)](ratio, float(match.group(2))))


def discover(only):
    """The `bench_*.py` scripts next to this file, filtered by `only` substrings."""
    scripts = sorted(HERE.glob("bench_*.py"))
    if only:
        scripts = [s for s in scripts if any(o in s.stem for o in only)]
    return scripts


def parse_extra(entries, scripts):
    """`--args "bench_x=FLAGS"` entries as `{script stem: [flags]}`."""
    names = {s.stem for s in scripts}
    extra = {}
    for entry in entries:
        name, sep, flags = entry.partition("=")
        name = name.strip().removesuffix(".py")
        if not sep or name not in names:
            raise SystemExit(
                f"--args {entry!r}: write it as 'SCRIPT=FLAGS' with SCRIPT one of "
                f"{sorted(names)}, e.g. --args 'bench_flexlora=--hidden 1024'."
            )
        extra.setdefault(name, []).extend(shlex.split(flags))
    return extra


def accepts(source, flag):
    """Whether a script (its source text) takes `flag`: its own argparse flag,
    or one of `_runner.gemma_parser`'s when it runs through `run_per_backend`."""
    if f'"{flag}"' in source:
        return True
    return "run_per_backend(" in source and flag in _RUNNER_FLAGS


def invocations(script, backends, quick, extra):
    """`(label, argv, env)` for each run of `script`."""
    source = script.read_text()
    flags = []
    if quick:
        if accepts(source, "--quick"):
            flags.append("--quick")
        else:
            fallback = QUICK_FALLBACK.get(script.stem, [])
            if all(accepts(source, flag) for flag in fallback if flag.startswith("--")):
                flags.extend(fallback)
    flags.extend(extra.get(script.stem, []))
    base = [sys.executable, str(script)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if accepts(source, "--backends"):
        return [(" ".join(backends), [*base, "--backends", *backends, *flags], env)]
    return [(backend, [*base, *flags], dict(env, KERAS_BACKEND=backend)) for backend in backends]


def run_one(argv, env, timeout):
    """Run one benchmark process, echoing its output; return (exit code, RESULT dicts)."""
    results = []
    proc = subprocess.Popen(argv, env=env, cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    start = time.monotonic()
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith("RESULT "):
                try:
                    results.append(json.loads(line[len("RESULT "):]))
                except json.JSONDecodeError:
                    print(f"    | (unreadable RESULT line) {line}")
                    continue
            print(f"    | {line}", flush=True)
            if timeout and time.monotonic() - start > timeout:
                proc.kill()
                print(f"    | killed after {timeout:.0f}s (--timeout)")
                break
        code = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, results


def format_table(rows):
    headers = ("benchmark", "backend", "metric", "ratio", "target", "met?")
    cells = []
    for r in rows:
        met = target_met(r["ratio"], r["target"])
        cells.append((r["benchmark"], r["backend"], r["metric"], f"{r['ratio']:.4g}",
                      r["target"] or "-", "-" if met is None else ("yes" if met else "NO")))
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]

    def line(values):
        return "  ".join(v.rjust(w) if i == 3 else v.ljust(w)
                         for i, (v, w) in enumerate(zip(values, widths)))

    rule = line(["-" * w for w in widths])
    return "\n".join([line(headers), rule, *[line(c) for c in cells], rule])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["torch", "tensorflow", "jax"],
                        choices=["torch", "tensorflow", "jax"])
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes: a smoke check of every benchmark, not the "
                             "issues' measurements")
    parser.add_argument("--only", nargs="+", default=None,
                        help="run only scripts whose name contains one of these")
    parser.add_argument("--args", action="append", default=[], metavar="SCRIPT=FLAGS",
                        help="extra flags for one script, e.g. 'bench_flexlora=--hidden 1024'")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds after which one benchmark process is killed")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when a target is missed, not only when a script fails")
    args = parser.parse_args(argv)

    scripts = discover(args.only)
    if not scripts:
        raise SystemExit(f"no benchmarks/bench_*.py matches --only {args.only}")
    extra = parse_extra(args.args, scripts)
    rows, failures = [], []
    for script in scripts:
        for label, command, env in invocations(script, args.backends, args.quick, extra):
            print(f"== {script.name} [{label}]: {' '.join(shlex.quote(a) for a in command[1:])}",
                  flush=True)
            start = time.monotonic()
            code, results = run_one(command, env, args.timeout)
            print(f"== {script.name} [{label}]: exit {code}, {len(results)} results, "
                  f"{time.monotonic() - start:.0f}s", flush=True)
            rows.extend(results)
            if code or not results:
                failures.append(f"{script.name} [{label}]: exit {code}, "
                                f"{len(results)} RESULT lines")

    print()
    print(f"sizes: {'--quick (smaller than the issues assume)' if args.quick else 'defaults'}; "
          f"backends: {' '.join(args.backends)}")
    print(format_table(rows))
    missed = [r for r in rows if target_met(r["ratio"], r["target"]) is False]
    print(f"{len(rows)} results, {len(missed)} targets missed, {len(failures)} failed runs")
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures or (args.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
