"""AppTest runs of every page against a tiny trained project."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest
from streamlit.testing.v1 import AppTest

import pages
from pages import safe_child
from pages.explain import METHODS
from segflu_core.edits import EditStore
from segflu_core.errors import UnsafePathError
from segflu_core.project import Project
from tests.app.conftest import HOSTILE_TOKENS, clean_train_file

APP = Path(__file__).resolve().parents[2] / "app.py"
TIMEOUT_S = 120


def open_app(project_dir: Path | None, page: str | None = None) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT_S)
    if project_dir is not None:
        at.session_state["project_path"] = str(project_dir)
    at.run()
    if page is not None:
        at.switch_page(page).run()
    return at


def markdown_text(at: AppTest) -> str:
    return "\n".join(element.value for element in at.markdown)


def explain_at(at: AppTest, target: dict) -> AppTest:
    at.session_state["explain_target"] = target
    at.switch_page("pages/explain.py").run()
    return at


def first_error(project_dir: Path, split: str = "dev") -> dict:
    errors = Project.load(project_dir).errors(split)
    assert not errors.empty, "the tiny project must make errors for these tests"
    row = errors.iloc[0]
    labels = "gold" if row["kind"] == "missed" else "predicted"
    return {"split": split, "sentence": int(row["sentence"]), "start": int(row["start"]), "end": int(row["end"]), "labels": labels}


def test_project_page_shows_metrics(tiny_project):
    at = open_app(tiny_project)

    assert not at.exception
    metrics = json.loads((tiny_project / "metrics.json").read_text())
    tables = [element.value for element in at.dataframe]
    assert len(tables) == 2
    for split, table in zip(("dev", "test"), tables):
        expected_types = list(metrics[split]["per_type"])
        assert list(table["type"])[: len(expected_types)] == expected_types
        for name in expected_types:
            row = table[table["type"] == name].iloc[0]
            assert row["f1"] == pytest.approx(metrics[split]["per_type"][name]["f1"])


def test_pages_without_project_ask_for_one():
    for page in ("pages/errors.py", "pages/explain.py", "pages/noise.py", "pages/validate.py", "pages/review.py"):
        at = open_app(None, page)

        assert not at.exception, page
        assert any("No project is open" in element.value for element in at.info), page


def test_errors_page_lists_project_errors(tiny_project):
    at = open_app(tiny_project, "pages/errors.py")

    assert not at.exception
    shown = at.dataframe[0].value
    expected = Project.load(tiny_project).errors("dev")
    assert len(shown) == len(expected)
    assert list(zip(shown["sentence"], shown["start"], shown["end"], shown["kind"])) == list(
        zip(expected["sentence"], expected["start"], expected["end"], expected["kind"])
    )


def test_errors_filter_by_kind(tiny_project):
    at = open_app(tiny_project, "pages/errors.py")
    kinds = sorted(at.dataframe[0].value["kind"].unique())

    at.multiselect(key="errors_kinds").set_value([kinds[0]]).run()

    shown = at.dataframe[0].value
    assert len(shown) > 0
    assert set(shown["kind"]) == {kinds[0]}


def send_option_text(at: AppTest, key: str, text: str) -> None:
    """Make the selectbox ``key`` send ``text`` on the next run, as a browser does with an option text it still shows."""
    selectbox = at.selectbox(key=key)
    selectbox.options.append(text)
    selectbox.set_value(text)


def test_errors_choice_survives_split_change(tiny_project):
    at = open_app(tiny_project, "pages/errors.py")
    dev_text = at.selectbox(key="errors_choice").options[0]
    at.radio(key="errors_split").set_value("test").run()
    # The browser keeps sending the dev option text after the options changed.
    send_option_text(at, "errors_choice", dev_text)

    at.text_input(key="errors_text").input("Lisbon").run()

    assert not at.exception
    table = at.dataframe[0].value
    first = table.iloc[0]
    assert set(table["text"]) == {"Lisbon"}
    assert at.selectbox(key="errors_choice").value == ("test", int(table.index[0]))
    assert at.selectbox(key="errors_choice").proto.raw_value.startswith(f"sentence {first['sentence']}, tokens {first['start']}-{first['end']}:")


def test_errors_choice_follows_filter(tiny_project):
    at = open_app(tiny_project, "pages/errors.py")
    at.radio(key="errors_split").set_value("test").run()
    errors = Project.load(tiny_project).errors("test").reset_index(drop=True)
    lisbon = errors.index[errors["text"] == "Lisbon"]
    madrid = errors.index[errors["text"] == "Madrid"]
    assert len(lisbon) > 1, "the tiny project must miss Lisbon at least twice on test"
    assert len(madrid) > 0, "the tiny project must miss Madrid on test"

    at.selectbox(key="errors_choice").set_value(("test", int(lisbon[1]))).run()
    at.text_input(key="errors_text").input("lisbon").run()

    assert not at.exception
    assert at.selectbox(key="errors_choice").value == ("test", int(lisbon[1]))

    at.text_input(key="errors_text").input("").run()
    at.selectbox(key="errors_choice").set_value(("test", int(madrid[0]))).run()
    at.text_input(key="errors_text").input("lisbon").run()

    assert not at.exception
    assert at.selectbox(key="errors_choice").value == ("test", int(lisbon[0]))


def test_errors_filter_without_match(tiny_project):
    at = open_app(tiny_project, "pages/errors.py")
    at.radio(key="errors_split").set_value("test").run()

    at.text_input(key="errors_text").input("@").run()

    assert not at.exception
    assert any("No mispredicted entity matches" in element.value for element in at.info)
    assert len(at.selectbox) == 0


def test_errors_button_opens_explain(tiny_project):
    at = open_app(tiny_project, "pages/errors.py")

    at.button(key="errors_explain").click().run()

    assert not at.exception
    assert [element.value for element in at.title] == ["Explain"]
    assert at.session_state["explain_target"] == first_error(tiny_project)


def test_explain_lists_explained_items(tiny_project):
    target = first_error(tiny_project)
    at = explain_at(open_app(tiny_project), target)

    assert not at.exception
    expected = Project.load(tiny_project).explain(
        target["split"], target["sentence"], target["start"], target["end"], labels=target["labels"], top_k=20
    )
    items = [element.value for element in at.markdown if "segflu-item" in element.value]
    # Each item appears once in its list and again when it belongs to a disagreeing pair.
    assert len(items) >= len(expected)
    for role in ("supporting", "opposing"):
        assert any(header.value.startswith(role.capitalize()) for header in at.subheader)
        count = int((expected["role"] == role).sum())
        assert any(header.value == f"{role.capitalize()} ({count})" for header in at.subheader)
    for _index, row in expected.iterrows():
        caption = f"train sentence {row['sentence']}, doc {row['doc']}, tokens [{row['start']}, {row['end']})"
        assert any(caption in item for item in items), caption


def test_explain_nearest_neighbours(tiny_project):
    target = first_error(tiny_project)
    at = explain_at(open_app(tiny_project), target)

    at.selectbox(key="explain_method").set_value("nn-cosine").run()

    assert not at.exception
    expected = Project.load(tiny_project).explain(
        target["split"], target["sentence"], target["start"], target["end"], labels=target["labels"], method="nn-cosine"
    )
    items = [element.value for element in at.markdown if "segflu-item" in element.value]
    assert len(items) == len(expected)
    assert any(header.value == "Nearest training items" for header in at.subheader)


def test_explain_span_resets_per_sentence(tiny_project):
    project = Project.load(tiny_project)
    number = 3
    entities = pages.spans_of(list(project.sentence("dev", number).tags)) + pages.spans_of(project.predicted_tags("dev")[number])
    assert entities, f"dev sentence {number} of the tiny project must have an entity"
    first_entity = min((start, end) for start, end, _label in entities)
    at = open_app(tiny_project, "pages/explain.py")
    # A sentence without entities offers only the custom range, which stays an option of every sentence.
    at.selectbox(key="explain_span").set_value(("custom", "custom")).run()

    at.number_input(key="explain_sentence").set_value(number).run()

    assert not at.exception
    assert at.selectbox(key="explain_span").value == first_entity
    assert at.selectbox(key="explain_span").proto.set_value


def test_explain_escapes_hostile_tokens(tiny_project):
    # Test sentence 0 is the sentence whose filler words are HTML injections.
    at = explain_at(open_app(tiny_project), {"split": "test", "sentence": 0, "start": 0, "end": 1, "labels": "gold"})

    assert not at.exception
    text = markdown_text(at)
    for token in HOSTILE_TOKENS:
        assert token not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&lt;img src=x onerror=alert(1)&gt;" in text


def test_explain_free_text(tiny_project):
    at = explain_at(open_app(tiny_project), first_error(tiny_project))

    at.radio(key="explain_source").set_value("text").run()
    at.text_area(key="explain_text").input("Mary visited Paris on monday .").run()

    assert not at.exception
    sentence = next(element.value for element in at.markdown if "segflu-sentence" in element.value)
    for word in ("Mary", "visited", "Paris", "monday"):
        assert word in sentence
    assert ">gold<" not in sentence
    assert any(header.value.startswith("Supporting") or header.value == "Nearest training items" for header in at.subheader)


def shown_option(at: AppTest, key: str) -> str:
    """Return the option text that a browser shows for a selectbox drawn anew in the last run."""
    proto = at.selectbox(key=key).proto
    if proto.set_value:
        return proto.raw_value
    if proto.HasField("default"):
        return proto.options[proto.default]
    return proto.placeholder


def test_explain_free_text_controls_match_call(tiny_project):
    calls = []
    explain_tokens = Project.explain_tokens

    def record_call(self, tokens, start, end, **options):
        calls.append(options)
        return explain_tokens(self, tokens, start, end, **options)

    with mock.patch.object(Project, "explain_tokens", record_call):
        at = explain_at(open_app(tiny_project), first_error(tiny_project))
        at.selectbox(key="explain_granularity").set_value("span").run()
        # The controls are hidden while no sentence is typed, then drawn again.
        at.radio(key="explain_source").set_value("text").run()
        at.text_area(key="explain_text").input("Mary visited Paris on monday .").run()

    assert not at.exception
    assert len(calls) == 1
    options = calls[0]
    assert shown_option(at, "explain_granularity") == f"{options['granularity']}s"
    assert options["granularity"] == "span"
    assert shown_option(at, "explain_label_filter") == "all training items"
    assert options["label_filter"] is None
    assert shown_option(at, "explain_method") == METHODS[options["method"]]


def test_relabel_saves_and_undoes(project_copy):
    target = first_error(project_copy)
    at = explain_at(open_app(project_copy), target)
    project = Project.load(project_copy)
    frame = project.explain(target["split"], target["sentence"], target["start"], target["end"], labels=target["labels"])
    # The first item offered is the strongest supporting one, the most negative score.
    item = frame[frame["role"] == "supporting"].sort_values("score", kind="stable").iloc[0]
    tags = list(project.sentence("train", int(item["sentence"])).tags)
    new_label = "LOC" if item["gold"].endswith("ORG") else "ORG"

    at.selectbox(key="explain_relabel_item").set_value(("supporting", int(item["sentence"]), int(item["start"]), int(item["end"]))).run()
    at.selectbox(key="explain_relabel_label").set_value(new_label).run()
    at.button(key="explain_relabel_save").click().run()

    assert not at.exception
    edits = EditStore(project_copy / "edits.sqlite").edits()
    assert len(edits) == 1
    assert (edits[0].split, edits[0].sentence, edits[0].start, edits[0].end) == ("train", int(item["sentence"]), int(item["start"]), int(item["end"]))
    assert edits[0].label == new_label
    assert list(edits[0].old_tags) == tags[edits[0].range_start : edits[0].range_end]
    assert any("Saved edit" in element.value for element in at.success)

    at.button(key="explain_undo").click().run()

    assert not at.exception
    assert EditStore(project_copy / "edits.sqlite").edits() == []


def test_relabel_shows_saved_label(project_copy):
    target = first_error(project_copy)
    neighbours = Project.load(project_copy).explain(
        target["split"], target["sentence"], target["start"], target["end"], labels=target["labels"], method="nn-dot"
    )
    first = neighbours.iloc[0]
    new_label = "LOC" if first["gold"].endswith("ORG") else "ORG"
    at = explain_at(open_app(project_copy), target)
    # Nearest neighbours do not depend on labels, so the relabelled item stays first.
    at.selectbox(key="explain_method").set_value("nn-dot").run()
    choice = at.selectbox(key="explain_relabel_item")
    caption_before = choice.options[choice.index]
    at.selectbox(key="explain_relabel_label").set_value(new_label).run()

    at.button(key="explain_relabel_save").click().run()

    assert not at.exception
    assert any("Saved edit" in element.value for element in at.success)
    proto = at.selectbox(key="explain_relabel_item").proto
    # The browser keeps showing its caption unless the server sends a new one.
    caption_shown = proto.raw_value if proto.set_value else caption_before
    assert f"(train sentence {first['sentence']}, tokens [{first['start']}, {first['end']})" in caption_shown
    assert caption_shown.endswith(f"gold B-{new_label})")
    items = [element.value for element in at.markdown if "segflu-item" in element.value]
    assert any(f"#1 train sentence {first['sentence']}, doc" in item and f"gold B-{new_label}" in item for item in items)


def test_review_page_summarizes_edits(project_copy):
    project = Project.load(project_copy)
    tags = list(project.sentence("train", 0).tags)
    EditStore(project_copy / "edits.sqlite").relabel("train", 0, 0, 1, "LOC", current_tags=tags, note="checked")

    at = open_app(project_copy, "pages/review.py")

    assert not at.exception
    edits_table = at.dataframe[0].value
    assert list(edits_table["label"]) == ["LOC"]
    assert list(edits_table["note"]) == ["checked"]
    metrics = {element.label: element.value for element in at.metric}
    assert metrics["Active edits"] == "1"
    assert metrics["Sentences changed"] == "1"


def test_review_page_undoes_one_edit(project_copy):
    project = Project.load(project_copy)
    store = EditStore(project_copy / "edits.sqlite")
    store.relabel("train", 0, 0, 1, "LOC", current_tags=list(project.sentence("train", 0).tags))
    store.relabel("train", 1, 0, 1, "ORG", current_tags=list(project.sentence("train", 1).tags))
    at = open_app(project_copy, "pages/review.py")

    at.selectbox(key="review_undo_choice").set_value(store.edits()[0].id).run()
    at.button(key="review_undo").click().run()

    assert not at.exception
    remaining = store.edits()
    assert [(edit.sentence, edit.label) for edit in remaining] == [(1, "ORG")]


def test_noise_page_ranks_documents(tiny_project):
    at = open_app(tiny_project, "pages/noise.py")

    assert not at.exception
    expected = Project.load(tiny_project).rank_noise("sentence-loss")
    shown = at.dataframe[0].value
    assert list(shown["doc"]) == list(expected["doc"])
    assert len(shown) > 1


def documents_of(path: Path) -> list[str]:
    """Split a CoNLL file into its documents' text at the -DOCSTART- lines."""
    return [block for block in path.read_text(encoding="utf-8").split("-DOCSTART-") if block.strip()]


