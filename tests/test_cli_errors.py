"""What a user of the `ckptbeam` command sees when things go wrong, or take a while.

Every failure is one line on stderr naming the file, field, path or URI and what was expected
(`--debug` adds the traceback); nothing is published and an existing checkpoint is untouched;
remote outputs give up after the configured number of attempts; progress is shown; Ctrl-C and a
killed worker end the run with one line.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
import threading

import pytest
from conftest import FIXTURES, ROOT, tree_hashes

from pipelines import cli
from pipelines.errors import _children, one_line

LLAMA = os.path.join(FIXTURES, "llama_bf16")
PROGRESS_LINE = re.compile(r"^\S+ \S+ INFO ckptbeam: progress: (\d+)/(\d+) work items")


def _env(**extra: str) -> dict:
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def _entry_point() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "ckptbeam")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "pipelines.cli"]


def ckptbeam(*args: str, **env: str) -> subprocess.CompletedProcess:
    """The installed console script, running this checkout's code."""
    return subprocess.run([*_entry_point(), *args], capture_output=True, text=True, env=_env(**env), timeout=300)


def error_lines(stderr: str) -> list[str]:
    """stderr without the periodic progress lines."""
    return [line for line in stderr.splitlines() if line.strip() and not PROGRESS_LINE.match(line)]


def one_error_line(result: subprocess.CompletedProcess, command: str = "convert") -> str:
    assert result.returncode == 1, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"ckptbeam {command}: error: "), lines[0]
    return lines[0]


