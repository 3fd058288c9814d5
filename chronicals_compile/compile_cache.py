"""Keys the compile caches of AOTAutograd and Inductor by this package's source.

Why: those caches hash the graph's code and Inductor's config, not what our ops do or what our
passes wrote into node metadata. An op whose body AOTAutograd decomposes into the compiled code
(``chronicals::lora_linear``, a ``triton_op``) is baked into the cached artifact under its name,
so after an upgrade the old body would be served for the same graph (seen on the CPU: two
versions of the op compiled to one cached file); recompute tags (``gate_recompute``) are node
metadata the hash does not see, so a graph compiled with them would be served to the same graph
without them. A joint-graph pass that changes nothing, whose uuid is a digest of every source
file of the package and of our options, makes either a different cache key.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import pathlib
from typing import Any

import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

_PACKAGE = pathlib.Path(__file__).resolve().parent


def source_digest(root: pathlib.Path = _PACKAGE) -> str:
    """sha256 over the relative path and bytes of every ``.py`` file under ``root``."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def _package_digest() -> str:
    return source_digest()


def options_fingerprint(options: Any) -> str:
    """Our options (a dataclass) as canonical JSON: sets sorted, so equal across processes."""
    fields = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in dataclasses.asdict(options).items()}
    return json.dumps(fields, sort_keys=True, default=str)


class _CacheKey(CustomGraphPass):
    """A joint-graph pass that changes nothing: its uuid names this package's source and the
    options the graph was rewritten with."""

    def __init__(self, fingerprint: str):
        self.fingerprint = fingerprint

    def __call__(self, graph: fx.Graph) -> None:
        return None

    def uuid(self) -> Any:
        return f"chronicals-compile:{_package_digest()}:{self.fingerprint}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _CacheKey) and other.fingerprint == self.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)


class _Chained(CustomGraphPass):
    """Ours after the user's own joint-graph pass (Inductor takes one)."""

    def __init__(self, first: Any, second: CustomGraphPass):
        self.first, self.second = first, second

    def __call__(self, graph: fx.Graph) -> None:
        self.first(graph)
        self.second(graph)

    def uuid(self) -> Any:
        first = self.first.uuid() if hasattr(self.first, "uuid") else None
        return None if first is None else (first, self.second.uuid())


def joint_pass_patch(inductor_options: dict[str, Any], options: Any) -> dict[str, Any]:
    """The Inductor config patch that installs our cache key for ``options``, keeping a joint
    pass the user set."""
    import torch._inductor.config as inductor_config

    key = _CacheKey(options_fingerprint(options))
    current = inductor_options.get("joint_custom_pre_pass", inductor_config.joint_custom_pre_pass)
    if current is None or isinstance(current, _CacheKey):
        return {"joint_custom_pre_pass": key}
    if isinstance(current, (list, tuple)):  # Inductor takes one pass or a sequence of them
        return {"joint_custom_pre_pass": [*(p for p in current if not isinstance(p, _CacheKey)), key]}
    if isinstance(current, _Chained):
        current = current.first
    return {"joint_custom_pre_pass": _Chained(current, key)}