def test_noise_curve_from_reference(tiny_project):
    reference = clean_train_file(tiny_project)
    noisy = sum(
        clean != noisy
        for clean, noisy in zip(documents_of(reference), documents_of(tiny_project / "data" / "train.conll"))
    )
    at = open_app(tiny_project, "pages/noise.py")

    at.file_uploader(key="noise_reference").set_value((reference.name, reference.read_bytes(), "text/plain")).run()

    assert not at.exception
    documents = len(at.dataframe[0].value)
    assert any(element.value == f"{noisy} of {documents} documents differ from the reference." for element in at.caption)


def test_safe_child_stays_inside(tmp_path):
    assert safe_child(tmp_path, "demo") == (tmp_path / "demo").resolve()
    for name in ("../outside", "/etc", "a/../../b", "", "  ", "."):
        with pytest.raises(UnsafePathError):
            safe_child(tmp_path, name)


def test_safe_child_rejects_symlink_escape(tmp_path):
    outside = tmp_path / "outside"
    base = tmp_path / "base"
    outside.mkdir()
    base.mkdir()
    (base / "link").symlink_to(outside)

    with pytest.raises(UnsafePathError):
        safe_child(base, "link/project")


def test_validate_page_without_results(tiny_project):
    at = open_app(tiny_project, "pages/validate.py")

    assert not at.exception
    assert any("segflu validate" in element.value for element in at.info)


