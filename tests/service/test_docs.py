"""service.docs: the OpenAPI 3.1 -> 3.0 rewrite."""

from __future__ import annotations

from service.docs import openapi_3_0


def test_openapi_rewrite_to_3_0() -> None:
    rewritten = openapi_3_0(
        {
            "a": {"anyOf": [{"type": "string"}, {"type": "null"}], "title": "A"},
            "b": {"anyOf": [{"$ref": "#/x"}, {"type": "null"}]},
            "c": {"type": "string", "contentMediaType": "application/octet-stream"},
            "d": {"type": "integer", "examples": [3, 4]},
            "e": {"const": "ok"},
        }
    )
    assert rewritten["a"] == {"type": "string", "nullable": True, "title": "A"}
    assert rewritten["b"] == {"allOf": [{"$ref": "#/x"}], "nullable": True}
    assert rewritten["c"] == {"type": "string", "format": "binary"}
    assert rewritten["d"] == {"type": "integer", "example": 3}
    assert rewritten["e"] == {"enum": ["ok"]}