@contextlib.contextmanager
def tmpfs(path, size: str, read_only: bool = False):
    """A small tmpfs at `path` (needs root and a sandbox that allows mounts; else skip)."""
    os.makedirs(path, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# --------------------------------------------------------------------------- one line per failure


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"num_hidden_layers": "abc"}, "num_hidden_layers"),
        ({"hidden_size": [64]}, "hidden_size"),
        ({"num_attention_heads": 0}, "num_attention_heads"),
        ({"rope_parameters": "llama3"}, "rope_scaling"),
        ({"vocab_size": 10**15}, "vocab_size"),
    ],
    ids=["string", "list", "zero-heads", "string-for-object", "vocab-10^15"],
)
def test_config_fields_of_the_wrong_type_are_one_line(tmp_path, capsys, change, fragment):
    src = tmp_path / "m"
    shutil.copytree(LLAMA, src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, **change}))
    assert cli.main(["convert", "--source", str(src), "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ckptbeam convert: error: "), err
    assert "config.json" in err[0] and fragment in err[0]
    assert not (tmp_path / "o").exists()


def test_deeply_nested_config_json_is_one_line(tmp_path, capsys):
    src = tmp_path / "m"
    shutil.copytree(LLAMA, src)
    (src / "config.json").write_text('{"model_type": "llama", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert cli.main(["convert", "--source", str(src), "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json" in err[0] and "deep" in err[0], err


def test_output_that_is_a_file_is_one_line_naming_it(tmp_path, capsys):
    (tmp_path / "taken").write_text("not a directory")
    assert cli.main(["convert", "--source", LLAMA, "--output", str(tmp_path / "taken")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "taken") in err[0] and "Not a directory" in err[0], err
    assert (tmp_path / "taken").read_text() == "not a directory"


def test_read_only_output_is_one_line(tmp_path, capsys):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        assert cli.main(["convert", "--source", LLAMA, "--output", str(ro / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Read-only file system" in err[0] and "choose another --output" in err[0], err


def test_debug_adds_the_traceback_and_logs_every_item(tmp_path):
    (tmp_path / "taken").write_text("x")
    failed = ckptbeam("convert", "--source", LLAMA, "--output", str(tmp_path / "taken"), "--debug")
    assert failed.returncode == 1 and "Traceback (most recent call last)" in failed.stderr
    assert failed.stderr.strip().splitlines()[-1].startswith("ckptbeam convert: error: ")
    ok = ckptbeam("convert", "--debug", "--source", LLAMA, "--output", str(tmp_path / "out"))
    assert ok.returncode == 0, ok.stderr
    assert len(re.findall(r"DEBUG ckptbeam: work item \d+/12 done", ok.stderr)) == 12


def test_beam_wrapped_errors_are_unwrapped_to_our_line():
    """Across processes Beam delivers only the worker's traceback text."""
    remote = RuntimeError(
        "Pipeline job failed in state FAILED: Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n'
        "ValueError: RESOURCE_EXHAUSTED: Failed to write 12 bytes: No space left on device [os_error_code='28']\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        "Traceback (most recent call last):\n"
        '  File "graph.py", line 2, in g\n'
        "RuntimeError: work item 8 (params.w) failed: RESOURCE_EXHAUSTED: No space left on device "
        "[os_error_code='28'] [while running 'ConvertWorkItem']\n"
    )
    assert one_line(remote) == (
        "work item 8 (params.w) failed: RESOURCE_EXHAUSTED: No space left on device [os_error_code='28']; "
        "the disk is full: free space or choose another --output (not retried)"
    )
    assert "worker process died" in one_line(RuntimeError("Channel closed prematurely."))

    ours = RuntimeError("work item 3 (params.w) failed: bad bytes")
    wrapped = RuntimeError(f"{ours} [while running 'ConvertWorkItem']")
    wrapped.__cause__ = ours
    wrapped.add_note("nothing was published at /out")
    assert one_line(wrapped) == "work item 3 (params.w) failed: bad bytes; nothing was published at /out"


# --------------------------------------------------------------------------- disk full


def test_disk_full_is_one_line_not_retried_and_the_old_checkpoint_stays(tmp_path):
    """A tmpfs that holds one checkpoint (~520 KiB) but not two: re-converting with --force (the
    new checkpoint is written next to the old one and swapped in only after it commits) fills it."""
    with tmpfs(tmp_path / "small", "700k") as disk:
        out = disk / "out"
        first = ckptbeam("convert", "--source", LLAMA, "--output", str(out))
        assert first.returncode == 0, first.stderr
        before = tree_hashes(out / "0")
        result = ckptbeam(
            "convert", "--source", LLAMA, "--output", str(out), "--force", CKPTBEAM_PROGRESS_INTERVAL_S="60"
        )
        line = one_error_line(result)
        assert "No space left on device" in line and "the disk is full" in line, line
        assert f"nothing was published at {out}" in line
        assert "retrying" not in result.stderr and "attempts" not in line  # ENOSPC is not transient
        # Nothing but the failed run's staging, kept (with its committed items) for a resuming rerun.
        assert all(e == "0" or e.startswith("0.orbax-checkpoint-tmp-") for e in os.listdir(out)), os.listdir(out)
        assert tree_hashes(out / "0") == before


# --------------------------------------------------------------------------- remote outputs


class Unavailable:
    """A GCS endpoint that answers every request with 503, counting them."""

    def __init__(self):
        self.requests: list[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                owner.requests.append(f"{self.command} {self.path}")
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _gcs_env(url: str) -> dict:
    return {
        "TENSORSTORE_GCS_HTTP_URL": url,
        "STORAGE_EMULATOR_HOST": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
        "CKPTBEAM_REMOTE_ATTEMPTS": "3",
        "CKPTBEAM_REMOTE_BACKOFF_S": "0.01",
    }


def test_unavailable_gs_output_gives_up_after_the_configured_attempts(tmp_path):
    gcs = Unavailable()
    try:
        line = one_error_line(
            ckptbeam("convert", "--source", LLAMA, "--output", "gs://ckpt-bucket/out", **_gcs_env(gcs.url))
        )
        assert "gs://ckpt-bucket/out" in line and "503" in line, line
        assert len(gcs.requests) == 3, gcs.requests  # CKPTBEAM_REMOTE_ATTEMPTS, not TensorStore's default 32

        local = tmp_path / "ckpt"
        assert ckptbeam("convert", "--source", LLAMA, "--output", str(local)).returncode == 0
        gcs.requests.clear()
        line = one_error_line(
            ckptbeam("export", "--source", str(local), "--output", "gs://ckpt-bucket/hf", **_gcs_env(gcs.url)), "export"
        )
        assert "gs://ckpt-bucket/hf" in line and "503" in line, line
        assert len(gcs.requests) == 3, gcs.requests
    finally:
        gcs.close()


def test_gs_output_at_a_closed_port_names_the_uri():
    gcs = Unavailable()
    url = gcs.url
    gcs.close()  # nothing listens there any more
    line = one_error_line(ckptbeam("convert", "--source", LLAMA, "--output", "gs://ckpt-bucket/out", **_gcs_env(url)))
    assert "gs://ckpt-bucket/out" in line and "connect" in line.lower(), line


# --------------------------------------------------------------------------- progress


def test_progress_lines_on_stderr_of_convert_and_export(tmp_path):
    result = ckptbeam(
        "convert", "--source", LLAMA, "--output", str(tmp_path / "o"), CKPTBEAM_PROGRESS_INTERVAL_S="0.05"
    )
    assert result.returncode == 0, result.stderr
    progress = [PROGRESS_LINE.match(line) for line in result.stderr.splitlines()]
    counts = [(int(m.group(1)), int(m.group(2))) for m in progress if m]
    assert counts and counts[-1] == (12, 12), result.stderr
    assert "iB/s, ETA" in result.stderr
    assert "work item 1/12 done" not in result.stderr  # one line per item only with --debug
    assert "Discarding unparseable args" not in result.stderr and "Traceback" not in result.stderr

    exported = ckptbeam(
        "export", "--source", str(tmp_path / "o"), "--output", str(tmp_path / "hf"), CKPTBEAM_PROGRESS_INTERVAL_S="0.05"
    )
    assert exported.returncode == 0, exported.stderr
    counts = [m.groups() for m in map(PROGRESS_LINE.match, exported.stderr.splitlines()) if m]
    assert counts and counts[-1][0] == counts[-1][1], exported.stderr
    assert "Discarding unparseable args" not in exported.stderr


def test_progress_bar_on_a_terminal(tmp_path):
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            [*_entry_point(), "convert", "--source", LLAMA, "--output", str(tmp_path / "o")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=follower, env=_env(),
        )  # fmt: skip
        os.close(follower)
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other end closed
                break
            if not chunk:
                break
            shown += chunk
        assert proc.wait(timeout=300) == 0, shown.decode(errors="replace")
    finally:
        os.close(leader)
    text = shown.decode(errors="replace")
    assert "12/12 items" in text and "B/s" in text, text  # tqdm: bytes, rate, ETA, items
    assert "INFO ckptbeam: progress:" not in text


# --------------------------------------------------------------------------- Ctrl-C and a killed worker

BLOCKING = os.path.join(ROOT, "tests", "blocking_convert.py")


def _start_blocking(out, *beam_args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, BLOCKING, "convert", "--source", LLAMA, "--output", str(out), *beam_args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=_env(CKPTBEAM_PROGRESS_INTERVAL_S="0.1"),
    )  # fmt: skip


def _wait_for_a_finished_item(proc: subprocess.Popen) -> list[str]:
    """Read stderr until the progress line shows a finished item (the others are blocked)."""
    seen = []
    watchdog = threading.Timer(240, proc.kill)
    watchdog.start()
    try:
        for line in proc.stderr:
            seen.append(line)
            m = PROGRESS_LINE.match(line)
            if m and int(m.group(1)) >= 1:
                return seen
    finally:
        watchdog.cancel()
    raise AssertionError("the run ended before any item finished:\n" + "".join(seen))


def _finish(proc: subprocess.Popen, seen: list[str]) -> tuple[int, list[str]]:
    rest = proc.communicate(timeout=120)[1]
    return proc.returncode, error_lines("".join(seen) + rest)


def test_ctrl_c_is_one_line_exit_130_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    proc = _start_blocking(out)
    seen = _wait_for_a_finished_item(proc)
    proc.send_signal(signal.SIGINT)
    code, lines = _finish(proc, seen)
    assert code == 130, lines
    assert len(lines) == 1 and lines[0].startswith("ckptbeam convert: interrupted; "), lines
    assert "of 12 work items had finished" in lines[0] and f"nothing was published at {out}" in lines[0]
    assert os.listdir(out) == []  # neither a checkpoint nor staging


def test_killed_worker_fails_the_run_with_one_line(tmp_path):
    """Beam's multi_processing runner would wait forever for a worker killed by the OOM killer."""
    out = tmp_path / "out"
    proc = _start_blocking(
        out, "--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"
    )
    seen = _wait_for_a_finished_item(proc)
    workers = [w for shell in _children(proc.pid) for w in _children(shell)]
    assert workers, "no worker processes found"
    os.kill(workers[0], signal.SIGKILL)
    code, lines = _finish(proc, seen)
    assert code == 1, lines
    assert len(lines) == 1, lines
    assert "worker process died" in lines[0] and "killed by SIGKILL" in lines[0], lines[0]
    assert "--max_item_bytes" in lines[0] and f"nothing was published at {out}" in lines[0]
    assert os.listdir(out) == []


# --------------------------------------------------------------------------- inspect


def test_inspect_a_relative_path(tmp_path, monkeypatch, capsys):
    assert ckptbeam("convert", "--source", LLAMA, "--output", str(tmp_path / "rel" / "ckpt")).returncode == 0
    monkeypatch.chdir(tmp_path)
    assert cli.main(["inspect", os.path.join("rel", "ckpt")]) == 0
    assert "params.params.decoder.layers.mlp.wi_0.kernel" in capsys.readouterr().out


def test_a_reader_that_stops_early_is_no_error(tmp_path):
    """`ckptbeam inspect OUT | head -1`: the pipe's reader is gone before the listing is written;
    the listing just stops (exit 141, as a shell reports SIGPIPE), with no error line."""
    out = str(tmp_path / "out")
    assert ckptbeam("convert", "--source", LLAMA, "--output", out).returncode == 0
    proc = subprocess.Popen(
        [*_entry_point(), "inspect", out], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env()
    )
    proc.stdout.close()  # the reader goes away before anything is written
    stderr = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == cli.EXIT_BROKEN_PIPE, stderr
    assert "error" not in stderr.lower(), stderr
