"""How close each tolerance check of the test suite comes to failing.

A test that passes with its error at 90% of its tolerance fails for some other
seed: the CI draws a fresh seed every run. This pytest plugin records, for
every `helpers.check_close` call, the error and the tolerance it was judged
against, without changing any outcome, and writes them out at the end:

    PYTHONPATH=$PWD python -m pytest -q -p no:cacheprovider -p tools.tolerance_margins \\
        tests/test_attention_values.py            # writes tolerance_margins.json
    python tools/tolerance_margins.py tolerance_margins.json [more.json ...]   # worst first

Several runs (different seeds) can be summarised together: the report gives
each check's worst ratio over the runs and how many runs it appeared in.
"""

from __future__ import annotations

import json
import os
import sys

_records: list[dict] = []
_current = {"nodeid": None}


def _install() -> None:
    import helpers
    import mlx.core as mx

    original = helpers.check_close

    def recording_check_close(name, got, want, dtype, plain=None):
        err = helpers.reference_error(name, got, want)
        if dtype == mx.float32:
            tol = helpers.FP32_TOL[name]
            if plain and name in plain:
                tol = max(tol, 2 * plain[name])
        else:
            eps = 2.0**-10 if dtype == mx.float16 else 2.0**-7
            tol = max(2 * plain[name] if plain and name in plain else 0.0, 2 * eps)
        _records.append({"test": _current["nodeid"], "check": name, "err": err, "tol": tol,
                         "ratio": err / tol if tol else float("inf")})
        return original(name, got, want, dtype, plain)

    helpers.check_close = recording_check_close


def pytest_configure(config):
    # tests/ is put on sys.path by tests/conftest.py; importing helpers here,
    # before collection, makes every `from helpers import check_close` see the wrapper.
    tests = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    _install()


def pytest_runtest_setup(item):
    _current["nodeid"] = item.nodeid


def pytest_sessionfinish(session):
    if hasattr(session.config, "workerinput"):
        out = f"tolerance_margins.{session.config.workerinput['workerid']}.json"
    else:
        out = os.environ.get("TOLERANCE_MARGINS_OUT", "tolerance_margins.json")
    from helpers import BASE_SEED

    with open(out, "w") as f:
        json.dump({"seed": BASE_SEED, "records": _records}, f)


def summarise(paths: list[str], top: int = 40) -> None:
    worst: dict[tuple[str, str], dict] = {}
    for path in paths:
        with open(path) as f:
            run = json.load(f)
        for r in run["records"]:
            key = (r["test"], r["check"])
            w = worst.setdefault(key, {"ratio": 0.0, "runs": set(), "seed": None})
            w["runs"].add(run["seed"])
            if r["ratio"] > w["ratio"]:
                w.update(ratio=r["ratio"], seed=run["seed"], err=r["err"], tol=r["tol"])
    rows = sorted(worst.items(), key=lambda kv: -kv[1]["ratio"])
    print(f"{len(rows)} checks over {len(paths)} file(s); worst ratio err/tol first")
    for (test, check), w in rows[:top]:
        print(f"{w['ratio']:6.3f}  {check:6s}  seed {w['seed']}  runs {len(w['runs'])}  {test}")


if __name__ == "__main__":
    summarise(sys.argv[1:])
