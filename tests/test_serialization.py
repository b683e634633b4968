"""The default serializer takes the standard pickler's fast path only where cloudpickle
would have pickled the same way: by reference, to a module every process imports."""

from __future__ import annotations

import importlib
import pickle
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from pg_tasks import record
from sitq import SerializationError
from sitq.serialization import DEFAULT_SERIALIZER, _by_reference_only


def cloudpickled(obj: object) -> bytes:
    data: bytes = cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return data


PLAIN = [
    None,
    12345,
    "user@example.com",
    (1, 2.5, b"raw", True, 3j),
    {"template": "welcome", "to": ["a", "b"], "nested": {"n": (None,)}},
    datetime(2026, 11, 28, 12, 0, tzinfo=UTC),
    record,  # a module-level function: by reference
    {"func": record, "args": ("log", 1), "kwargs": {}, "timeout": None},
]


@pytest.mark.parametrize("value", PLAIN, ids=repr)
def test_plain_values_take_the_fast_path_and_pickle_as_cloudpickle_does(value: object) -> None:
    assert _by_reference_only(value) is not None
    assert DEFAULT_SERIALIZER.dumps(value) == cloudpickled(value)


@pytest.fixture
def in_main(monkeypatch: pytest.MonkeyPatch) -> Callable[[Any], Any]:
    """Make an object look defined in ``__main__`` (a script), where the standard
    pickler finds it by name but a worker in another process would not."""

    def put(obj: Any) -> Any:
        obj.__module__ = "__main__"
        obj.__qualname__ = obj.__name__
        monkeypatch.setattr(sys.modules["__main__"], obj.__name__, obj, raising=False)
        return obj

    return put


def test_a_function_of_main_is_pickled_by_value(in_main: Callable[[Any], Any]) -> None:
    def sitq_test_script_task(x: int) -> int:
        return x + 1

    task = in_main(sitq_test_script_task)
    assert b"__main__" in pickle.dumps(task)  # the standard pickler took it by name
    data = DEFAULT_SERIALIZER.dumps({"func": task, "args": (1,)})
    assert data == cloudpickled({"func": task, "args": (1,)})
    assert pickle.loads(data)["func"] is not task  # rebuilt from its code, not looked up


def test_an_argument_whose_class_is_in_main_is_pickled_by_value(
    in_main: Callable[[Any], Any],
) -> None:
    class SitqTestScriptPoint:
        def __init__(self, x: int) -> None:
            self.x = x

    point_class = in_main(SitqTestScriptPoint)
    value = ("args", [point_class(3)])
    assert _by_reference_only(value) is None
    data = DEFAULT_SERIALIZER.dumps(value)
    assert data == cloudpickled(value)
    assert data != pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


@pytest.fixture
def registered_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    (tmp_path / "sitq_by_value_tasks.py").write_text("def double(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("sitq_by_value_tasks")
    cloudpickle.register_pickle_by_value(module)
    try:
        yield module
    finally:
        if module.__name__ in cloudpickle.list_registry_pickle_by_value():
            cloudpickle.unregister_pickle_by_value(module)
        sys.modules.pop("sitq_by_value_tasks", None)


def test_a_module_registered_by_value_is_pickled_by_value(registered_module: Any) -> None:
    data = DEFAULT_SERIALIZER.dumps(registered_module.double)
    assert data == cloudpickled(registered_module.double)
    assert data != pickle.dumps(registered_module.double, protocol=pickle.HIGHEST_PROTOCOL)
    # A process without the module (it is gone from sys.modules and sys.path) runs it.
    cloudpickle.unregister_pickle_by_value(registered_module)
    del sys.modules["sitq_by_value_tasks"]
    sys.path.remove(str(Path(registered_module.__file__).parent))
    assert pickle.loads(data)(21) == 42


def test_what_only_cloudpickle_can_pickle_still_pickles() -> None:
    offset = 10
    add = lambda x: x + offset  # noqa: E731 - a closure over a local, on purpose
    assert _by_reference_only(add) is None
    assert pickle.loads(DEFAULT_SERIALIZER.dumps(add))(1) == 11


class _BrokenRepr:
    def __repr__(self) -> str:
        raise SystemExit("a __repr__ that exits")


@pytest.mark.parametrize(
    "value",
    [
        {"total": 10**5000, "lock": threading.Lock()},  # an int repr() refuses
        [_BrokenRepr(), threading.Lock()],
        [threading.Lock()] * 1_000_000,  # not rendered whole into the message
    ],
    ids=["huge-int", "repr-raises", "huge-list"],
)
def test_what_cannot_be_pickled_says_so_whatever_its_repr_does(value: object) -> None:
    # The message's repr() of the value raised in place of the pickling error: a
    # task's recorded failure named an int's digit limit, and enqueue raised
    # ValueError (or SystemExit) instead of SerializationError.
    with pytest.raises(SerializationError, match=r"cannot pickle .*lock") as raised:
        DEFAULT_SERIALIZER.dumps(value)
    assert len(str(raised.value)) < 400
