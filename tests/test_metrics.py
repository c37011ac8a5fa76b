"""Classification metrics against values computed by hand."""

import pytest

from tunelab.evaluate.classification import classification_metrics

pytestmark = pytest.mark.unit


def test_three_class_metrics_by_hand():
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
    preds = [0, 1, 0, 1, 2, 2, 2, 0, 2, 2]
    m = classification_metrics(preds, labels, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [1, 0, 4]]
    assert m["accuracy"] == pytest.approx(7 / 10)
    # a: P 2/3 R 2/3; b: P 1/2 R 1/2; c: P 4/5 R 4/5
    assert m["per_class"]["a"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["b"]["recall"] == pytest.approx(1 / 2)
    assert m["per_class"]["c"]["support"] == 5
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 4 / 5) / 3)


def test_class_never_predicted_has_zero_precision_and_absent_class_is_not_averaged():
    m = classification_metrics([0, 0, 0], [0, 1, 0], ["x", "y", "z"])
    assert m["per_class"]["y"]["precision"] == 0.0
    assert m["per_class"]["y"]["recall"] == 0.0
    # z never occurs: not in the macro average; x: P 2/3 R 1 -> F1 0.8; y: 0
    assert m["macro_f1"] == pytest.approx((0.8 + 0.0) / 2)
