"""A clear word for every bad input (issue #10): each mistake a new user makes is a clear error
(exit code 2, the problem named, no traceback) found before any long work, or handled correctly.

The models are the session's tiny digits models (``tests/conftest.py``); "before sampling" is
checked by making the sampler fail the test if it is reached.
"""

import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from movegen.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_sampling(monkeypatch):
    """Fail the test if ``sample`` or ``evaluate`` starts sampling."""
    import movegen.evaluate
    import movegen.sample

    def refuse(*a, **k):
        raise AssertionError("sampling started before the inputs were checked")

    monkeypatch.setattr(movegen.evaluate, "generate_images", refuse)
    monkeypatch.setattr(movegen.sample, "generate_images", refuse)


def _classifier(digits_models) -> str:
    return f"classifier:{digits_models['classifier']}"


def _evaluate_args(model, features, tmp_path, *extra, out=None) -> list[str]:
    return ["evaluate", "--model", str(model), "--features", features, "--num_samples", "20",
            "--cache_dir", str(tmp_path / "cache"), "--out", str(out or tmp_path / "res"), "--device", "cpu",
            *extra]  # fmt: skip


def _exit(capsys, argv) -> tuple[int, str]:
    """Exit code and output of a command that jsonargparse refuses (it exits itself)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    cap = capsys.readouterr()
    return e.value.code, cap.out + cap.err


# --------------------------------------------------------------------------- 1. held-out codes


def test_evaluate_refuses_val_codes_of_another_tokenizer(digits_pipeline, digits_models, tmp_path,
                                                         caplog, monkeypatch):  # fmt: skip
    from movegen.checkpoint import atomic_torch_save, load_tokenizer, tokenizer_checkpoint
    from movegen.tokenizer import VQTokenizer

    tok, ck = load_tokenizer(digits_pipeline["tokenizer"])
    other = VQTokenizer(tok.config)  # same K and grid, other (untrained) weights
    atomic_torch_save(
        tokenizer_checkpoint(other, dataset=ck["dataset"], metrics={}), tmp_path / "t.ckpt"
    )
    assert main(["extract-codes", "--tokenizer", str(tmp_path / "t.ckpt"), "--split", "val",
                 "--views", "1", "--out", str(tmp_path / "other-codes")]) == 0  # fmt: skip
    with monkeypatch.context() as m:
        m.setattr("movegen.evaluate.generate_images", lambda *a, **k: pytest.fail("sampled"))
        rc = main(_evaluate_args(digits_models["standard"], _classifier(digits_models), tmp_path,
                                 "--val_codes", str(tmp_path / "other-codes")))  # fmt: skip
    assert rc == 2
    assert "tokenizer_sha256" in caplog.text and str(tmp_path / "t.ckpt") in caplog.text
    assert str(digits_pipeline["tokenizer"]) in caplog.text  # the model's side is named too
    assert not (tmp_path / "res").exists() and not (tmp_path / "cache").exists()
    # the model's own held-out codes are accepted, and score it
    rc = main(_evaluate_args(digits_models["standard"], _classifier(digits_models), tmp_path,
                             "--val_codes", str(digits_pipeline["val_codes"])))  # fmt: skip
    assert rc == 0
    r = json.loads((tmp_path / "res/standard.json").read_text())
    assert 0 < r["val_bits_per_token"] < 7  # log2(128) = 7 bits: better than uniform


# --------------------------------------------------------------------------- 2. classifier


@pytest.mark.parametrize("dataset,size,why", [("fashion-mnist", 28, "fashion-mnist at 28x28"),
                                              ("digits", 16, "digits at 16x16")])  # fmt: skip
def test_evaluate_refuses_a_classifier_of_other_data_before_sampling(digits_models, tmp_path, caplog,
                                                                     no_sampling, dataset, size, why):  # fmt: skip
    from movegen.checkpoint import atomic_torch_save

    ck = torch.load(digits_models["classifier"], map_location="cpu", weights_only=True)
    atomic_torch_save({**ck, "dataset": dataset, "image_size": size}, tmp_path / "other.ckpt")
    rc = main(
        _evaluate_args(digits_models["standard"], f"classifier:{tmp_path / 'other.ckpt'}", tmp_path)
    )
    assert rc == 2
    assert why in caplog.text and "digits images scored at 8x8" in caplog.text
    assert "fit-classifier --data.name digits" in caplog.text


def test_every_model_is_checked_before_the_first_is_sampled(digits_models, folder_data, tmp_path,
                                                            caplog, no_sampling):  # fmt: skip
    """The second model's data does not match the classifier: nothing is sampled for the first."""
    models = json.dumps([str(digits_models["standard"]), str(folder_data["model"])])
    assert main(_evaluate_args(models, _classifier(digits_models), tmp_path)) == 2
    assert "was trained on digits" in caplog.text and str(folder_data["root"]) in caplog.text


