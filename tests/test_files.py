"""files.atomic_path: only a regular file is ever replaced. Device nodes are copies of
/dev/null and /dev/full made with mknod (skipped where mknod is not allowed), so the real
ones are never at risk."""

import errno
import os
import socket
import stat
from pathlib import Path

import pytest
import torch

from functional_gpt import UserError, init_params, preset, save_params
from functional_gpt.cli import main
from functional_gpt.files import atomic_path, make_dir, write_json


def device(path, minor: int):
    """A character device at `path`: 1, 3 is /dev/null, 1, 7 is /dev/full."""
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
    except PermissionError:
        pytest.skip("mknod needs root")
    return path


def is_char_device(path) -> bool:
    return stat.S_ISCHR(os.stat(path).st_mode)


def test_a_regular_file_is_replaced_whole(tmp_path):
    (tmp_path / "a.json").write_text("old")
    write_json(tmp_path / "a.json", {"new": 1})
    assert (tmp_path / "a.json").read_text() == '{\n  "new": 1\n}\n'
    assert os.listdir(tmp_path) == ["a.json"]


def test_a_symbolic_link_keeps_pointing_at_its_target_which_is_replaced(tmp_path):
    (tmp_path / "target.json").write_text("old")
    (tmp_path / "link.json").symlink_to(tmp_path / "target.json")
    write_json(tmp_path / "link.json", [1])
    assert (tmp_path / "link.json").is_symlink() and (tmp_path / "target.json").read_text() == "[\n  1\n]\n"


def test_a_character_device_is_written_into_never_replaced(tmp_path):
    null = device(tmp_path / "null", 3)
    params = init_params(preset("cpu-tiny"))
    save_params(null, params, params.config)  # safetensors itself would replace the path it is given
    write_json(null, {"a": 1})
    assert is_char_device(null) and sorted(os.listdir(tmp_path)) == ["null"]


def test_a_full_device_is_one_line_and_stays_a_device(tmp_path):
    full = device(tmp_path / "full", 7)
    with pytest.raises(UserError, match=rf"^{full}: cannot write \(No space left on device\)$"):
        write_json(full, {"a": 1})
    assert is_char_device(full)


def test_a_block_device_is_refused_and_left_as_it_is(tmp_path):
    """A block node (a loop device's numbers) made here: nothing opens it, the check only stats it."""
    try:
        os.mknod(tmp_path / "disk", 0o600 | stat.S_IFBLK, os.makedev(7, 250))
    except PermissionError:
        pytest.skip("mknod needs root")
    with pytest.raises(UserError, match=r"disk: is a block device, not a regular file; refusing to replace it$"):
        write_json(tmp_path / "disk", {})
    assert stat.S_ISBLK(os.stat(tmp_path / "disk").st_mode) and os.listdir(tmp_path) == ["disk"]


def test_a_fifo_or_a_socket_is_refused_and_left_as_it_is(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UserError, match=r"fifo: is a FIFO, not a regular file; refusing to replace it$"):
        write_json(tmp_path / "fifo", {})
    assert stat.S_ISFIFO(os.stat(tmp_path / "fifo").st_mode)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "sock"))
        with pytest.raises(UserError, match=r"sock: is a socket, not a regular file; refusing to replace it$"):
            with atomic_path(tmp_path / "sock") as tmp:
                tmp.write_text("x")
        assert stat.S_ISSOCK(os.stat(tmp_path / "sock").st_mode)


@pytest.mark.parametrize("command", ["dump", "attention", "lens"])
def test_commands_writing_to_a_device_node_keep_it_a_device(tmp_path, command, capsys):
    """`fgpt dump --out /dev/null` as root used to replace /dev/null with a regular file."""
    params = init_params(preset("cpu-tiny"))
    save_params(tmp_path / "m.safetensors", params, params.config)
    out = device(tmp_path / "out.png", 3)
    argv = [command, "--weights", str(tmp_path / "m.safetensors"), "--prompt", "Hello there", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    assert is_char_device(out) and sorted(os.listdir(tmp_path)) == ["m.safetensors", "out.png"]


def test_an_os_error_is_named_by_its_reason_or_its_text_or_its_kind():
    from functional_gpt.files import os_error
    assert str(os_error("f", OSError(28, "No space left on device"))) == "f: cannot write (No space left on device)"
    assert str(os_error("f", OSError("the disk went away"), "cannot read")) == "f: cannot read (the disk went away)"
    assert str(os_error("f", PermissionError())) == "f: cannot write (PermissionError)"


def test_json_is_written_as_utf8_and_refuses_what_json_cannot_hold(tmp_path):
    path = tmp_path / "state.json"
    write_json(path, {"name": "Ünïcode ✓"})
    assert path.read_bytes() == '{\n  "name": "\\u00dcn\\u00efcode \\u2713"\n}\n'.encode()
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        write_json(path, {"loss": float("nan")})
    assert path.read_text(encoding="utf-8").startswith('{\n  "name"')  # the file before is kept


def test_make_dir_makes_the_parents_and_leaves_no_probe(tmp_path):
    made = make_dir(str(tmp_path / "a" / "b"))
    assert made == tmp_path / "a" / "b" and isinstance(made, Path) and os.listdir(made) == []
    assert make_dir(made) == made and os.listdir(made) == []  # an existing directory is fine


def test_make_dir_names_the_path_it_cannot_use(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    for path, message in [(tmp_path / "f", f"{tmp_path / 'f'}: exists and is not a directory"),
                          (tmp_path / "f" / "sub", f"{tmp_path / 'f' / 'sub'}: cannot write into this directory "
                                                   f"(Not a directory)"),
                          (None, "path: expected the path of a directory, got None")]:
        with pytest.raises(UserError) as e:
            make_dir(path)
        assert str(e.value) == message
    assert (tmp_path / "f").read_text() == "x"

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(UserError) as e:
        make_dir(tmp_path / "d")
    assert str(e.value) == f"{tmp_path / 'd'}: cannot write into this directory (No space left on device)"


def test_a_picture_whose_write_fails_is_closed_and_nothing_is_left(tmp_path):
    """Every PNG goes through save_png: a failed write is one line, and the figure is
    closed anyway (an open one holds its memory until exit: one per failed checkpoint)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from functional_gpt.files import save_png
    from functional_gpt.interp.attention_map import plot_attention
    from functional_gpt.interp.patching import plot_sweep
    from functional_gpt.training.loop import plot_losses

    (tmp_path / "f").write_text("x")
    before = plt.get_fignums()
    draws = [lambda out: save_png(plt.figure(), out),
             lambda out: plot_sweep(torch.zeros(1, 2), out, columns=["a", "b"]),
             lambda out: plot_attention(torch.full((1, 1, 2, 2), 0.5), ["a", "b"], out),
             lambda out: plot_losses([{"step": 1, "loss": 2.0}], out)]
    for draw in draws:
        with pytest.raises(UserError, match=r"f/a\.png: cannot write"):
            draw(tmp_path / "f" / "a.png")
        assert plt.get_fignums() == before
    save_png(plt.figure(), tmp_path / "ok.png")
    assert plt.get_fignums() == before and (tmp_path / "ok.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(os.listdir(tmp_path)) == ["f", "ok.png"]
