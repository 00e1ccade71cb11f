"""The error taxonomy: each class's HTTP status and the built-in exception callers already catch, which
errors are worth retrying, the one error -> HTTP answer mapping, pydantic errors as one line, and sources
that raise only the taxonomy's leaves."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kfloop import errors
from kfloop.errors import (
    AccessError,
    ClusterError,
    ConflictError,
    DataError,
    Forbidden,
    HttpAnswer,
    InjectedFailure,
    InputError,
    KfloopError,
    ManifestError,
    NotFoundError,
    PayloadTooLarge,
    PermanentError,
    PipelineError,
    PolicyError,
    RegistryError,
    StorageError,
    StorageUnavailable,
    TemporaryError,
    Unauthenticated,
    UnsupportedMediaType,
    UpstreamError,
    VersionMismatch,
    describe_validation_errors,
    is_temporary,
    to_http,
)

REPO = Path(__file__).resolve().parents[2]
SOURCE_FOLDERS = ("kfloop", "components", "pipelines", "serving", "policies", "manifests")

# class -> (HTTP status, the built-in exception a caller may already catch it as, retrying may help)
TAXONOMY = {
    InputError: (400, ValueError, False),
    DataError: (400, ValueError, False),
    PolicyError: (400, ValueError, False),
    ManifestError: (400, ValueError, False),
    PayloadTooLarge: (413, ValueError, False),
    UnsupportedMediaType: (415, ValueError, False),
    AccessError: (403, PermissionError, False),
    Unauthenticated: (401, PermissionError, False),
    Forbidden: (403, PermissionError, False),
    NotFoundError: (404, LookupError, False),
    RegistryError: (404, LookupError, False),
    ConflictError: (409, LookupError, False),
    VersionMismatch: (409, LookupError, False),
    TemporaryError: (503, ConnectionError, True),
    UpstreamError: (502, ConnectionError, True),
    ClusterError: (502, ConnectionError, True),
    InjectedFailure: (503, ConnectionError, True),
    StorageUnavailable: (503, ConnectionError, True),
    PermanentError: (500, RuntimeError, False),
    PipelineError: (500, RuntimeError, False),
    StorageError: (500, RuntimeError, False),
}


def make(cls: type[KfloopError], message: str = "what went wrong") -> KfloopError:
    return cls(message, served_version="3") if cls is VersionMismatch else cls(message)


def test_the_table_covers_every_error_class_the_module_exports():
    exported = {getattr(errors, name) for name in errors.__all__}
    classes = {c for c in exported if inspect.isclass(c) and issubclass(c, KfloopError) and c is not KfloopError}
    assert classes == set(TAXONOMY)


@pytest.mark.parametrize("cls", list(TAXONOMY), ids=lambda cls: cls.__name__)
def test_each_error_has_its_status_its_builtin_base_and_its_message(cls):
    status, builtin, _ = TAXONOMY[cls]
    error = make(cls)
    assert error.status == status
    assert isinstance(error, builtin) and isinstance(error, KfloopError)
    assert str(error) == error.message == "what went wrong"
    with pytest.raises(builtin, match="^what went wrong$"):
        raise error


@pytest.mark.parametrize("cls", list(TAXONOMY), ids=lambda cls: cls.__name__)
def test_only_temporary_errors_are_worth_retrying(cls):
    assert is_temporary(make(cls)) is TAXONOMY[cls][2]


@pytest.mark.parametrize(("exc", "temporary"), [
    (ConnectionRefusedError("refused"), True),
    (TimeoutError("timed out"), True),
    (OSError("network is unreachable"), True),
    (ValueError("bad value"), False),
    (RuntimeError("broken"), False),
    (KeyError("missing"), False),
])
def test_the_networks_own_errors_are_temporary_and_other_builtins_are_not(exc, temporary):
    assert is_temporary(exc) is temporary


def test_a_permanent_error_is_not_retried_although_it_is_a_runtime_error():
    assert isinstance(PipelineError("task failed"), RuntimeError)
    assert is_temporary(PipelineError("task failed")) is False


@pytest.mark.parametrize("cls", list(TAXONOMY), ids=lambda cls: cls.__name__)
def test_every_error_becomes_its_status_and_an_error_body(cls):
    answer = to_http(make(cls, "no model 'leaf'"))
    expected_headers = {VersionMismatch: {"x-kfloop-model-version": "3"},
                        Unauthenticated: {"www-authenticate": 'Bearer realm="kfloop"'}}.get(cls, {})
    assert answer == HttpAnswer(TAXONOMY[cls][0], {"error": "no model 'leaf'"}, expected_headers)


def test_a_version_mismatch_names_the_served_version_in_a_header():
    mismatch = VersionMismatch("this predictor serves version 2; the request has features scaled for version(s) ['1']",
                               served_version="2")
    assert mismatch.served_version == "2"
    assert to_http(mismatch) == HttpAnswer(
        409, {"error": "this predictor serves version 2; the request has features scaled for version(s) ['1']"},
        {"x-kfloop-model-version": "2"},
    )


@pytest.mark.parametrize(("where", "message"), [
    ({"source": "d.csv", "row": 3, "column": "a"}, "d.csv, row 3, column 'a': missing value (NaN)"),
    ({"source": "d.csv", "column": "label"}, "d.csv, column 'label': missing value (NaN)"),
    ({"source": "d.csv", "row": 0}, "d.csv, row 0: missing value (NaN)"),
    ({}, "missing value (NaN)"),
])
def test_a_data_error_names_file_row_and_column_where_known(where, message):
    error = DataError("missing value (NaN)", **where)
    assert str(error) == message
    assert (error.reason, error.source, error.row, error.column) == (
        "missing value (NaN)", where.get("source"), where.get("row"), where.get("column"))
    assert to_http(error).body == {"error": message}


class _Window(BaseModel):
    model_config = ConfigDict(extra="forbid")

    size: int = Field(ge=1)
    mode: Literal["fast", "slow"] = "fast"
    low: int = 0
    high: int = 1

    @model_validator(mode="after")
    def _ordered(self) -> "_Window":
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        return self


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    window: _Window
    tags: list[str] = []


def validation_errors(document) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        _Spec.model_validate(document)
    return caught.value


def test_every_bad_field_is_described_with_its_path_and_the_value_given():
    error = validation_errors({"window": {"size": 0, "mode": "medium", "extent": 4}, "tags": [1]})
    assert describe_validation_errors(error.errors()) == (
        "window.size: Input should be greater than or equal to 1 (got 0); "
        "window.mode: Input should be 'fast' or 'slow' (got 'medium'); "
        "window.extent: unknown field; "
        "tags.0: Input should be a valid string (got 1)"
    )


def test_without_input_a_description_leaves_the_values_out():
    error = validation_errors({"window": {"size": 0, "mode": "medium"}})
    assert describe_validation_errors(error.errors(), show_input=False) == (
        "window.size: Input should be greater than or equal to 1; window.mode: Input should be 'fast' or 'slow'"
    )


def test_a_model_validator_error_is_placed_at_its_model_and_mappings_are_not_echoed():
    error = validation_errors({"window": {"size": 2, "low": 5, "high": 1}})
    assert describe_validation_errors(error.errors()) == "window: Value error, low (5) must not exceed high (1)"
    error = validation_errors({"window": {"size": 2}, "tags": {"a": 1}})
    assert describe_validation_errors(error.errors()) == "tags: Input should be a valid list"
    error = validation_errors(["not", "a", "mapping"])
    assert describe_validation_errors(error.errors()) == (
        "(top level): Input should be a valid dictionary or instance of _Spec"
    )


def test_a_request_bodys_prefix_is_left_out_of_the_path():
    fastapi_style = [{"type": "missing", "loc": ("body", "replicas"), "msg": "Field required", "input": {"x": 1}},
                     {"type": "int_parsing", "loc": ("body", "replicas"), "msg": "Input should be a valid integer",
                      "input": "three"}]
    assert describe_validation_errors(fastapi_style) == (
        "replicas: Field required; replicas: Input should be a valid integer (got 'three')"
    )


# --- the sources raise the taxonomy's leaves -------------------------------------------------------------


def source_files() -> list[Path]:
    return sorted(path for folder in SOURCE_FOLDERS for path in (REPO / folder).rglob("*.py"))


def raised_name(node: ast.Raise) -> str | None:
    """The class a ``raise`` statement names (``raise X(...)``, ``raise X``, ``raise m.X(...)``)."""
    target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
    if isinstance(target, ast.Name):
        return target.id
    if isinstance(target, ast.Attribute):
        return target.attr
    return None


def raises_outside_validators(tree: ast.AST, name: str) -> list[int]:
    """Lines that raise ``name`` anywhere but in a function decorated as a pydantic validator."""
    lines: list[int] = []

    def is_validator(function: ast.AST) -> bool:
        decorators = getattr(function, "decorator_list", [])
        for decorator in decorators:
            target = decorator.func if isinstance(decorator, ast.Call) else decorator
            label = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
            if label.endswith("validator"):
                return True
        return False

    def visit(node: ast.AST, in_validator: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_validator = in_validator or is_validator(node)
        if isinstance(node, ast.Raise) and node.exc is not None and raised_name(node) == name and not in_validator:
            lines.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child, in_validator)

    visit(tree, False)
    return lines


def test_the_sources_are_found():
    names = {path.relative_to(REPO).as_posix() for path in source_files()}
    assert {"kfloop/errors.py", "serving/protocol.py", "policies/spec.py", "manifests/render.py"} <= names


def test_no_source_raises_the_root_error_bare():
    found = [f"{path.relative_to(REPO)}:{line}" for path in source_files()
             for line in raises_outside_validators(ast.parse(path.read_text()), "KfloopError")]
    assert found == [], "raise a KfloopError subclass (the class decides what happens next)"


def test_only_pydantic_validators_raise_a_bare_value_error():
    found = [f"{path.relative_to(REPO)}:{line}" for path in source_files()
             for line in raises_outside_validators(ast.parse(path.read_text()), "ValueError")]
    assert found == [], "raise InputError (a ValueError with status 400) or another kfloop error"


def test_the_scan_sees_a_bare_raise_and_allows_one_in_a_validator():
    tree = ast.parse(
        "class Spec:\n"
        "    @model_validator(mode='after')\n"
        "    def check(self):\n"
        "        raise ValueError('inside a validator')\n"
        "def build(x):\n"
        "    if x:\n"
        "        raise ValueError('bare')\n"
        "    raise errors.KfloopError('root')\n"
    )
    assert raises_outside_validators(tree, "ValueError") == [7]
    assert raises_outside_validators(tree, "KfloopError") == [8]