# --------------------------------------------------------------------------- 3 and 5: folders


def _write_digit_pngs(root: Path, split: str, per_class: int) -> None:
    from PIL import Image

    from movegen.data import load_dataset

    ds = load_dataset("digits", split)
    for c in range(10):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        idx = torch.nonzero(ds.labels == c).flatten()[:per_class]
        for i in idx.tolist():
            Image.fromarray(ds.images[i, 0].numpy()).save(root / str(c) / f"{i}.png")


@pytest.fixture(scope="module")
def folder_data(digits_models, tmp_path_factory):
    """The digits as an ImageFolder tree (train/ and val/), with one empty PNG in each, a
    classifier trained on it (through the CLI), and a model checkpoint whose code store says it
    came from this folder (the digits model relabelled: its samples are digits all the same)."""
    from movegen.checkpoint import atomic_torch_save

    d = tmp_path_factory.mktemp("folder")
    root = d / "imgs"
    _write_digit_pngs(root / "train", "train", 8)
    _write_digit_pngs(root / "val", "test", 4)
    (root / "train" / "3" / "empty.png").write_bytes(b"")
    (root / "val" / "0" / "empty.png").write_bytes(b"")
    rc = main(["fit-classifier", "--data.name", f"folder:{root}", "--data.image_size", "8",
               "--data.channels", "1", "--data.batch_size", "16", "--trainer.max_epochs", "1",
               "--trainer.enable_progress_bar", "false", "--out", str(d / "classifier")])  # fmt: skip
    assert rc == 0
    ck = torch.load(digits_models["standard"], map_location="cpu", weights_only=True)
    ck["code_store"] = {**ck["code_store"], "dataset": f"folder:{root}"}
    atomic_torch_save(ck, d / "folder-model" / "model.ckpt")
    return {"root": root, "classifier": d / "classifier/classifier.ckpt",
            "model": d / "folder-model" / "model.ckpt"}  # fmt: skip


def test_reference_cache_follows_the_folder_content(folder_data, tmp_path, caplog):
    root = folder_data["root"]
    args = _evaluate_args(
        folder_data["model"],
        f"classifier:{folder_data['classifier']}",
        tmp_path,
        "--overwrite",
        "true",
    )  # (the same result, scored three times)
    result = tmp_path / "res/folder-model.json"
    assert main(args) == 0
    first = json.loads(result.read_text())
    assert "empty.png" in caplog.text  # the unreadable reference image is named
    assert first["references"]["test"]["size"] == 40 and first["references"]["train"]["size"] == 80
    assert main(args) == 0
    second = json.loads(result.read_text())
    assert [second["references"][s]["cache_hit"] for s in ("test", "train")] == [True, True]
    assert second["fid"] == first["fid"]
    # one held-out image changes (other pixels, a later mtime): its reference is computed afresh
    victim = next((root / "val" / "5").glob("*.png"))
    victim.write_bytes(next((root / "val" / "7").glob("*.png")).read_bytes())
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert main(args) == 0
    third = json.loads(result.read_text())
    assert third["references"]["test"]["cache_hit"] is False
    assert third["references"]["train"]["cache_hit"] is True  # the train tree did not change
    assert (
        third["references"]["test"]["key"]["content"]
        != first["references"]["test"]["key"]["content"]
    )


def test_training_verbs_skip_and_name_an_empty_png(folder_data, tmp_path, caplog):
    """fit-tokenizer on a folder with an empty PNG trains (the classifier of ``folder_data``
    did too), and the warning names the file and the count."""
    root = folder_data["root"]
    rc = main(["fit-tokenizer", "--config", str(ROOT / "tokenizers/digits/config.yaml"),
               "--data.name", f"folder:{root}", "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1",
               "--trainer.enable_progress_bar", "false", "--out", str(tmp_path / "tok")])  # fmt: skip
    assert rc == 0 and (tmp_path / "tok/tokenizer.ckpt").is_file()
    assert "1 of 81 images of the train split" in caplog.text
    assert str(root / "train" / "3" / "empty.png") in caplog.text
    assert "TypeError" not in caplog.text


