"""benchmarks/recipes.py chooses on validation and reports on test: the validation split of each
real scale can resolve a few points, and the best recipe is the best on validation."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import recipes


def test_every_real_scale_validates_on_at_least_500_photos():
    for scale, (pool, _test, n_val) in recipes.SCALES.items():
        if scale != "smoke":
            assert n_val >= 500, scale  # one photo is 0.2 points; the standard error near 80% is 1.8
            assert n_val < 10 * pool, scale  # and something is left to train on


def test_the_best_recipe_is_chosen_by_validation_never_by_test():
    rows = {
        "linear probe": {"val/acc_best": 0.90, "test/acc": 0.95},  # not a fine-tuning recipe: never best
        "full fine-tune": {"val/acc_best": 0.80, "test/acc": 0.86},  # best on test
        "LP-FT (offline_finetune)": {"val/acc_best": 0.83, "test/acc": 0.81},  # best on validation
    }
    assert recipes.best_recipe(rows) == "LP-FT (offline_finetune)"
    assert recipes.best_recipe({"linear probe": rows["linear probe"]}) is None
