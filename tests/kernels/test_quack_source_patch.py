"""The text edits ``quack_dgated_prefetch`` makes to QuACK's kernel source (``quack_source_patch``):
where they land in QuACK 0.3.0's methods, and that an edit whose anchor is not there exactly once
refuses instead of compiling something else. No GPU: the methods are read and edited as text
(tests/kernels/test_quack_kernels_compile.py lowers the edited kernel to a cubin)."""
from __future__ import annotations

import pytest
from quack import gemm_dact  # the test command installs the quack extra

from chronicals_compile.kernels import quack_dgated_prefetch
from chronicals_compile.kernels import quack_source_patch
from chronicals_compile.kernels.quack_source_patch import (Edit, SourcePatchError, apply_edits, defining_class,
                                                           method_source)


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()]


def test_the_kernel_edit_issues_the_c_loads_just_before_the_epilogue_barrier():
    owner = defining_class(gemm_dact.GemmDGatedSm90, "kernel")
    assert owner.__name__ == "GemmSm90"
    edited = _lines(apply_edits(method_source(owner, "kernel"), (quack_dgated_prefetch._EARLY_C_KERNEL,)))
    barrier = edited.index('self.pingpong_barrier_sync(warp_group_idx, "epi")')
    assert edited[barrier - 3:barrier] == [
        "if const_expr(has_C):",
        "epi_producer_state = self.early_c_loads(epi_pipeline, epi_producer_state, tma_atom_c, mC_mnl, sC,",
        "tile_coord_mnkl, varlen_manager, is_tma_warp)"]
    assert edited[barrier - 4] == "if const_expr(self.pingpong):"  # only the ping-pong schedule changes
    assert edited.index("# EPILOGUE") < barrier < edited.index("epi_read_state, epi_producer_state = self.epilogue(")


def test_the_epilogue_edit_drops_its_first_c_loads_only_under_ping_pong():
    owner = defining_class(gemm_dact.GemmDGatedSm90, "epilogue")
    assert owner.__name__ == "GemmActMixin"
    original = method_source(owner, "epilogue")
    edited = apply_edits(original, (quack_dgated_prefetch._EARLY_C_EPILOGUE, quack_dgated_prefetch._EPILOGUE_SUBTILE_ORDER))
    assert "if const_expr(copy_C is not None and not self.pingpong):" in edited
    assert len(edited.splitlines()) == len(original.splitlines())
    # the subtile order early_c_loads reproduces is the epilogue's (a no-op edit: it must be found once)
    assert _lines(edited).count("epi_tile_layout = cute.make_layout(epi_tile_shape, stride=(epi_tile_shape[1], 1))") == 1
    # the in-loop prefetch of the later subtiles stays
    assert "if const_expr(copy_C is not None and epi_idx + self.epi_c_stage < epi_tile_num):" in edited


@pytest.mark.parametrize("anchor", ["this line is not in the method", "return epi_read_state, epi_producer_state"])
def test_an_anchor_not_found_exactly_once_refuses(anchor):
    source = "def f(self):\n    x = 1\n    return epi_read_state, epi_producer_state\n"
    source = source if anchor.startswith("this") else source + "    return epi_read_state, epi_producer_state\n"
    with pytest.raises(SourcePatchError, match="expected the line"):
        apply_edits(source, (Edit(anchor=anchor, before=("y = 2",)),))


def test_inserted_lines_take_the_anchors_indentation():
    source = "def f(self):\n    if a:\n        b()\n"
    edited = apply_edits(source, (Edit(anchor="b()", before=("c()", "if d:", "    e()"), replacement="g()"),))
    assert edited == "def f(self):\n    if a:\n        c()\n        if d:\n            e()\n        g()\n"


def test_the_source_file_holds_exactly_the_edited_text(tmp_path, monkeypatch):
    """The DSL compiles what the file says: a file of the same name holding other text (left by
    someone else in the shared temporary directory) is not used."""
    monkeypatch.setattr(quack_source_patch.tempfile, "tempdir", str(tmp_path))
    first = quack_source_patch._source_file("x = 1\n", "m_abc.py")
    assert open(first).read() == "x = 1\n"
    assert quack_source_patch._source_file("x = 1\n", "m_abc.py") == first  # reused
    with open(first, "w") as f:
        f.write("import os  # not ours\n")
    other = quack_source_patch._source_file("x = 1\n", "m_abc.py")
    assert other != first and open(other).read() == "x = 1\n"