@pytest.mark.parametrize("verb", ["fit-classifier", "extract-codes", "fit-tokenizer"])
def test_a_folder_of_only_unreadable_images_is_a_clear_error(
    digits_pipeline, tmp_path, caplog, verb
):
    for c in ("0", "1"):
        (tmp_path / "bad" / c).mkdir(parents=True)
        (tmp_path / "bad" / c / "x.png").write_bytes(b"")
        (tmp_path / "bad" / c / "y.png").write_bytes(b"\x89PNG but not really")
    name = f"folder:{tmp_path / 'bad'}"
    argv = {
        "fit-classifier": ["fit-classifier", "--data.name", name, "--data.image_size", "8"],
        "extract-codes": ["extract-codes", "--tokenizer", str(digits_pipeline["tokenizer"]),
                          "--data.name", name],
        "fit-tokenizer": ["fit-tokenizer", "--config", str(ROOT / "tokenizers/digits/config.yaml"),
                          "--data.name", name],
    }[verb]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert "no readable image" in caplog.text and "x.png" in caplog.text


# --------------------------------------------------------------------------- 4. read-only --out


def _can_write(folder: Path) -> bool:
    try:
        fd, p = tempfile.mkstemp(dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.remove(p)
    return True


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody can create files in: mode 0555, and immutable when we are root (root
    ignores the mode bits)."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    immutable = False
    if _can_write(d):
        immutable = subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode == 0
    if _can_write(d):
        d.chmod(0o755)
        pytest.skip("cannot make a read-only folder here")
    yield d
    if immutable:
        subprocess.run(["chattr", "-i", str(d)], check=True)
    d.chmod(0o755)


def test_a_read_only_out_is_refused_before_any_work(digits_pipeline, digits_models, read_only_dir,
                                                    tmp_path, caplog, no_sampling):  # fmt: skip
    model = str(digits_models["standard"])
    cases = [
        ["sample", "--model", model, "--out", str(read_only_dir / "grid.png")],
        ["sample", "--model", model, "--out", str(tmp_path / "g.png"), "--out_dir", str(read_only_dir / "one")],
        _evaluate_args(model, _classifier(digits_models), tmp_path, out=read_only_dir / "res"),
        ["extract-codes", "--tokenizer", str(digits_pipeline["tokenizer"]), "--out", str(read_only_dir / "c")],
    ]  # fmt: skip
    for argv in cases:
        caplog.clear()
        assert main(argv) == 2, argv
        assert "not writable" in caplog.text and str(read_only_dir) in caplog.text, argv
        assert "Traceback" not in caplog.text
    assert not (tmp_path / "cache").exists()  # evaluate stopped before the references


def test_ensure_writable_walks_up_to_an_existing_folder(tmp_path):
    from movegen.checkpoint import ensure_writable

    ensure_writable(tmp_path / "new" / "deeper", "--out")  # creatable: fine, and nothing created
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        ensure_writable(tmp_path / "file" / "sub", "--out")


def test_extract_codes_refuses_an_existing_store_before_encoding(digits_pipeline, caplog):
    rc = main(["extract-codes", "--tokenizer", str(digits_pipeline["tokenizer"]),
               "--out", str(digits_pipeline["codes"])])  # fmt: skip
    assert rc == 2 and "--overwrite" in caplog.text


# --------------------------------------------------------------------------- 6. sampling flags


@pytest.mark.parametrize(
    "verb,flags,message",
    [
        ("sample", ["--per_class", "0"], "per_class and batch_size must be >= 1"),
        ("sample", ["--batch_size", "0"], "per_class and batch_size must be >= 1"),
        ("evaluate", ["--num_samples", "0"], "num_samples must be >= 2"),
        ("evaluate", ["--batch_size", "0"], "batch_size >= 1"),
        ("sample", ["--sampling.cfg_scale", ".nan"], "cfg_scale must be a finite number"),
        ("sample", ["--sampling.cfg_scale", ".inf"], "cfg_scale must be a finite number"),
        ("sample", ["--sampling.cfg_interval", "[5, 2]"], "0 <= a <= b"),
        ("sample", ["--sampling.temperature", "-1"], "temperature must be >= 0"),
        ("sample", ["--classes", "0,,3"], "comma-separated ints, got '0,,3'"),
        ("sample", ["--classes", "0,12"], "out of range"),
        ("evaluate", ["--ref_splits", "[test, test]"], "distinct splits"),
    ],
)
def test_bad_sampling_and_size_flags_are_clear_errors(digits_models, tmp_path, caplog, no_sampling,
                                                      verb, flags, message):  # fmt: skip
    model = str(digits_models["standard"])
    if verb == "sample":
        argv = ["sample", "--model", model, "--out", str(tmp_path / "g.png"), *flags]
    else:
        argv = [*_evaluate_args(model, _classifier(digits_models), tmp_path), *flags]
    assert main(argv) == 2
    assert message in caplog.text
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "res").exists()


