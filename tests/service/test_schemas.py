"""service.schemas: the OpenAPI examples match what export writes."""

from __future__ import annotations


def test_model_card_example_uses_the_bundle_metric_names() -> None:
    from service.bundle import VALIDATION_METRIC_NAMES
    from service.schemas import ModelInfo

    [example] = ModelInfo.model_fields["validation_metrics"].examples
    # export/onnx_export.py writes these names (training.metrics.binary_metrics').
    assert set(example) <= set(VALIDATION_METRIC_NAMES)
