"""End-to-end test in Chromium: explain an error, relabel a training word, export the file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from segflu_core.project import Project
from tests.app import browser
from tests.app.conftest import HOSTILE_TOKENS

pytestmark = pytest.mark.browser


@pytest.fixture
def page(tmp_path):
    if not browser.CHROMIUM.exists():
        pytest.skip(f"Chromium not found at {browser.CHROMIUM}; install the Debian chromium package to run browser tests")
    pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    with browser.chromium_page(tmp_path / "profile") as chromium:
        yield chromium


def sentence_lines(path: Path) -> list[list[int]]:
    """Return, per sentence of a CoNLL file, the 0-based line numbers of its tokens."""
    sentences: list[list[int]] = []
    block: list[int] = []
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines + [""]):
        if line.strip():
            block.append(number)
            continue
        if block and not lines[block[0]].startswith("-DOCSTART-"):
            sentences.append(block)
        block = []
    return sentences


def pick_error(project: Project) -> tuple[int, dict]:
    """Return the position in the Errors page's list and the target of the error the test explains."""
    errors = project.errors("dev")
    position = 1 if len(errors) > 1 else 0
    row = errors.iloc[position]
    labels = "gold" if row["kind"] == "missed" else "predicted"
    target = {"sentence": int(row["sentence"]), "start": int(row["start"]), "end": int(row["end"]), "labels": labels}
    return position, target


def pick_relabel_item(project: Project, frame) -> tuple[int, str]:
    """Return the position of a one-word item whose relabelling changes no neighbouring tag, and its new type."""
    for position, row in enumerate(frame.itertuples()):
        tags = project.sentence("train", int(row.sentence)).tags
        start = int(row.start)
        next_tag = tags[start + 1] if start + 1 < len(tags) else "O"
        if row.end - row.start == 1 and not tags[start].startswith("I-") and not next_tag.startswith("I-"):
            return position, ("ORG" if tags[start].endswith("LOC") else "LOC")
    pytest.fail("no one-word training item can be relabelled without changing its neighbours")


def shown_items(column) -> list[tuple[str, float]]:
    """Return the 'train sentence S, doc D, tokens [a, b)' caption and the score of each item in a column."""
    items = []
    for text in column.locator(".segflu-item").all_inner_texts():
        caption = re.search(r"train sentence \d+, doc \d+, tokens \[\d+, \d+\)", text)
        score = re.search(r"score (-?\d[\d.]*(?:e[+-]?\d+)?)", text)
        assert caption and score, text
        items.append((caption.group(0), float(score.group(1))))
    return items


def check_list(column, frame, role: str) -> None:
    """Check that a column shows exactly the role's items of ``frame``, strongest score first."""
    rows = frame[frame["role"] == role]
    expected = {f"train sentence {r.sentence}, doc {r.doc}, tokens [{r.start}, {r.end})" for r in rows.itertuples()}
    items = shown_items(column)
    assert len(items) == len(rows)
    assert {caption for caption, _score in items} == expected
    magnitudes = [abs(score) for _caption, score in items]
    assert magnitudes == sorted(magnitudes, reverse=True)


def test_explain_relabel_export(page, project_copy, tmp_path):
    project = Project.load(project_copy)
    error_position, target = pick_error(project)
    errors = project.errors("dev")
    error_row = errors.iloc[error_position]
    frame = project.explain("dev", target["sentence"], target["start"], target["end"], labels=target["labels"])
    item_position, new_type = pick_relabel_item(project, frame)
    item = frame.iloc[item_position]
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))

    with browser.running_app(project_copy, tmp_path / "server.log") as url:
        page.goto(url)
        page.get_by_text("dev metrics").wait_for(timeout=60000)
        page.get_by_role("link", name="Errors").click()
        page.get_by_role("button", name="Explain this error").wait_for(timeout=60000)
        browser.wait_until_idle(page)

        browser.choose_option(page, "Error to explain", f"sentence {error_row['sentence']}, tokens {error_row['start']}-{error_row['end']}:")
        browser.wait_until_idle(page)
        page.get_by_role("button", name="Explain this error").click()
        page.get_by_text("Relabel a training item").wait_for(timeout=60000)
        browser.wait_until_idle(page)

        columns = page.locator('[data-testid="stColumn"]')
        supporting = columns.filter(has_text="Supporting (")
        opposing = columns.filter(has_text="Opposing (")
        check_list(supporting, frame, "supporting")
        check_list(opposing, frame, "opposing")

        browser.choose_option(page, "Item to relabel", f"train sentence {item['sentence']}, tokens [{item['start']}, {item['end']})")
        browser.wait_until_idle(page)
        browser.choose_option(page, "New label", new_type)
        browser.wait_until_idle(page)
        page.get_by_role("button", name="Save relabel").click()
        page.get_by_text("Saved edit").wait_for(timeout=60000)
        browser.wait_until_idle(page)

        browser.choose_option(page, "Split", "test")
        browser.wait_until_idle(page)
        sentence_input = page.locator('[data-testid="stNumberInput"]').filter(has_text="Sentence").locator("input")
        sentence_input.fill("0")
        sentence_input.press("Enter")
        browser.wait_until_idle(page)
        sentence_view = page.locator(".segflu-sentence").first
        for token in HOSTILE_TOKENS:
            assert token in sentence_view.inner_text()
        assert sentence_view.locator("img, script, svg").count() == 0
        assert dialogs == []

        page.get_by_role("link", name="Review").click()
        page.get_by_text("What export changes").wait_for(timeout=60000)
        browser.wait_until_idle(page)
        with page.expect_download(timeout=60000) as download_info:
            page.get_by_test_id("stDownloadButton").get_by_role("button").click()
        exported = tmp_path / "exported.conll"
        download_info.value.save_as(exported)

    source = project_copy / "data" / "train.conll"
    line = sentence_lines(source)[int(item["sentence"])][int(item["start"])]
    old_lines = source.read_text(encoding="utf-8").split("\n")
    new_lines = exported.read_text(encoding="utf-8").split("\n")
    assert len(new_lines) == len(old_lines)
    assert [n for n, (old, new) in enumerate(zip(old_lines, new_lines)) if old != new] == [line]
    token = old_lines[line].split("\t")[0]
    assert new_lines[line] == f"{token}\tB-{new_type}"