def test_validate_page_shows_results(project_copy):
    folder = project_copy / "validation"
    folder.mkdir()
    pairs = "test_sentence,test_start,train_sentence,train_start,predicted,actual\n0,1,2,3,0.5,0.4\n1,0,4,1,-0.2,-0.1\n"
    (folder / "pairs.csv").write_text(pairs)
    (folder / "summary.json").write_text(json.dumps({"pearson": 0.987654, "spearman": 1.0, "sign_agreement": 1.0, "n": 2}))

    at = open_app(project_copy, "pages/validate.py")

    assert not at.exception
    metrics = {element.label: element.value for element in at.metric}
    assert metrics == {"Pearson r": "0.988", "Spearman ρ": "1.000", "sign agreement": "1.000", "pairs": "2"}
    table = at.dataframe[0].value
    assert list(table["predicted"]) == [0.5, -0.2]
    assert list(table["actual"]) == [0.4, -0.1]


def test_validate_page_rejects_escaping_folder(tiny_project):
    at = open_app(tiny_project)
    at.switch_page("pages/validate.py").run()

    at.text_input(key="validate_folder").input("../..").run()

    assert not at.exception
    assert any("outside the folder" in element.value for element in at.error)


def test_pages_need_built_index(project_copy):
    import shutil

    shutil.rmtree(project_copy / "index")
    for page in ("pages/explain.py", "pages/noise.py"):
        at = open_app(project_copy, page)

        assert not at.exception, page
        assert any("segflu index" in element.value for element in at.warning), page


