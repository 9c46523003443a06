"""A model dir's life as a user lives it: the installed `nnclr`, run from a temporary working
directory with the relative paths the README shows (conftest.run_nnclr), on the tiny preset.

    nnclr pretrain                     # writes runs/<preset>/
    nnclr pretrain                     # again: resumes (here: the run is finished, nothing to redo)
    nnclr pretrain --train_steps=6     # refused: a longer run is an explicit act, its schedule stated
    nnclr knn --model_dir=runs/tiny    # the evaluation modes find the relative run too
    Ctrl-C in the middle               # a checkpoint at that step; the same command resumes there
    a read-only model dir              # one sentence before any work
"""

import os
import re
import shutil
import signal
import subprocess
import threading

import pytest

from conftest import nnclr_command, run_nnclr

QUICK = ["--preset=tiny", "--set=run.report=false"]  # the tiny preset trains 4 steps


@pytest.fixture(scope="module", name="trained_cwd")
def trained_cwd_fixture(tmp_path_factory, embedded_data_dir):
    """A working directory in which `nnclr pretrain --preset=tiny` ran: runs/tiny/, 4 steps."""
    cwd = tmp_path_factory.mktemp("user")
    run_nnclr("pretrain", *QUICK, cwd=cwd, data_dir=embedded_data_dir, check=True)
    return cwd


def _copy(trained_cwd, tmp_path):
    cwd = tmp_path / "user"
    shutil.copytree(trained_cwd, cwd)
    return cwd


def _files(folder):
    """{relative path: bytes} of every file under `folder`."""
    return {path.relative_to(folder): path.read_bytes() for path in folder.rglob("*")
            if path.is_file()}


def _error_line(done, mode):
    """The last stderr line, checked to be the CLI's one sentence (exit 2, no traceback)."""
    assert done.returncode == 2, (done.stdout[-2000:], done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"nnclr {mode}: error: "), done.stderr[-3000:]
    return last


def test_running_pretrain_again_resumes_and_training_longer_is_explicit(
        trained_cwd, tmp_path, embedded_data_dir):
    cwd = _copy(trained_cwd, tmp_path)
    checkpoints = cwd / "runs" / "tiny" / "checkpoints"
    before = _files(checkpoints)

    again = run_nnclr("pretrain", *QUICK, cwd=cwd, data_dir=embedded_data_dir, check=True)
    assert "Resumed from runs/tiny/checkpoints/ckpt-4 at step 4." in again.stderr, again.stderr
    assert "already holds a finished run of 4 steps" in again.stderr, again.stderr
    assert _files(checkpoints) == before

    longer = run_nnclr("pretrain", *QUICK, "--train_steps=6", cwd=cwd, data_dir=embedded_data_dir)
    message = _error_line(longer, "pretrain")
    assert ("Model dir 'runs/tiny' holds a run at step 4 trained with other settings "
            "(optim.train_steps 4 -> 6)") in message
    assert "add --allow_config_change" in message and "recomputed for 6 steps" in message
    assert _files(checkpoints) == before

    allowed = run_nnclr("pretrain", *QUICK, "--train_steps=6", "--allow_config_change", cwd=cwd,
                        data_dir=embedded_data_dir, check=True)
    assert "Resumed from runs/tiny/checkpoints/ckpt-4 at step 4." in allowed.stderr
    assert "continuing it with changed settings (optim.train_steps 4 -> 6)" in allowed.stderr
    assert (checkpoints / "ckpt-6.index").exists()

    run_nnclr("knn", "--model_dir=runs/tiny", cwd=cwd, data_dir=embedded_data_dir, check=True)
    assert (cwd / "runs" / "tiny" / "knn.json").exists()


def _environment(data_dir):
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TFDS_DATA_DIR=str(data_dir))


