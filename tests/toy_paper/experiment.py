"""The toy paper's one-row experiment (a table of one arm, one seed)."""

import tests.toy_paper  # noqa: F401  (registers the extension)
from experiments import registry

EXPERIMENT = registry.register(registry.Experiment(
    name="toy", title="A ReLU^2 FFN trains", paper="tests/toy_paper",
    sweep=lambda scale: [{"arm": "toy", "config": "tests/toy_paper/presets.py:tiny",
                          "seed": 0}],
    columns=("eval/loss", "budget/params"), scales=("tiny",)))
