"""Atomic outputs honour the umask (mkstemp alone would leave them 0600)."""

import os
import stat

import pytest

from iisan.io import atomic_path, write_json


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_outputs_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "m.json", {"a": 1})
        with atomic_path(tmp_path / "x.bin") as tmp:
            tmp.write_bytes(b"x")
        plain = tmp_path / "plain"
        plain.write_text("")
    finally:
        os.umask(old)
    for f in ("m.json", "x.bin"):
        assert stat.S_IMODE((tmp_path / f).stat().st_mode) == mode == stat.S_IMODE(plain.stat().st_mode)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    write_json(tmp_path / "m.json", {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "m.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert (tmp_path / "m.json").read_text().strip().startswith("{") and len(list(tmp_path.iterdir())) == 1
