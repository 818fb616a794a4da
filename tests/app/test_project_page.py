"""AppTest runs of creating a project from uploaded files on the Project page."""

from __future__ import annotations

import json
from pathlib import Path

from streamlit.testing.v1 import AppTest

from tests.synthetic import make_corpus, write_conll

APP = Path(__file__).resolve().parents[2] / "app.py"


def conll_bytes(tmp_path: Path, name: str, sentences) -> bytes:
    return write_conll(tmp_path / name, sentences).read_bytes()


def fill_form(at: AppTest, base: Path, name: str, files: dict[str, bytes], encoder: Path) -> None:
    at.text_input(key="project_new_base").input(str(base))
    at.text_input(key="project_new_name").input(name)
    for split, data in files.items():
        at.file_uploader(key=f"project_upload_{split}").set_value((f"{split}.conll", data, "text/plain"))
    at.text_input(key="project_encoder").input(str(encoder))
    at.run()


def test_create_project_trains_and_indexes(tmp_path, tiny_encoder):
    corpus = make_corpus(30, seed=7)
    files = {
        "train": conll_bytes(tmp_path, "a.conll", corpus[:20]),
        "dev": conll_bytes(tmp_path, "b.conll", corpus[20:25]),
        "test": conll_bytes(tmp_path, "c.conll", corpus[25:]),
    }
    base = tmp_path / "projects"
    base.mkdir()
    at = AppTest.from_file(str(APP), default_timeout=180).run()

    fill_form(at, base, "uploaded", files, tiny_encoder)
    at.button(key="project_create").click().run()

    assert not at.exception
    assert [element.value for element in at.error] == []
    project_dir = base / "uploaded"
    assert at.session_state["project_path"] == str(project_dir.resolve())
    assert (project_dir / "index" / "manifest.json").is_file()
    config = json.loads((project_dir / "project.json").read_text())
    assert set(config["data"]) == {"train", "dev", "test"}
    assert (project_dir / config["data"]["train"]["path"]).read_bytes() == files["train"]
    assert len(at.dataframe) == 2


def test_status_handler_advances_per_epoch():
    import logging

    from pages.project import TRAINING_SHARE, StatusLogHandler

    class Recorder:
        def __init__(self):
            self.calls = []

        def write(self, message):
            self.calls.append(message)

        def progress(self, value, text):
            self.calls.append((value, text))

    status, progress = Recorder(), Recorder()
    handler = StatusLogHandler(status, progress)
    logger = logging.getLogger("segflu_core.training")
    logger.addHandler(handler)
    try:
        logger.warning("epoch 1/4: loss 2.0")
        logger.warning("kept the epoch with dev F1 0.5")
    finally:
        logger.removeHandler(handler)

    assert status.calls == ["epoch 1/4: loss 2.0", "kept the epoch with dev F1 0.5"]
    assert len(progress.calls) == 1
    assert progress.calls[0][0] == TRAINING_SHARE / 4


def test_create_project_reports_bad_lines(tmp_path, tiny_encoder):
    corpus = make_corpus(6, seed=8)
    good = conll_bytes(tmp_path, "good.conll", corpus)
    lines = good.decode().split("\n")
    lines[2] = lines[2].split("\t")[0] + "\tX-PER"
    bad = "\n".join(lines).encode()
    base = tmp_path / "projects"
    base.mkdir()
    at = AppTest.from_file(str(APP), default_timeout=60).run()

    fill_form(at, base, "broken", {"train": bad, "dev": good, "test": good}, tiny_encoder)
    at.button(key="project_create").click().run()

    assert not at.exception
    messages = [element.value for element in at.error]
    assert len(messages) == 1
    assert "train.conll:3:" in messages[0]
    assert not (base / "broken" / "project.json").exists()


def test_create_project_rejects_escaping_name(tmp_path, tiny_encoder):
    corpus = make_corpus(3, seed=9)
    data = conll_bytes(tmp_path, "any.conll", corpus)
    base = tmp_path / "projects"
    base.mkdir()
    at = AppTest.from_file(str(APP), default_timeout=60).run()

    fill_form(at, base, "../escaped", {"train": data, "dev": data, "test": data}, tiny_encoder)
    at.button(key="project_create").click().run()

    assert not at.exception
    assert any("outside the folder" in element.value for element in at.error)
    assert not (tmp_path / "escaped").exists()
