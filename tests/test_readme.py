"""README promises: the notebook example runs as written, and CI runs the README's test command."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as handle:
        return handle.read()


def test_notebook_example_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", read("README.md"), flags=re.S)
    assert blocks, "README.md has no python example"
    script = blocks[0] + (
        "\nassert outputs['embeddings'].shape == (8, 64)\n"
        "import numpy as np\n"
        "np.testing.assert_allclose(np.linalg.norm(outputs['embeddings'], axis=1), 1, atol=1e-4)\n"
        "assert len(history.history['loss']) == 2\n")
    env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds"), TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "encoder_savedmodel" / "saved_model.pb").is_file()


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one():
    commands = re.findall(r"```sh\n(.*?)\n```", read("README.md"), flags=re.S)
    install_and_run, install_and_test = commands[0], commands[1]
    assert install_and_run.endswith("nnclr pretrain")
    test_command = install_and_test.split(" && ")[-1]
    assert test_command.startswith("python -m pytest")
    assert test_command in read(".ci/run").splitlines()
