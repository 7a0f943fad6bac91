"""What a model must show before register admits it to the registry: finite weights, an evaluation of
exactly these weights, and a test accuracy better than chance (imgclf.integrity.chance_bar).

Each check raises SystemExit with a message naming the file and what to do, before anything is
registered. The test accuracy is evaluate's, read from the MLflow run that trained the weights: evaluate
tags the run with the hash of the weights it scored (tracking.EVALUATED_TAG), so metrics of other
weights (an evaluation that did not run, or ran on an older model) are never taken for these.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.torch import load as load_tensors

from imgclf.integrity import CHANCE_MARGIN_SE, chance_accuracy, chance_bar, nonfinite, nonfinite_message
from imgclf.tracking import EVALUATED_TAG

TEST_METRIC = "test/accuracy"


def finite_weights(weights: Path) -> None:
    """Refuse weights that hold NaN or infinity."""
    bad = nonfinite(load_tensors(weights.read_bytes()))
    if bad:
        raise SystemExit(
            f"error: register: refusing {weights}: {nonfinite_message(bad, 'the weights')}; nothing was "
            "registered (retrain: dvc repro -f train)"
        )


def evaluated_accuracy(run, digest: str, weights: Path) -> float:
    """evaluate's test accuracy of the weights with hash `digest`, from the MLflow run `run` (an
    mlflow.entities.Run, read after evaluate logged to it)."""
    scored = run.data.tags.get(EVALUATED_TAG)
    accuracy = run.data.metrics.get(TEST_METRIC)
    if scored != digest or accuracy is None:
        said = f"it scored other weights (sha256 {scored[:12]}...)" if scored else "it holds no evaluation"
        raise SystemExit(
            f"error: register: MLflow run {run.info.run_id} has no test accuracy of {weights} (sha256 "
            f"{digest[:12]}...): {said}; nothing was registered (run the evaluate stage: dvc repro evaluate)"
        )
    return float(accuracy)


def better_than_chance(accuracy: float, labels: np.ndarray, weights: Path) -> None:
    """Refuse a model whose test accuracy is not above chance_bar(labels)."""
    bar = chance_bar(labels)
    if not accuracy > bar:
        raise SystemExit(
            f"error: register: refusing {weights}: its test accuracy {accuracy:.4f} is not better than "
            f"chance ({chance_accuracy(labels):.4f}, the most common class's share of the {len(labels)} test "
            f"images, plus {CHANCE_MARGIN_SE:g} standard errors: {bar:.4f}); nothing was registered"
        )
