"""InputSchema: V1 rows (lists or keyed objects) and V2 tensors (one matrix or one per feature) become a
float64 feature matrix, and every unusable request is an InputError that says what was wrong and what is
expected."""

from __future__ import annotations

import numpy as np
import pytest
from kserve import InferInput

from kfloop.errors import InputError
from kfloop.serving.protocol import InputSchema

SCHEMA = InputSchema(("a", "b", "c"), max_batch=3)
EXPECTED = "3 numbers per row (a..c)"
ROWS = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])


def matrix(rows, *, name: str = "features", datatype: str = "FP32", shape=None) -> dict:
    """One V2 REST tensor holding ``rows``."""
    rows = np.asarray(rows, dtype=np.float64)
    return {"name": name, "shape": list(rows.shape) if shape is None else shape, "datatype": datatype,
            "data": rows.ravel().tolist()}


def column(name: str, values, *, datatype: str = "FP64", shape=None) -> dict:
    """One V2 REST tensor holding one feature."""
    return {"name": name, "shape": [len(values)] if shape is None else shape, "datatype": datatype, "data": list(values)}


# --- V1 -----------------------------------------------------------------------------------------------


def test_v1_rows_as_lists_come_back_as_a_float64_matrix():
    rows = SCHEMA.rows_from_v1({"instances": [[1, 2, 3], [4.0, 5.0, 6.0]]})
    assert rows.dtype == np.float64
    np.testing.assert_array_equal(rows, ROWS)


def test_v1_rows_keyed_by_feature_name_are_put_in_feature_order():
    rows = SCHEMA.rows_from_v1({"instances": [{"c": 3, "a": 1, "b": 2}, {"b": 5.0, "c": 6.0, "a": 4.0}]})
    assert rows.dtype == np.float64
    np.testing.assert_array_equal(rows, ROWS)


def test_two_features_are_named_in_full_in_the_expectation():
    with pytest.raises(InputError) as caught:
        InputSchema(("x", "y")).rows_from_v1({"instances": [[1.0]]})
    assert str(caught.value) == "instance 0 has 1 values; expected 2 numbers per row (x, y)"


BAD_V1 = [
    ([[1, 2, 3]], 'expected a JSON object {"instances": [[...], ...]} with one row per instance'),
    ({"rows": [[1, 2, 3]]}, 'expected a JSON object {"instances": [[...], ...]} with one row per instance'),
    ({"instances": {"a": 1}}, '"instances" must be a list of rows, got dict'),
    ({"instances": []}, "empty batch: send at least one row"),
    ({"instances": [[1, 2, 3]] * 4}, "batch of 4 rows is over the limit of 3 rows per request"),
    ({"instances": [[1, 2, 3], [4, 5]]}, f"instance 1 has 2 values; expected {EXPECTED}"),
    ({"instances": [[1, 2, 3], 7]}, f"instance 1 is a int; expected a list of {EXPECTED}"),
    ({"instances": [[1, "x", 3]]}, "instance 0, feature 'b': expected a number, got 'x'"),
    ({"instances": [[[1, 2, 3]]]}, f"instance 0 has 1 values; expected {EXPECTED}"),
    ({"instances": [[1, 2, 3], [4, float("nan"), 6]]}, "row 1, feature 'b': nan is not a finite number"),
    ({"instances": [[1, 2, float("-inf")]]}, "row 0, feature 'c': -inf is not a finite number"),
    ({"instances": [{"a": 1, "b": 2, "c": 3, "z": 4}]}, f"instance 0 has unknown feature(s) ['z']; expected {EXPECTED}"),
    ({"instances": [{"a": 1}]}, "instance 0 is missing feature(s) ['b', 'c']"),
    ({"instances": [{"a": 1, "b": "2", "c": 3}]}, "instance 0, feature 'b': expected a number, got '2'"),
    ({"instances": [{"a": 1, "b": True, "c": 3}]}, "instance 0, feature 'b': expected a number, got True"),
    ({"instances": [{"a": 1, "b": 2, "c": 3}, [1, 2, 3]]}, "instance 1 is a list; mix of objects and lists is not allowed"),
    ({"instances": [{"a": 1, "b": 2, "c": float("inf")}]}, "row 0, feature 'c': inf is not a finite number"),
]


@pytest.mark.parametrize(("payload", "message"), BAD_V1, ids=[
    "not-an-object", "no-instances", "instances-not-a-list", "empty", "over-size", "short-row", "row-not-a-list",
    "string-value", "too-deep", "nan", "minus-inf", "keyed-unknown", "keyed-missing", "keyed-string", "keyed-bool",
    "keyed-then-list", "keyed-inf",
])
def test_each_bad_v1_body_is_an_input_error_saying_what_is_wrong(payload, message):
    with pytest.raises(InputError) as caught:
        SCHEMA.rows_from_v1(payload)
    assert str(caught.value) == message


def test_missing_features_are_listed_up_to_five():
    schema = InputSchema(tuple(f"f{i}" for i in range(8)))
    with pytest.raises(InputError) as caught:
        schema.rows_from_v1({"instances": [{"f0": 1.0}]})
    assert str(caught.value) == "instance 0 is missing feature(s) ['f1', 'f2', 'f3', 'f4', 'f5']..."


