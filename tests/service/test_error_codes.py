"""One table of errors: every code service/ answers with is in service.errors.ERROR_CODES,
and call sites name the code only (its status is looked up there).

Read from the source (ast), so a code on a path no other test reaches is checked too."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from service.errors import ERROR_CODES, ApiError, error_response, error_status

SERVICE = Path(__file__).resolve().parents[2] / "service"

# Callables whose first argument (or `code=`) is an error code of the API.
CODE_TAKERS = frozenset(
    {
        "ApiError",
        "error_response",
        "error_body",
        "error_status",
        "raw_error",
        "GateRefusal",
    }
)


def _name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _module_strings(tree: ast.Module) -> dict[str, str]:
    """Module-level `NAME = "text"` constants (e.g. service.gate.NOT_CHEST_XRAY)."""
    strings = {}
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            strings.update(
                {t.id: node.value.value for t in node.targets if isinstance(t, ast.Name)}
            )
    return strings


def _code_arguments() -> list[tuple[str, ast.expr]]:
    """(file:line, the expression given as the code) of every call to a CODE_TAKER and
    every class-level `code = ...` (the ImageError subclasses); a name bound to a string at
    module level is replaced by that string."""
    found: list[tuple[str, ast.expr]] = []
    for path in sorted(SERVICE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(SERVICE.parent).as_posix()
        strings = _module_strings(tree)
        for node in ast.walk(tree):
            given: list[ast.expr] = []
            if isinstance(node, ast.Call) and _name(node.func) in CODE_TAKERS:
                given = [kw.value for kw in node.keywords if kw.arg == "code"] or node.args[:1]
            elif isinstance(node, ast.ClassDef):
                given = [
                    item.value
                    for item in node.body
                    if isinstance(item, ast.Assign)
                    and [_name(target) for target in item.targets] == ["code"]
                ]
            for arg in given:
                if isinstance(arg, ast.Name) and arg.id in strings:
                    arg = ast.Constant(strings[arg.id], lineno=arg.lineno)
                found.append((f"{where}:{arg.lineno}", arg))
    return found


def test_every_code_named_in_service_is_in_the_table() -> None:
    literal = {
        site: arg.value
        for site, arg in _code_arguments()
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
    }
    # The scan sees the codes: not a test that passes because it found nothing.
    assert len(set(literal.values())) >= 25, sorted(set(literal.values()))
    unknown = {site: code for site, code in literal.items() if code not in ERROR_CODES}
    assert not unknown, f"codes missing from service/errors.py ERROR_CODES: {unknown}"


def test_no_call_site_writes_a_status_next_to_a_code() -> None:
    with_status = [
        site
        for site, arg in _code_arguments()
        if isinstance(arg, ast.Constant) and isinstance(arg.value, int)
    ]
    assert not with_status, f"a status beside a code (ERROR_CODES has it): {with_status}"


def test_the_status_comes_from_the_table() -> None:
    for code, (status, _) in ERROR_CODES.items():
        assert error_status(code) == status
        assert ApiError(code, "why").status_code == status
        assert error_response(code, "why").status_code == status
    with pytest.raises(KeyError):
        ApiError("no_such_code", "a code outside the table is a bug")


REPO = Path(__file__).resolve().parents[2]


def test_every_image_error_code_has_its_documented_status() -> None:
    from service import preprocessing
    from service.errors import ERROR_CODES, IMAGE_ERROR_STATUS, image_error

    classes = [
        obj
        for obj in vars(preprocessing).values()
        if isinstance(obj, type) and issubclass(obj, preprocessing.ImageError)
    ]
    assert {cls.code for cls in classes} == set(IMAGE_ERROR_STATUS)
    for cls in classes:
        api = image_error(cls("x"))
        assert (api.status_code, api.code) == (ERROR_CODES[cls.code][0], cls.code)
    assert IMAGE_ERROR_STATUS["image_too_large"] == 413
    assert IMAGE_ERROR_STATUS["unsupported_media_type"] == 415


def test_every_error_code_is_in_the_docs_table_with_its_status() -> None:
    from service.errors import ERROR_CODES

    text = (REPO / "docs/api.md").read_text()
    documented = {
        code: int(status)
        for status, code in re.findall(r"^\| (\d{3})\s+\| `([a-z_]+)`", text, re.MULTILINE)
    }
    assert documented  # the table is there
    for code, (status, _) in ERROR_CODES.items():
        assert documented.get(code) == status, f"docs/api.md: {code} should be {status}"
