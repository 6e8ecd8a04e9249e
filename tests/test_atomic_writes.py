"""Writes that a kill cannot tear, outputs that are never replaced unasked, names that stay inside their folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from duge.errors import OutputExistsError, UnsafePathError
from duge.paths import atomic_write, atomic_write_bytes, contained_path, remove_stale_temporaries, temporary_folder

REPO = Path(__file__).resolve().parents[1]

# A writer that streams 1 MiB chunks through `atomic_write` (up to 10 GiB: it is killed long before)
# and says where its temporary file is once 8 MiB are written.
WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from duge.paths import atomic_write

    path, ready = Path(sys.argv[1]), Path(sys.argv[2])

    def write(tmp):
        with open(tmp, "wb") as f:
            for i in range(10_240):
                f.write(bytes([i % 251]) * (1 << 20))
                f.flush()
                if i == 8:  # written then renamed, so the test never reads a half-written "ready"
                    staging = ready.with_name(ready.name + ".staging")
                    staging.write_text(str(tmp))
                    staging.replace(ready)
                time.sleep(0.005)

    atomic_write(path, write, overwrite=True)
""")


def _temporaries(folder: Path, name: str) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith(f".{name}.") and p.name.endswith(".tmp"))


def test_sigkill_mid_write_leaves_the_previous_file_and_the_next_write_cleans_up(tmp_path):
    target = tmp_path / "model.safetensors"
    previous = b"the previous, complete model" * 1000
    atomic_write_bytes(target, previous)
    ready = tmp_path / "ready"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(ready)], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.time() + 60
        while not ready.exists() and time.time() < deadline and writer.poll() is None:
            time.sleep(0.02)
        assert ready.exists(), "the writer never started writing"
        temporary = Path(ready.read_text())
        assert temporary.stat().st_size >= 8 << 20  # mid-write: megabytes in, far from done
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait(30)
    assert writer.returncode == -signal.SIGKILL

    assert target.read_bytes() == previous  # the previous file is intact under the final name
    leftovers = _temporaries(tmp_path, target.name)
    assert leftovers == [temporary]  # the torn write sits only under a clearly named temporary
    assert temporary.name.startswith(f".model.safetensors.{writer.pid}.")

    atomic_write_bytes(target, b"next", overwrite=True)  # the next write of that name removes it
    assert target.read_bytes() == b"next"
    assert _temporaries(tmp_path, target.name) == []


def test_temporaries_of_a_running_writer_are_kept(tmp_path):
    target = tmp_path / "out.png"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = tmp_path / f".out.png.{sleeper.pid}.abc123.tmp"
        running.write_bytes(b"partial")
        other_name = tmp_path / ".other.png.1.abc.tmp"
        other_name.write_bytes(b"x")
        assert remove_stale_temporaries(target) == []
        assert running.exists() and other_name.exists()
    finally:
        sleeper.kill()
        sleeper.wait(30)
    assert remove_stale_temporaries(target) == [running]
    assert other_name.exists()  # a temporary of another name is not this write's business


def test_stale_temporary_folders_are_removed_but_old_versions_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".model.{pid}.zz9.tmp"
    (stale / "unet").mkdir(parents=True)
    old = tmp_path / f".model.{pid}.zz8.old"  # the previous version, moved aside during a replace
    old.mkdir()
    fresh = temporary_folder(tmp_path / "model")
    assert fresh.is_dir() and fresh.name.startswith(f".model.{os.getpid()}.")
    assert not stale.exists() and old.exists()


def test_existing_outputs_are_never_replaced_without_overwrite(tmp_path):
    target = tmp_path / "lora.safetensors"
    target.write_bytes(b"mine")
    with pytest.raises(OutputExistsError, match="already exists; pass --overwrite"):
        atomic_write(target, lambda tmp: tmp.write_bytes(b"theirs"))
    assert target.read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]


def test_a_failing_writer_leaves_nothing_behind(tmp_path):
    def write(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "grid.png", write)
    assert list(tmp_path.iterdir()) == []


def test_overwriting_a_symlinked_output_replaces_the_link_not_its_target(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "report.json").symlink_to(outside)
    atomic_write_bytes(folder / "report.json", b"{}", overwrite=True)
    assert outside.read_text() == "precious"
    assert not (folder / "report.json").is_symlink() and (folder / "report.json").read_bytes() == b"{}"


@pytest.mark.parametrize("name, fragment", [
    ("../escape.safetensors", "contains '..'"),
    ("loras/../../escape.safetensors", "contains '..'"),
    ("/etc/passwd", "is absolute"),
    ("link_out/model.safetensors", "outside"),  # a symlinked sub-folder pointing out
    ("file_link", "outside"),  # a symlink named like the output, pointing out
])
def test_names_that_leave_the_folder_are_refused(tmp_path, name, fragment):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "link_out").symlink_to(tmp_path, target_is_directory=True)
    (folder / "file_link").symlink_to(tmp_path / "elsewhere.txt")
    with pytest.raises(UnsafePathError, match=fragment):
        contained_path(folder, name)
    assert contained_path(folder, "loras/01_circle.safetensors") == folder / "loras" / "01_circle.safetensors"
