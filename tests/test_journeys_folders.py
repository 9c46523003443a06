"""User journeys with a folder of images as the dataset: a labelled folder without test/ (its held-out
split, every evaluation mode), a flat unlabelled folder, a one-class folder and a folder without
images.

Each runs the installed `nnclr` from a temporary working directory with relative paths, as a user
types it, and checks the outcome and the message. The images are synthetic and easy: class c is
mostly colour channel c, in mixed sizes, half JPEG and half PNG.
"""

import json

import numpy as np
from conftest import run_nnclr
from PIL import Image

TINY = ("--preset=tiny",)


def _image_folder(root, classes, per_class, flat=False):
    """Writes `per_class` images of each class into root/<class>/ (flat: into root itself)."""
    rng = np.random.default_rng(0)
    for index, name in enumerate(classes):
        folder = root if flat else root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            height, width = rng.integers(20, 48, 2)
            pixels = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
            pixels[..., index % 3] += 180
            extension, kind = ("png", "PNG") if i % 2 else ("jpg", "JPEG")
            Image.fromarray(pixels).save(folder / f"{name}_{i:02d}.{extension}", kind)


def _output(done):
    return done.stdout + done.stderr


def test_a_folder_of_class_folders_pretrains_and_evaluates_on_its_held_out_split(tmp_path):
    _image_folder(tmp_path / "myimages", ["red", "green"], 30)
    (tmp_path / "myimages" / "red" / "notes.txt").write_text("not an image")
    jpeg = (tmp_path / "myimages" / "green" / "green_00.jpg").read_bytes()
    (tmp_path / "myimages" / "green" / "cut.jpg").write_bytes(jpeg[:len(jpeg) // 2])

    # A split the folder does not have fails before any training, in CLI spelling.
    bad = run_nnclr("pretrain", "--dataset=myimages", *TINY, "--model_dir=runs/bad",
                    "--set", "data.eval_split=valid", cwd=tmp_path, timeout=300)
    assert bad.returncode == 2, _output(bad)
    # The folder is recorded (and named in messages) by its absolute path.
    folder = tmp_path / "myimages"
    assert f"nnclr pretrain: error: Image folder '{folder}' has no split 'valid'" in bad.stderr
    assert "--set data.eval_split=test" in bad.stderr
    assert not list((tmp_path / "runs").glob("bad/**/ckpt-*")), "trained before checking"

    pretrain = run_nnclr("pretrain", "--dataset=myimages", *TINY, "--model_dir=runs/f",
                         cwd=tmp_path, timeout=600)
    assert pretrain.returncode == 0, _output(pretrain)[-3000:]
    held_out = (f"Image folder '{folder}' has no test/ sub-folder, so 6 of its 60 images (10 % of "
                "each class, chosen by file name; --set data.holdout_fraction=...) are held out "
                "as its 'test' split and the other 54 are 'train'.")
    assert held_out in pretrain.stdout
    report = json.loads((tmp_path / "runs/f/report.json").read_text())
    assert report["data"] == held_out and report["trained"]["knn_top1"] > 0.8
    # The report, the pretraining and the check read the folder several times: one warning.
    assert _output(pretrain).count("Skipped 2 of 62 files") == 1

    # From another working directory: the run finds its folder.
    (tmp_path / "elsewhere").mkdir()
    knn = run_nnclr("knn", "--model_dir=../runs/f", cwd=tmp_path / "elsewhere", timeout=300)
    assert knn.returncode == 0, _output(knn)[-3000:]
    assert json.loads((tmp_path / "runs/f/knn.json").read_text())["top1"] > 0.8  # chance: 0.5

    linear = run_nnclr("linear_eval", "--model_dir=runs/f", "--set", "eval.linear_epochs=30",
                       cwd=tmp_path, timeout=300)
    assert linear.returncode == 0, _output(linear)[-3000:]
    assert json.loads((tmp_path / "runs/f/linear_eval.json").read_text())["top1"] > 0.8

    # 1 % of 54 images is not one image per class: one of each, and the user is told.
    finetune = run_nnclr("finetune", "--model_dir=runs/f", cwd=tmp_path, timeout=300)
    assert finetune.returncode == 0, _output(finetune)[-3000:]
    assert ("eval.label_fraction=0.01 of 54 labelled images selects 1, fewer than one per class: "
            "using one image of each of the 2 classes instead") in finetune.stderr
    assert (tmp_path / "runs/f/finetune.json").exists()


def test_a_flat_folder_pretrains_unlabelled_and_the_report_says_why_it_has_no_scores(tmp_path):
    _image_folder(tmp_path / "photos", ["a", "b"], 12, flat=True)
    pretrain = run_nnclr("pretrain", "--dataset=photos", *TINY, "--model_dir=runs/p",
                         cwd=tmp_path, timeout=600)
    assert pretrain.returncode == 0, _output(pretrain)[-3000:]
    assert (f"Image folder '{tmp_path / 'photos'}' has no class sub-folders: its 24 images are unlabelled, so "
            "there are no kNN or linear-probe scores.") in pretrain.stdout
    assert "kNN top-1" not in pretrain.stdout
    knn = run_nnclr("knn", "--model_dir=runs/p", cwd=tmp_path, timeout=300)
    assert knn.returncode == 2, _output(knn)[-3000:]
    assert f"nnclr knn: error: Image folder '{tmp_path / 'photos'}' has no class sub-folders" in knn.stderr


def test_one_class_warns_once_and_a_folder_without_images_says_what_it_needs(tmp_path):
    _image_folder(tmp_path / "cats", ["tabby"], 20)
    single = run_nnclr("pretrain", "--dataset=cats", *TINY, "--model_dir=runs/c",
                       "--set=run.report=false", cwd=tmp_path, timeout=600)
    assert single.returncode == 0, _output(single)[-3000:]
    assert _output(single).count("has one class only ('tabby'): kNN and linear-probe scores on "
                                 "it are meaningless") == 1

    (tmp_path / "empty" / "tabby").mkdir(parents=True)
    (tmp_path / "empty" / "tabby" / "readme.md").write_text("images go here")
    empty = run_nnclr("pretrain", "--dataset=empty", *TINY, "--model_dir=runs/e",
                      cwd=tmp_path, timeout=300)
    assert empty.returncode == 2, _output(empty)[-3000:]
    assert "has no readable images (only 1 other files, listed above); it needs .jpg" in empty.stderr
    assert "batch_size" not in empty.stderr
