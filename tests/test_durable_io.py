"""Durable writes: temporaries of a killed writer are found and removed, a directory
lock refuses a second writer, and an interrupted export is finished in its version."""
import os

import pytest

from ekg_tf.errors import UserError
from ekg_tf.export.exporter import resolve_version
from ekg_tf.utils.io import atomic_path, directory_lock, remove_temporaries


def test_remove_temporaries(tmp_path):
    keep = [tmp_path / "a" / "model.keras", tmp_path / "checkpoints" / "ckpt-3.index"]
    junk = [tmp_path / "a" / ".tmp-x-model.keras", tmp_path / "export" / ".edge-1" / "f",
            tmp_path / "checkpoints" / "ckpt-6_temp" / "part-0"]
    for path in keep + junk:
        os.makedirs(path.parent, exist_ok=True)
        path.write_text("x")
    removed = remove_temporaries(str(tmp_path))
    assert len(removed) == 3 and all(p.exists() for p in keep)
    assert not any(p.exists() for p in junk)
    assert not (tmp_path / "export" / ".edge-1").exists()
    with atomic_path(str(tmp_path / "b.txt")) as tmp:  # what atomic_path leaves when killed
        assert os.path.basename(tmp).startswith(".tmp-")
        open(tmp, "w").write("y")


def test_directory_lock_refuses_a_second_writer(tmp_path):
    with directory_lock(str(tmp_path), "this workdir"):
        with pytest.raises(UserError, match="another process is writing this workdir"):
            with directory_lock(str(tmp_path), "this workdir"):
                pass
    with directory_lock(str(tmp_path)):  # released
        pass


def test_interrupted_export_is_finished_in_its_version(tmp_path):
    art = tmp_path / "artifacts" / "1"
    os.makedirs(art)
    (art / "fingerprint.txt").write_text("abc\n")
    assert resolve_version(str(tmp_path), "m", 0, "abc") == 1   # killed: finish version 1
    assert resolve_version(str(tmp_path), "m", 0, "other") == 2  # another model: a new one
    (art / "export_report.json").write_text("{}")
    assert resolve_version(str(tmp_path), "m", 0, "abc") == 2   # complete: the next one
