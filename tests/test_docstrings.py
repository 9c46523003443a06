"""Every code example in the package's docstrings runs, in a fresh interpreter.

An example is an indented block after a blank line in a module, class or function docstring (or
`>>>` lines). Each runs in the namespace of its module, as doctest does, after the names its
sketch leaves to the reader (`SETUP`). One fresh interpreter per module, so import-order effects
show. Examples that need the reader's own files or run a whole protocol are listed in `NOT_RUN`
with the reason; shell examples (`nnclr ...`) are the CLI tests' business. A new example must
land in one of these, which `test_every_example_is_run_or_has_a_reason` checks.
"""

import ast
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "nnclr_tf"

_TINY_ENCODER = """
import keras, numpy as np
def tiny_encoder(shape=(32, 32, 3)):
    images = keras.Input(shape)
    x = keras.layers.Conv2D(8, 3, strides=2)(images)
    return keras.Model(images, keras.layers.GlobalAveragePooling2D()(x))
"""

# Names each module's examples take from the reader, keyed by module.
SETUP = {
    "nnclr_tf.backbones": """
import numpy as np
from nnclr_tf.heads import ProjectionHead
images = np.random.rand(2, 32, 32, 3).astype("float32")
projection_head = ProjectionHead()
""",
    "nnclr_tf.batch_norm": "import numpy as np\nx = np.random.rand(4, 8).astype('float32')\n",
    "nnclr_tf.data.subsets": "import numpy as np\nlabels = np.repeat(np.arange(10), 300)\n",
    "nnclr_tf.evaluation.significance": (
        "import numpy as np\nlabels = np.arange(40) % 4\n"
        "predictions_a, predictions_b = labels.copy(), (labels + (np.arange(40) % 3 == 0)) % 4\n"),
    "nnclr_tf.preprocessing": "import numpy as np\nimages_float01 = np.random.rand(2, 375, 500, 3)\n",
    "nnclr_tf.similarity": """
import numpy as np
anchors, predictions = np.random.rand(4, 8).astype("float32"), np.random.rand(6, 8).astype("float32")
""",
    "nnclr_tf.evaluation.features": _TINY_ENCODER + """
x_test = np.random.rand(20, 32, 32, 3).astype("float32")
y_test = np.arange(20) % 4
dataset = __import__("tensorflow").data.Dataset.from_tensor_slices((x_test, y_test)).batch(8)
encoder, num_classes = tiny_encoder(), 4
from nnclr_tf.evaluation.knn import knn_accuracy
bank_features, bank_labels = extract_features(encoder, (x_test, y_test))
""",
    "nnclr_tf.export": _TINY_ENCODER + """
from nnclr_tf.model import NNCLR
model = NNCLR(tiny_encoder(), projection_hidden_dims=(16,), projection_dim=8,
              prediction_hidden_dims=(16,), queue_size=16)
images_uint8 = np.random.randint(0, 256, (2, 40, 40, 3), np.uint8)
""",
    "nnclr_tf.pictures": _TINY_ENCODER + """
import os
os.makedirs("runs/x")
with open("runs/x/log.csv", "w") as log:
    log.write("epoch,loss,nn_acc\\n0,5.0,0.1\\n1,4.0,0.3\\n")
model = type("Model", (), {"encoder": tiny_encoder()})()
queries, support = np.random.rand(3, 32, 32, 3), np.random.rand(12, 32, 32, 3)
q_labels, s_labels = np.arange(3), np.arange(12) % 3
""",
}

