"""A method of a QuACK kernel class rebuilt from QuACK's own source with a few lines edited.

Why: a CuTe-DSL kernel is Python that the DSL traces into device code, so changing one step
inside QuACK's 450-line ``GemmSm90.kernel`` means either copying the method into this package or
editing its text. Editing keeps QuACK's code in QuACK and only the edit here: each edit names a
line that must occur exactly once in the method, so another QuACK version whose text moved makes
``patched_method`` raise ``SourcePatchError`` and the caller keeps QuACK's own kernel.

The DSL reads a function's source file (``inspect.getsourcelines``) to rewrite its control flow,
so the edited method is written to a file under the system's temporary directory and executed in
a copy of its QuACK module's globals, which is what the DSL would have used for the original.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import os
import sys
import tempfile
import textwrap
from typing import Callable


class SourcePatchError(RuntimeError):
    """The method's source is not the text an edit was written against."""


@dataclasses.dataclass(frozen=True)
class Edit:
    """At the one line of the method whose stripped text is ``anchor``: put ``before`` ahead of it
    and replace it with ``replacement`` (None keeps it). Lines are given without the anchor's
    indentation, which they receive."""
    anchor: str
    before: tuple[str, ...] = ()
    replacement: str | None = None


def defining_class(cls: type, name: str) -> type:
    """The class in ``cls``'s MRO whose body defines ``name`` (what ``cls.name`` resolves to)."""
    for klass in cls.__mro__:
        if name in vars(klass):
            return klass
    raise SourcePatchError(f"{cls.__name__} has no attribute {name!r}")


def method_source(owner: type, name: str) -> str:
    """``owner.name``'s source with its decorators, dedented, read from the module file."""
    module = sys.modules[owner.__module__]
    text = inspect.getsource(module)
    for node in ast.parse(text).body:
        if isinstance(node, ast.ClassDef) and node.name == owner.__name__:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == name:
                    first = min([d.lineno for d in item.decorator_list] + [item.lineno])
                    lines = text.splitlines(keepends=True)[first - 1:item.end_lineno]
                    return textwrap.dedent("".join(lines))
    raise SourcePatchError(f"{owner.__module__}.{owner.__name__}.{name} not found in its module's source")


def apply_edits(source: str, edits: tuple[Edit, ...]) -> str:
    lines = source.splitlines()
    for edit in edits:
        hits = [i for i, line in enumerate(lines) if line.strip() == edit.anchor]
        if len(hits) != 1:
            raise SourcePatchError(f"expected the line {edit.anchor!r} once in the method, found it {len(hits)} times")
        i = hits[0]
        indent = lines[i][:len(lines[i]) - len(lines[i].lstrip())]
        new = [indent + line if line else line for line in edit.before]
        new.append(lines[i] if edit.replacement is None else indent + edit.replacement)
        lines[i:i + 1] = new
    return "\n".join(lines) + "\n"


def _source_file(source: str, file_name: str) -> str:
    """A file holding exactly ``source``, for the DSL to read back: in a per-user folder of the
    temporary directory (reused across processes), or a fresh private folder when that one is not
    ours or the file there holds other text (the DSL would compile what the file says)."""
    folder = os.path.join(tempfile.gettempdir(), f"chronicals_quack_patches_{os.getuid()}")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    if os.stat(folder).st_uid != os.getuid():
        folder = tempfile.mkdtemp(prefix="chronicals_quack_patches_")
    path = os.path.join(folder, file_name)
    if not os.path.exists(path):
        partial = f"{path}.{os.getpid()}"
        with open(partial, "w") as f:
            f.write(source)
        os.replace(partial, path)
    with open(path) as f:
        if f.read() == source:
            return path
    path = os.path.join(tempfile.mkdtemp(prefix="chronicals_quack_patches_"), file_name)
    with open(path, "w") as f:
        f.write(source)
    return path


def patched_method(cls: type, name: str, edits: tuple[Edit, ...]) -> Callable:
    """``cls.name`` (as QuACK defines it, decorators included) with ``edits`` applied, as a function
    to assign in a subclass body. The file is named by a hash of its text, so a process compiles
    one file per distinct edit and concurrent processes write the same bytes."""
    owner = defining_class(cls, name)
    source = apply_edits(method_source(owner, name), edits)
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    path = _source_file(source, f"{owner.__name__}_{name}_{digest}.py")
    namespace = dict(vars(sys.modules[owner.__module__]))
    namespace["__name__"] = f"chronicals_quack_patch_{digest}"
    namespace["__file__"] = path
    # The class's own names (e.g. its EpilogueParams) as locals: the signature's annotations are
    # evaluated where the class body would have evaluated them. dont_inherit: this module's
    # `from __future__ import annotations` would turn the annotations the DSL reads
    # (cutlass.Constexpr) into strings.
    scope = {k: v for k, v in vars(owner).items() if not k.startswith("__")}
    exec(compile(source, path, "exec", dont_inherit=True), namespace, scope)  # noqa: S102 - QuACK's text, our edits
    method = scope[name]
    for fn in (method, getattr(method, "__wrapped__", None)):
        if fn is not None:
            fn.__qualname__ = f"{owner.__qualname__}.{name}"
    return method