# --- V2 -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", ["FP32", "FP64"])
def test_v2_one_tensor_of_any_name_is_the_matrix(datatype):
    rows = SCHEMA.rows_from_v2([matrix(ROWS, name="input-0", datatype=datatype)])
    assert rows.dtype == np.float64
    np.testing.assert_array_equal(rows, ROWS)


def test_v2_one_tensor_per_feature_in_any_order_and_shape_n_or_n_by_1():
    rows = SCHEMA.rows_from_v2([
        column("c", [3.0, 6.0], shape=[2, 1]),
        column("a", [1.0, 4.0], datatype="FP32"),
        column("b", [2.0, 5.0]),
    ])
    np.testing.assert_array_equal(rows, ROWS)


def test_v2_infer_inputs_with_binary_data_are_read_like_rest_tensors():
    tensor = InferInput("features", [2, 3], "FP32")
    tensor.set_data_from_numpy(ROWS.astype(np.float32), binary_data=True)
    np.testing.assert_array_equal(SCHEMA.rows_from_v2([tensor]), ROWS)
    listed = InferInput("features", [2, 3], "FP64", data=ROWS.ravel().tolist())
    np.testing.assert_array_equal(SCHEMA.rows_from_v2([listed]), ROWS)


BAD_V2 = [
    ([], '"inputs" is empty: send one FP32 tensor [n, 3] or one tensor per feature'),
    ([{"name": "features", "shape": [1, 3], "datatype": "FP32"}], "every input needs name, shape, datatype and data; 'data' is missing"),
    ([matrix(ROWS, datatype="BYTES")], "input 'features' has datatype BYTES; expected FP32 or FP64"),
    ([matrix(ROWS, datatype="INT64")], "input 'features' has datatype INT64; expected FP32 or FP64"),
    ([matrix([[1.0, 2.0]])], f"input 'features' has shape [1, 2]; expected [n, 3]: {EXPECTED}"),
    ([matrix(ROWS, shape=[6])], f"input 'features' has shape [6]; expected [n, 3]: {EXPECTED}"),
    ([matrix(ROWS, shape=[3, 3])], "input 'features': shape [3, 3] does not match its 6 values"),
    ([{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": ["x", "y", "z"]}], "input 'features': data must be numbers (FP32)"),
    ([matrix(np.zeros((0, 3)))], "empty batch: send at least one row"),
    ([matrix(np.ones((4, 3)))], "batch of 4 rows is over the limit of 3 rows per request"),
    ([matrix([[1.0, 2.0, 3.0], [4.0, float("nan"), 6.0]])], "row 1, feature 'b': nan is not a finite number"),
    ([matrix([[float("inf"), 2.0, 3.0]], datatype="FP64")], "row 0, feature 'a': inf is not a finite number"),
    ([column("a", [1.0]), column("b", [2.0]), column("zz", [3.0]), column("yy", [4.0])],
     f"unknown feature input(s) ['yy', 'zz']; expected one tensor per feature of {EXPECTED}"),
    ([column("a", [1.0])], "missing feature input(s) ['b', 'c']"),
    ([column("a", [1.0]), column("b", [2.0], datatype="BYTES"), column("c", [3.0])], "input 'b' has datatype BYTES; expected FP32 or FP64"),
    ([column("a", [1.0, 2.0], shape=[1, 2]), column("b", [2.0]), column("c", [3.0])], "input 'a' has shape [1, 2]; expected [n] or [n, 1]"),
    ([column("a", [1.0, 4.0]), column("b", [2.0, 5.0, 8.0]), column("c", [3.0, 6.0])], "input 'b' has 3 rows, other features have 2"),
    ([column("a", []), column("b", []), column("c", [])], "empty batch: send at least one row"),
    ([column("a", [1.0] * 4), column("b", [2.0] * 4), column("c", [3.0] * 4)], "batch of 4 rows is over the limit of 3 rows per request"),
    ([column("a", [1.0]), column("b", [float("nan")]), column("c", [3.0])], "row 0, feature 'b': nan is not a finite number"),
]


@pytest.mark.parametrize(("inputs", "message"), BAD_V2, ids=[
    "no-inputs", "no-data", "bytes", "int64", "too-few-columns", "one-dimensional", "shape-not-data", "strings",
    "empty", "over-size", "nan", "inf", "per-feature-unknown", "per-feature-missing", "per-feature-bytes",
    "per-feature-shape", "per-feature-rows-differ", "per-feature-empty", "per-feature-over-size", "per-feature-nan",
])
def test_each_bad_v2_request_is_an_input_error_saying_what_is_wrong(inputs, message):
    with pytest.raises(InputError) as caught:
        SCHEMA.rows_from_v2(inputs)
    assert str(caught.value) == message


def test_v2_binary_data_that_does_not_fit_its_shape_is_an_input_error():
    tensor = InferInput("features", [1, 3], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 3), dtype=np.float32), binary_data=True)
    tensor.shape = [2, 3]  # what a gRPC request declaring 2 rows with 1 row of raw bytes becomes
    with pytest.raises(InputError) as caught:
        SCHEMA.rows_from_v2([tensor])
    assert str(caught.value) == "input 'features': its binary data does not fit shape [2, 3] as FP32"
