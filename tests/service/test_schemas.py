"""service.schemas: the OpenAPI examples match what export writes."""

from __future__ import annotations


def test_model_card_example_uses_the_bundle_metric_names() -> None:
    from service.schemas import ModelInfo

    [example] = ModelInfo.model_fields["validation_metrics"].examples
    # export/onnx_export.py writes training.metrics.binary_metrics' names.
    assert set(example) <= {
        "auc",
        "sensitivity",
        "specificity",
        "accuracy",
        "precision",
        "f1",
        "n",
        "n_positive",
        "confusion_matrix",
    }