def test_review_exports_each_format(project_copy):
    import spacy
    from spacy.tokens import DocBin

    from pages.review import export_bytes

    project = Project.load(project_copy)
    # A sentence whose first word is an entity of its own, so relabelling it changes no other tag.
    number = next(i for i, s in enumerate(project.sentences("train")) if s.tags[0] == "B-PER" and s.tags[1] == "O")
    sentence = project.sentence("train", number)
    EditStore(project_copy / "edits.sqlite").relabel("train", number, 0, 1, "LOC", current_tags=list(sentence.tags))
    state = ((1, False),)

    conll, conll_name = export_bytes(project_copy, "train", "conll", state)
    jsonl, _ = export_bytes(project_copy, "train", "jsonl", state)
    docbin, spacy_name = export_bytes(project_copy, "train", "spacy", state)

    assert conll_name == "train.corrected.conll"
    assert spacy_name == "train.corrected.spacy"
    source_lines = (project_copy / "data" / "train.conll").read_text(encoding="utf-8").split("\n")
    changed = [line for old, line in zip(source_lines, conll.decode("utf-8").split("\n")) if old != line]
    assert changed == [f"{sentence.tokens[0]}\tB-LOC"]
    records = [json.loads(line) for line in jsonl.decode("utf-8").splitlines() if line.strip()]
    assert len(records) == len(project.sentences("train"))
    assert "B-LOC" in json.dumps(records[number])
    docs = list(DocBin().from_bytes(docbin).get_docs(spacy.blank("en").vocab))
    assert [(entity.start, entity.end, entity.label_) for entity in docs[number].ents][0] == (0, 1, "LOC")
