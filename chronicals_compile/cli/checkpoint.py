"""Saving a run so that an interruption never leaves a half-written checkpoint behind."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading


@contextlib.contextmanager
def _sigint_deferred():
    """Hold Ctrl-C for the two renames that swap a checkpoint in; deliver it right after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list = []
    previous = signal.signal(signal.SIGINT, lambda *a: pending.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            raise KeyboardInterrupt


def save_atomic(dst: str, write) -> None:
    """``write(tmp_dir)`` into a fresh sibling folder, then swap it in for ``dst`` by renames.

    An interruption while writing leaves ``dst`` untouched (the temporary folder is removed); the
    swap itself (``dst`` -> ``dst.old``, ``tmp`` -> ``dst``) runs with Ctrl-C held back.
    """
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    base = os.path.basename(os.path.abspath(dst))
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    with _sigint_deferred():
        if os.path.exists(dst):
            old = f"{tmp}.old"
            os.rename(dst, old)
        os.rename(tmp, dst)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def clean_stale_temporaries(output_dir: str) -> None:
    """Temporary folders of a run killed outright (SIGKILL) while saving."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name.startswith(".model.tmp-"):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
