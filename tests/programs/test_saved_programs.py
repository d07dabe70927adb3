"""Saved and loaded as torch saves and loads them, in less time."""

import typing

import torch

from ane_build.programs import saved_programs


def _program():
    return torch.export.export(torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU()), (torch.randn(2, 8),))


def test_saves_the_same_bytes_without_building_the_canonical_form(tmp_path, monkeypatch):
    from torch._export.serde import serialize

    program = _program()
    for run in ("stock", "ours", "again"):  # the archive is named after the file
        (tmp_path / run).mkdir()
    torch.export.save(program, tmp_path / "stock" / "program.pt2")
    built = []
    canonicalize = serialize.canonicalize
    monkeypatch.setattr(serialize, "canonicalize", lambda *args: built.append(1) or canonicalize(*args))
    saved_programs.save(program, tmp_path / "ours" / "program.pt2")
    assert (tmp_path / "ours" / "program.pt2").read_bytes() == (tmp_path / "stock" / "program.pt2").read_bytes()
    assert not built
    torch.export.save(program, tmp_path / "again" / "program.pt2")
    assert built  # torch's own check again after


def test_loads_the_same_asking_each_type_hint_once(tmp_path, monkeypatch):
    path = tmp_path / "program.pt2"
    torch.export.save(_program(), path)
    calls = []
    get_type_hints = typing.get_type_hints
    monkeypatch.setattr(typing, "get_type_hints", lambda *args, **kwargs: calls.append(1) or get_type_hints(*args, **kwargs))
    stock, stock_calls = torch.export.load(path), len(calls)
    lean = saved_programs.load(path)
    assert lean.graph_module.code == stock.graph_module.code
    assert all(torch.equal(lean.state_dict[k], stock.state_dict[k]) for k in stock.state_dict)
    assert 0 < len(calls) - stock_calls < stock_calls / 3  # each (class, namespace) once
    calls.clear()
    torch.export.load(path)
    assert len(calls) == stock_calls  # torch's own again after
