"""The generic name registry behind the defences, the estimators and the model zoo."""

from dataclasses import dataclass

import pytest

from elgs.defenses import DEFENSES, ESTIMATORS
from elgs.models import MODELS
from elgs.registry import Registry


@dataclass(frozen=True)
class _Tool:
    name: str
    sharp: bool = False


def test_register_find_names_and_mapping_view():
    tools = Registry[_Tool]("tool")
    saw, file_ = tools.register(_Tool("saw", sharp=True)), tools.register(_Tool("file"))
    assert tools.find("saw") is saw and tools["file"] is file_
    assert tools.names() == ["saw", "file"] == list(tools) and len(tools) == 2
    assert tools.names(where=lambda tool: tool.sharp) == ["saw"]
    assert dict(tools.items()) == {"saw": saw, "file": file_}
    with pytest.raises(ValueError, match="tool 'saw' is already registered"):
        tools.register(_Tool("saw"))
    with pytest.raises(KeyError, match="unknown tool 'hammer'; choose one of saw, file"):
        tools.find("hammer")
    with tools.temporarily(_Tool("hammer")) as hammer:
        assert tools.find("hammer") is hammer and tools.names() == ["saw", "file", "hammer"]
    assert tools.names() == ["saw", "file"]


def test_the_three_registries_are_one_kind():
    for registry, kind in ((DEFENSES, "defence"), (ESTIMATORS, "saliency estimator"), (MODELS, "model")):
        assert isinstance(registry, Registry) and registry.kind == kind
    assert DEFENSES.names(where=lambda d: d.escalates_to is not None) == ["auto"]
