"""The compile caches are keyed by our source: a change to any file of the package (an op body
AOTAutograd inlines, a pass's recompute tags) is a different key, a user's joint pass is kept."""
import pathlib

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from chronicals_compile import compile_cache
from chronicals_compile.config import Options


def test_digest_changes_with_any_source_file(tmp_path: pathlib.Path):
    (tmp_path / "ops").mkdir()
    (tmp_path / "ops" / "op.py").write_text("def body(x):\n    return x\n")
    (tmp_path / "notes.txt").write_text("not source")
    first = compile_cache.source_digest(tmp_path)
    (tmp_path / "notes.txt").write_text("still not source")
    assert compile_cache.source_digest(tmp_path) == first
    (tmp_path / "ops" / "op.py").write_text("def body(x):\n    return x + 0\n")
    assert compile_cache.source_digest(tmp_path) != first
    (tmp_path / "ops" / "op.py").write_text("def body(x):\n    return x\n")
    assert compile_cache.source_digest(tmp_path) == first
    (tmp_path / "ops" / "op.py").rename(tmp_path / "ops" / "renamed.py")
    assert compile_cache.source_digest(tmp_path) != first


def test_the_key_names_the_package_source_and_the_options():
    default = compile_cache.joint_pass_patch({}, Options())["joint_custom_pre_pass"]
    assert default.uuid().startswith(f"chronicals-compile:{compile_cache.source_digest()}:")
    assert default == compile_cache.joint_pass_patch({}, Options())["joint_custom_pre_pass"]
    off = compile_cache.joint_pass_patch({}, Options(disable=frozenset({"gate_recompute"})))["joint_custom_pre_pass"]
    assert off.uuid() != default.uuid()
    both = Options(enable=frozenset({"concat_linear", "lora_linear", "rope"}))
    assert compile_cache.options_fingerprint(both) == compile_cache.options_fingerprint(
        Options(enable=frozenset({"rope", "lora_linear", "concat_linear"})))


class _UserPass(CustomGraphPass):
    calls = 0

    def __call__(self, graph):
        _UserPass.calls += 1

    def uuid(self):
        return "user-pass"


def test_a_users_joint_pass_is_kept_and_keys_the_cache_with_ours():
    ours = compile_cache.joint_pass_patch({}, Options())["joint_custom_pre_pass"]
    user = _UserPass()
    chained = compile_cache.joint_pass_patch({"joint_custom_pre_pass": user}, Options())["joint_custom_pre_pass"]
    chained(torch.fx.Graph())
    assert _UserPass.calls == 1
    assert chained.uuid() == ("user-pass", ours.uuid())
    # a second compile with the patch already installed replaces our key, never stacks it
    again = compile_cache.joint_pass_patch({"joint_custom_pre_pass": chained}, Options())["joint_custom_pre_pass"]
    assert again.uuid() == ("user-pass", ours.uuid())
    listed = compile_cache.joint_pass_patch({"joint_custom_pre_pass": [user]}, Options())["joint_custom_pre_pass"]
    assert listed == [user, ours]
    tupled = compile_cache.joint_pass_patch({"joint_custom_pre_pass": (user,)}, Options())["joint_custom_pre_pass"]
    assert tupled == [user, ours]


def test_a_tuple_of_user_passes_compiles_and_runs():
    """Inductor accepts a tuple of joint passes; ours joins it instead of being called as one."""
    _UserPass.calls = 0
    compiled = torch.compile(lambda x: (x.sin() * 2).sum(), backend="chronicals",
                             options={"joint_custom_pre_pass": (_UserPass(),)})
    x = torch.randn(5, requires_grad=True)
    # caches off: a cache hit (an earlier run on this machine) skips the joint passes
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        compiled(x).backward()
    torch.testing.assert_close(x.grad, 2 * x.detach().cos())
    assert _UserPass.calls >= 1
