"""Saved and loaded as torch saves and loads them, in less time."""

import typing

import torch

from ane_build.programs import saved_programs


def _program():
    return torch.export.export(torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU()), (torch.randn(2, 8),))


def test_saves_the_same_bytes_without_building_the_canonical_form(tmp_path, monkeypatch):
    from torch._export.serde import serialize

    program = _program()
    for run in ("ours", "stock", "again"):  # the archive is named after the file
        (tmp_path / run).mkdir()
    built = []
    canonicalize = serialize.canonicalize
    monkeypatch.setattr(serialize, "canonicalize", lambda *args: built.append(1) or canonicalize(*args))
    saved_programs.save(program, tmp_path / "ours" / "program.pt2")
    assert not built
    torch.export.save(program, tmp_path / "stock" / "program.pt2")  # the program as ours left it
    assert built  # torch's own check again after
    assert (tmp_path / "ours" / "program.pt2").read_bytes() == (tmp_path / "stock" / "program.pt2").read_bytes()


MODULE = """
import torch

class Model(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x) * 2
"""


def test_a_program_saves_the_same_bytes_from_any_checkout_folder(tmp_path):
    """The source lines nodes were traced from (with their file's path) are not saved."""
    import importlib.util

    saved = []
    for folder in ("one", "two"):
        path = tmp_path / folder / "model_code.py"
        path.parent.mkdir()
        path.write_text(MODULE)
        spec = importlib.util.spec_from_file_location("model_code", path)  # one name, two folders
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        program = torch.export.export(module.Model(), (torch.ones(2, 3),))
        assert any(str(path) in node.meta.get("stack_trace", "") for node in program.graph.nodes)
        (tmp_path / "out" / folder).mkdir(parents=True)
        saved_programs.save(program, tmp_path / "out" / folder / "program.pt2")
        saved.append((tmp_path / "out" / folder / "program.pt2").read_bytes())
    assert saved[0] == saved[1]


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
