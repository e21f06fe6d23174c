"""Run a peer library's own tests with its classes replaced by invkernels.compat's.

    python scripts/peer_suites.py freia /path/to/FrEIA-checkout [--original]

The checkout's package is put first on ``sys.path`` (so its tests run against its own source, not
an installed release); before the tests are collected, the library's classes named in
``invkernels.compat.<library>.__all__`` are replaced by the compat ones. Each test's report gives
the compat objects it built (``invkernels.compat.constructed``: while it ran, and while its class
was collected); the summary counts the tests that
passed, and those of them that built a compat object. ``--original`` runs the same tests without
the replacement (the baseline).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import pytest

# library -> (package, {compat class name: module of the library that exports it}, test files)
SUITES = {
    "freia": ("FrEIA", {"SequenceINN": "FrEIA.framework"},
              ["tests/test_sequence.py", "tests/test_conditioning.py", "tests/test_reversible_graph_net.py",
               "tests/test_graph_inn.py", "tests/test_base.py"]),
    "nflows": ("nflows", {"AffineCouplingTransform": "nflows.transforms.coupling",
                          "AdditiveCouplingTransform": "nflows.transforms.coupling",
                          "PiecewiseRationalQuadraticCouplingTransform": "nflows.transforms.coupling",
                          "SimpleRealNVP": "nflows.flows.realnvp"},
               ["tests/transforms/coupling_test.py", "tests/flows/realnvp_test.py"]),
    "zuko": ("zuko", {"CouplingTransform": "zuko.transforms", "GeneralCouplingTransform": "zuko.flows",
                      "NICE": "zuko.flows", "RealNVP": "zuko.flows"},
             ["tests/test_flows.py", "tests/test_bayesian.py"]),
    "normflows": ("normflows", {name: "normflows.flows" for name in [
                      "ActNorm", "AffineConstFlow", "AffineCouplingBlock", "CoupledRationalQuadraticSpline",
                      "GlowBlock", "Invertible1x1Conv", "MaskedAffineFlow"]},
                  ["normflows/flows/affine/coupling_test.py", "normflows/flows/affine/glow_test.py",
                   "normflows/flows/neural_spline/wrapper_test.py", "normflows/core_test.py"]),
}


class CompatPlugin:
    """Replaces the classes at configure time and records each test's compat constructions."""

    def __init__(self, library: str, replace: bool):
        self.library, self.replace = library, replace
        self.results: list[tuple[str, str, int]] = []
        self._before = 0
        # Objects built while a test class was collected count for each of its tests: a unittest
        # TestCase builds its network in __init__, and pytest makes every test's instance when it
        # collects the class.
        self._by_parent: dict[str, int] = {}
        self._parent_of: dict[str, str] = {}
        self._mark = 0

    def pytest_configure(self, config):
        if not self.replace:
            return
        package, homes, _ = SUITES[self.library]
        compat = importlib.import_module(f"invkernels.compat.{self.library}")
        for name in compat.__all__:
            module = importlib.import_module(homes.get(name, f"{package}.modules"))
            setattr(module, name, getattr(compat, name))

    def _built(self) -> int:
        from invkernels.compat import constructed  # noqa: PLC0415

        return sum(constructed.values())

    def pytest_collectstart(self, collector):
        self._mark = self._built()

    def pytest_itemcollected(self, item):
        built = self._built()
        parent = item.parent.nodeid
        self._by_parent[parent] = self._by_parent.get(parent, 0) + built - self._mark
        self._parent_of[item.nodeid] = parent
        self._mark = built

    def pytest_runtest_setup(self, item):
        self._before = self._built() - self._by_parent.get(self._parent_of.get(item.nodeid), 0)

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            self.results.append((report.nodeid, report.outcome, self._built() - self._before))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("library", choices=sorted(SUITES))
    parser.add_argument("checkout", help="a checkout of the library's repository")
    parser.add_argument("--original", action="store_true", help="run the tests without the compat classes")
    args = parser.parse_args()
    checkout = os.path.abspath(args.checkout)
    sys.path.insert(0, checkout)
    package, _, files = SUITES[args.library]
    loaded = importlib.import_module(package)
    if not os.path.abspath(loaded.__file__).startswith(checkout):
        parser.error(f"{package} was imported from {loaded.__file__}, not from {checkout}")
    plugin = CompatPlugin(args.library, not args.original)
    os.chdir(checkout)
    code = pytest.main(["-q", "-p", "no:cacheprovider", *files], plugins=[plugin])
    passed = [r for r in plugin.results if r[1] == "passed"]
    built = [r for r in passed if r[2] > 0]
    for nodeid, outcome, count in plugin.results:
        print(f"{outcome:7s} compat objects built: {count:3d}  {nodeid}")
    mode = "original classes" if args.original else "compat classes"
    print(f"{args.library} ({mode}): {len(passed)}/{len(plugin.results)} passed, "
          f"{len(built)} of them built a compat object")
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