@pytest.mark.parametrize(
    "flags,key",
    [
        (["--sampling.cfg_scale", "nan"], "sampling.cfg_scale"),  # YAML reads nan as a word
        (["--ref_splits", "[test, tset]"], "ref_splits"),
    ],
)
def test_flags_the_parser_refuses_exit_2_naming_the_flag(
    digits_models, tmp_path, capsys, flags, key
):
    model = str(digits_models["standard"])
    verb = ["sample", "--model", model, "--out", str(tmp_path / "g.png")]
    if key == "ref_splits":
        verb = _evaluate_args(model, _classifier(digits_models), tmp_path)
    code, out = _exit(capsys, [*verb, *flags])
    assert code == 2 and key in out


# --------------------------------------------------------------------------- 7 and 8: configs


def test_info_names_the_file_and_line_of_a_yaml_error(tmp_path, caplog):
    bad = tmp_path / "broken.yaml"
    bad.write_text("model:\n  config:\n    n_layer: 2\n   n_head: [1, 2\n")
    assert main(["info", "--config", str(bad)]) == 2
    assert f"{bad}, line 4, column 4: not valid YAML" in caplog.text
    assert "<unicode string>" not in caplog.text


def test_an_optimizer_switch_is_refused(capsys):
    """The optimiser is the model's own (its groups keep the bank out of weight decay)."""
    code, out = _exit(capsys, ["fit", "--config", str(ROOT / "configs/digits/standard.yaml"),
                               "--optimizer", "SGD", "--out", "/nonexistent"])  # fmt: skip
    assert code == 2 and "--optimizer" in out


# --------------------------------------------------------------------------- the protocol (#11)


def test_a_copying_model_is_flagged_through_evaluate(digits_models, tmp_path, monkeypatch):
    """``evaluate`` of a "model" whose samples are training images: its memorisation block flags
    copying, and its FID is lower against the training split than against the held-out one;
    samples that are unseen real images are not flagged."""
    import movegen.evaluate
    from movegen.data import load_dataset

    def sampler_of(split):
        ds = load_dataset("digits", split)

        def generate(model, decode, labels, settings, **kw):
            return torch.stack([ds[i][0] for i in range(len(labels))]), None

        return generate

    scores = {}
    for split in ("train", "val"):
        monkeypatch.setattr(movegen.evaluate, "generate_images", sampler_of(split))
        out = tmp_path / split
        argv = _evaluate_args(digits_models["standard"], _classifier(digits_models), tmp_path,
                              "--num_samples", "150", out=out)  # fmt: skip
        assert main(argv) == 0
        scores[split] = json.loads((out / "standard.json").read_text())
    copier, fresh = scores["train"]["memorisation"], scores["val"]["memorisation"]
    assert copier["memorisation"] < 0.05 and copier["copy_fraction"] > 0.9, copier
    assert fresh["memorisation"] > 0.6 and fresh["copy_fraction"] < 0.2, fresh
    copier, fresh = scores["train"], scores["val"]
    assert copier["fid_train"] < copier["fid"]  # the copier looks best against what it copied
    assert np.isfinite([copier["precision"], copier["recall"], fresh["precision"]]).all()


def test_evaluate_refuses_to_replace_a_result_without_overwrite(digits_models, tmp_path, caplog):
    args = _evaluate_args(
        digits_models["standard"], _classifier(digits_models), tmp_path, "--ref_splits", "[test]"
    )
    assert main(args) == 0
    result = tmp_path / "res" / "standard.json"
    first = result.read_text()
    (tmp_path / "res" / "other.json").write_text("{}")  # another run's result
    assert main(args + ["--seed", "1"]) == 2
    assert "already holds results of standard.json" in caplog.text and result.read_text() == first
    assert main(args + ["--seed", "1", "--overwrite", "true"]) == 0
    assert json.loads(result.read_text())["seed"] == 1
    assert (tmp_path / "res" / "other.json").read_text() == "{}"  # never touched


def test_ten_crop_extraction_of_a_folder_with_workers(folder_data, digits_pipeline, tmp_path):
    from movegen.data import CodeStore

    out = tmp_path / "c"
    rc = main(["extract-codes", "--tokenizer", str(digits_pipeline["tokenizer"]), "--data.name",
               f"folder:{folder_data['root']}", "--ten_crop", "true", "--num_workers", "2", "--device", "cpu",
               "--out", str(out)])  # fmt: skip
    assert rc == 0
    s = CodeStore(out)
    assert s.views == 10 and all(v["size"] == 8 for v in s.view_list)  # the tokenizer's size
    assert s.header["skipped_unreadable"] == 1  # the empty PNG, counted through the workers
