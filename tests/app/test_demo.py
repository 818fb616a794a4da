"""Tests of building the demo project, on generated data and the tiny encoder."""

from __future__ import annotations

import pytest

from segflu_core import demo
from segflu_core.errors import ProjectError
from segflu_core.project import Project
from tests.synthetic import make_corpus, write_conll


@pytest.fixture
def demo_data(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    corpus = make_corpus(30, seed=5)
    write_conll(folder / "train.conll", corpus[:20])
    write_conll(folder / "dev.conll", corpus[20:25])
    write_conll(folder / "test.conll", corpus[25:])
    return folder


def tiny_config():
    from segflu_core.training import TrainConfig

    return TrainConfig(freeze_encoder=True, head_epochs=2, batch_size=8, device="cpu")


def test_demo_builds_then_reuses(tmp_path, demo_data, tiny_encoder):
    project_dir = tmp_path / "projects" / "demo"
    options = dict(data_dir=demo_data, encoder=str(tiny_encoder), config=tiny_config(), progress=False)

    built = demo.ensure_demo_project(project_dir, **options)

    assert built == project_dir.resolve()
    assert demo.is_trained(built)
    assert demo.is_indexed(built)
    assert len(Project.load(built).sentences("train")) == 20
    manifest = built / "index" / "manifest.json"
    stamp = manifest.stat().st_mtime_ns

    demo.ensure_demo_project(project_dir, **options)

    assert manifest.stat().st_mtime_ns == stamp


def test_demo_rebuilds_index_of_older_format(tmp_path, demo_data, tiny_encoder):
    import json

    project_dir = tmp_path / "demo"
    options = dict(data_dir=demo_data, encoder=str(tiny_encoder), config=tiny_config(), progress=False)
    demo.ensure_demo_project(project_dir, **options)
    manifest_path = project_dir / "index" / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["format_version"] -= 1
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    assert not demo.is_indexed(project_dir)

    demo.ensure_demo_project(project_dir, **options)

    assert demo.is_indexed(project_dir)
    assert len(Project.load(project_dir).explain("test", 0, 0, 1, top_k=2)) > 0


def test_demo_replaces_unfinished_folder(tmp_path, demo_data, tiny_encoder):
    project_dir = tmp_path / "demo"
    project_dir.mkdir()
    (project_dir / "leftover.txt").write_text("interrupted run")

    demo.ensure_demo_project(project_dir, data_dir=demo_data, encoder=str(tiny_encoder), config=tiny_config(), progress=False)

    assert not (project_dir / "leftover.txt").exists()
    assert demo.is_indexed(project_dir)


def test_demo_keeps_folder_with_edits(tmp_path, demo_data):
    project_dir = tmp_path / "demo"
    project_dir.mkdir()
    (project_dir / "edits.sqlite").write_bytes(b"")

    with pytest.raises(ProjectError, match="edits"):
        demo.ensure_demo_project(project_dir, data_dir=demo_data, progress=False)

    assert (project_dir / "edits.sqlite").exists()


def test_demo_reports_missing_data(tmp_path):
    with pytest.raises(ProjectError, match="demo data not found"):
        demo.ensure_demo_project(tmp_path / "demo", data_dir=tmp_path / "nowhere", progress=False)