NOT_RUN = {
    "nnclr_tf.callbacks": "a sketch of a training loop's body: model, run_dir and step are the "
                          "loop's; tests/test_lifecycle.py runs it for real",
    "nnclr_tf.collection": "embeds the reader's photos (~/photos) with a trained run (runs/demo)",
    "nnclr_tf.duplicates": "reads photos.emb, written by collection.embed from the reader's photos",
    "nnclr_tf.search": "reads photos.emb and query.jpg, the reader's files",
    "nnclr_tf.projection": "reads photos.emb, written by collection.embed from the reader's photos",
    "nnclr_tf.collection_sources": "lists the reader's photos (~/photos)",
    "nnclr_tf.export_formats": "converts the SavedModel of a trained run (runs/demo)",
    "nnclr_tf.data.folders": "scans /data/flowers, the reader's image folder; "
                             "tests/test_data_folder.py covers scan_folder and folder_dataset",
    "nnclr_tf.data.tfds_builder": "data_dir=... stands for the reader's TFDS folder; the "
                                  "embedded_data_dir fixture prepares the builder",
    "nnclr_tf.data.pipeline": "trains a whole epoch (39 steps of 256 views) of a model it leaves "
                              "to the reader",
    "nnclr_tf.evaluation": "runs the four protocols at full length (90 and 30 epochs, the transfer "
                           "datasets); tests/test_eval_modes.py runs each small",
    "nnclr_tf.evaluation.knn": "its last line elides the training data (model.fit(..., ...))",
    "nnclr_tf.report": "scores a trained encoder with a preset's whole protocol; the pretrain "
                       "tests write the report",
    "nnclr_tf.train": "pretrains the demo preset for minutes; tests/test_train.py runs the tiny one",
}

# Examples that read the shipped dataset: they get a prepared TFDS data_dir.
NEEDS_DATA = ("nnclr_tf", "nnclr_tf.data")


def _module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _docstrings(tree):
    """(qualified name, docstring, its indentation) of the module and every class and function."""
    found = [("", tree)]
    for parent in ast.walk(tree):
        prefix = getattr(parent, "qualname", "")
        for child in ast.iter_child_nodes(parent):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                child.qualname = f"{prefix}.{child.name}".lstrip(".")
                found.append((child.qualname, child))
    for name, node in found:
        body = getattr(node, "body", [])
        if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            yield name, body[0].value.value, body[0].col_offset


def examples(source):
    """[(qualified name, code)] of the docstring examples in `source`."""
    found = []
    for name, text, indent in _docstrings(ast.parse(source)):
        lines = [line[indent:] if not line[:indent].strip() else line
                 for line in text.splitlines()]
        prompts = [line.strip()[4:] for line in lines if line.strip().startswith((">>> ", "... "))]
        if prompts:
            found.append((name, "\n".join(prompts)))
        i = 1
        while i < len(lines):
            if lines[i].startswith("    ") and not lines[i - 1].strip():
                j = i
                while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                    j += 1
                found.append((name, textwrap.dedent("\n".join(lines[i:j])).strip("\n")))
                i = j
            else:
                i += 1
    return found


def _is_python(code):
    try:
        compile(code, "<example>", "exec")
    except SyntaxError:
        return False
    return True


def all_examples():
    """{module: [(qualified name, code)]} of the Python examples; asserts the rest are shell."""
    by_module = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for name, code in examples(path.read_text(encoding="utf-8")):
            if _is_python(code):
                by_module.setdefault(_module_name(path), []).append((name, code))
            else:
                assert code.startswith("nnclr "), f"{path} {name}: neither Python nor a command"
    return by_module


EXAMPLES = all_examples()
RUN = sorted(set(EXAMPLES) - set(NOT_RUN))

_RUNNER = """
import importlib, json, sys, traceback
module, setup, blocks = json.loads(sys.argv[1])
failures = []
for name, code in blocks:
    namespace = dict(vars(importlib.import_module(module)))
    try:
        exec(compile(setup, "<setup>", "exec"), namespace)
        exec(compile(code, f"<{module} {name}>", "exec"), namespace)
    except Exception:
        failures.append(f"{module} {name or '(module)'}:\\n{code}\\n{traceback.format_exc()}")
print("\\n\\n".join(failures))
sys.exit(1 if failures else 0)
"""


def test_every_example_is_run_or_has_a_reason():
    assert EXAMPLES["nnclr_tf.support_set"], "the collector finds no example"
    stale = sorted(set(NOT_RUN) - set(EXAMPLES))
    assert not stale, f"NOT_RUN names modules without examples: {stale}"
    assert not sorted(set(SETUP) - set(RUN)), "SETUP for a module whose examples do not run"


@pytest.mark.parametrize("module", RUN)
def test_docstring_examples_run(module, tmp_path, request):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if module in NEEDS_DATA:
        env["TFDS_DATA_DIR"] = request.getfixturevalue("embedded_data_dir")
    argument = json.dumps([module, SETUP.get(module, ""), EXAMPLES[module]])
    done = subprocess.run([sys.executable, "-c", _RUNNER, argument], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