def test_ctrl_c_saves_at_the_step_boundary_and_the_same_command_resumes(
        tmp_path, embedded_data_dir):
    command = ["pretrain", *QUICK, "--train_steps=12"]
    with open(tmp_path / "stderr.log", "w") as stderr:
        process = subprocess.Popen([*nnclr_command(), *command], cwd=tmp_path,
                                   stdout=subprocess.PIPE, stderr=stderr,
                                   env=_environment(embedded_data_dir))
        watchdog = threading.Timer(300, process.kill)  # a hung run fails, not the suite
        watchdog.start()
        shown = b""
        while b"1/12" not in shown:  # Keras' progress bar after the first step
            chunk = os.read(process.stdout.fileno(), 4096)
            assert chunk, f"nnclr ended ({process.wait()}) before its first step"
            shown += chunk
        process.send_signal(signal.SIGINT)
        process.communicate()
        watchdog.cancel()
    err = (tmp_path / "stderr.log").read_text()
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    stopped = re.fullmatch(r"nnclr pretrain: interrupted at step (\d+); the same command resumes",
                           err.strip().splitlines()[-1])
    assert stopped, err[-3000:]
    step = int(stopped.group(1))
    assert 1 <= step < 12 and (tmp_path / f"runs/tiny/checkpoints/ckpt-{step}.index").exists()

    resumed = run_nnclr(*command, cwd=tmp_path, data_dir=embedded_data_dir, check=True)
    assert f"Resumed from runs/tiny/checkpoints/ckpt-{step} at step {step}." in resumed.stderr
    assert (tmp_path / "runs/tiny/checkpoints/ckpt-12.index").exists()


def _read_only(folder, command):
    """`command` with `folder` read-only: by its mode, or for root (whom modes do not stop) by a
    read-only bind mount in a mount namespace of its own."""
    if os.geteuid() != 0:
        for parent, _, _ in os.walk(folder):
            os.chmod(parent, 0o555)
        return command
    if shutil.which("unshare") is None:
        pytest.skip("running as root without unshare: no way to make a folder read-only")
    mount = 'mount --bind -o ro "$1" "$1" && shift && exec "$@"'
    return ["unshare", "--mount", "sh", "-c", mount, "sh", str(folder), *command]


@pytest.mark.parametrize("mode, args", [("knn", []), ("pretrain", QUICK)])
def test_read_only_model_dir_is_one_sentence_before_any_work(
        trained_cwd, tmp_path, embedded_data_dir, mode, args):
    cwd = _copy(trained_cwd, tmp_path)
    run = cwd / "runs" / "tiny"
    before = _files(run)
    command = _read_only(run, [*nnclr_command(), mode, *args, "--model_dir=runs/tiny"])
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=_environment(embedded_data_dir))
    message = _error_line(done, mode)
    assert re.search(r"Model dir 'runs/tiny' is not writable \((Read-only file system|"
                     r"Permission denied)\); make it writable", message), message
    assert "Pretraining " not in done.stderr and "Resumed from" not in done.stderr  # before work
    for parent, _, _ in os.walk(run):
        os.chmod(parent, 0o755)
    assert _files(run) == before


@pytest.mark.slow
def test_the_readme_default_job_twice_resumes(tmp_path, embedded_data_dir):
    """README: `nnclr pretrain` (the demo preset, minutes), then the same command again: the second
    run resumes from the first one's last checkpoint and does not train again."""
    first = run_nnclr("pretrain", cwd=tmp_path, data_dir=embedded_data_dir, timeout=1800, check=True)
    assert "trained" in first.stdout and (tmp_path / "runs/demo/saved_model/saved_model.pb").exists()
    checkpoints = tmp_path / "runs" / "demo" / "checkpoints"
    before = _files(checkpoints)
    last = max(int(p.name[len("ckpt-"):-len(".index")]) for p in checkpoints.glob("ckpt-*.index"))
    again = run_nnclr("pretrain", cwd=tmp_path, data_dir=embedded_data_dir, timeout=1800, check=True)
    assert f"Resumed from runs/demo/checkpoints/ckpt-{last} at step {last}." in again.stderr
    assert f"already holds a finished run of {last} steps" in again.stderr
    assert _files(checkpoints) == before
