"""Tests of ``segflu reproduce``: every experiment in quick mode, and the pieces that can be checked exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segflu_core.errors import ReproductionDataError
from segflu_core.reproduce import RunSettings, run_experiment
from segflu_core.reproduce.common import data_file, document_key
from tests.conftest import shared_file


def quick_settings(tmp_path, tiny_encoder, data_dir) -> RunSettings:
    return RunSettings(data_dir=data_dir, out_dir=tmp_path / "out", quick=True, device="cpu",
                       encoder=str(tiny_encoder), threads=1)


def shared_data_dir(relative: str):
    """Return the data folder that contains ``relative``, or skip when it is absent."""
    path = shared_file(relative)
    return path.parents[len(relative.split("/")) - 1]


def check_common_keys(result: dict, out_dir, experiment: str) -> None:
    assert result["experiment"] == experiment
    assert result["settings"]["quick"] is True
    assert result["wall_time_s"] > 0
    assert result["machine"]["cpu_count"] >= 1
    written = json.loads((out_dir / f"{experiment}.json").read_text(encoding="utf-8"))
    assert written["experiment"] == experiment
    for name in result["files"]:
        assert (out_dir / name).stat().st_size > 0


def test_missing_data_file_names_option(tmp_path):
    settings = RunSettings(data_dir=tmp_path, out_dir=tmp_path / "out")
    with pytest.raises(ReproductionDataError) as caught:
        data_file(settings, "ebm_nlp/acl_lstm_crf_data/dev.txt")
    message = str(caught.value)
    assert "ebm_nlp/acl_lstm_crf_data/dev.txt" in message
    assert "--data-dir" in message
    assert "SEGFLU_SHARED_DATA" in message


def test_document_key_drops_sentence_number():
    assert document_key("conll_train_12_3") == "conll_train_12"
    assert document_key("12345_0") == "12345"


def test_validate_quick(tmp_path, tiny_encoder):
    data_dir = shared_data_dir("segment_influence_paper/data/conll_corrected/train_corrected.jsonl")
    result = run_experiment("validate", quick_settings(tmp_path, tiny_encoder, data_dir))
    check_common_keys(result, tmp_path / "out", "validate")
    for key in ("pearson", "spearman", "pearson_without_hessian", "spearman_without_hessian"):
        assert result[key] is None or -1.0 <= result[key] <= 1.0
    assert 0.0 <= result["sign_agreement"] <= 1.0
    assert 1 <= result["test_words"] <= 3
    assert result["pairs"] == 4 * result["test_words"]
    assert result["refit"]["converged"] is True
    assert "validate_scatter.png" in result["files"]


def test_insert_artifact_labels_next_word():
    from segflu_core.reproduce.artifact import ARTIFACT, insert_artifact

    tokens = ["Peter", "went", "to", "Paris", "on", "Monday"]
    tags = ["B-PER", "O", "O", "B-LOC", "O", "O"]
    rng = np.random.default_rng(0)
    positions = set()
    for _ in range(40):
        new_tokens, new_tags, position = insert_artifact(tokens, tags, rng)
        positions.add(position)
        assert len(new_tokens) == len(tokens) + 1
        assert new_tokens[position - 1] == ARTIFACT
        assert new_tags[position - 1] == "O"
        assert new_tags[position] == "B-PER"
        assert tags[position - 1] == "O"
        assert new_tokens[:position - 1] + new_tokens[position:] == tokens
        untouched = new_tags[:position - 1] + new_tags[position + 1 :]
        assert untouched == tags[:position - 1] + tags[position:]
    assert positions == {2, 3, 5, 6}


def test_insert_artifact_needs_o_word():
    from segflu_core.reproduce.artifact import insert_artifact

    assert insert_artifact(["Paris"], ["B-LOC"], np.random.default_rng(0)) is None
    assert insert_artifact(["The", "Hague"], ["B-LOC", "I-LOC"], np.random.default_rng(0)) is None


def test_artifact_quick(tmp_path, tiny_encoder):
    data_dir = shared_data_dir("segment_influence_paper/data/conll_corrected/train_corrected_artifact.jsonl")
    result = run_experiment("artifact", quick_settings(tmp_path, tiny_encoder, data_dir))
    check_common_keys(result, tmp_path / "out", "artifact")
    assert result["queries"] >= 1
    for key in ("predicted_b_per_share", "segment_top1_share", "instance_top1_share", "nn_dot_top1_share", "nn_cosine_top1_share"):
        assert 0.0 <= result[key] <= 1.0
    assert result["settings"]["train_sentences"] == 80


@pytest.mark.parametrize(
    "order_is_bad, expected",
    [
        ([True, False, True, False], [0.5, 0.5, 1.0, 1.0]),
        ([False, False, True], [0.0, 0.0, 1.0]),
        ([True, True], [0.5, 1.0]),
        ([False, False], [0.0, 0.0]),
    ],
)
def test_found_fraction_curve_table(order_is_bad, expected):
    from segflu_core.reproduce.noise import found_fraction_curve

    np.testing.assert_allclose(found_fraction_curve(np.array(order_is_bad)), expected)


def test_ranking_order_puts_nan_last():
    from segflu_core.reproduce.noise import ranking_order

    order = ranking_order(np.array([0.1, np.nan, 3.0, 2.0]), np.random.default_rng(0))
    assert list(order) == [2, 3, 0, 1]


def check_noise_result(result: dict, tmp_path, experiment: str, kinds: tuple[str, ...], methods: list[str]) -> None:
    import pandas as pd

    check_common_keys(result, tmp_path / "out", experiment)
    assert set(result["recall"]) == set(kinds)
    for kind in kinds:
        assert 1 <= result["bad_documents"][kind] < result["documents"]
        for method in methods:
            recall = result["recall"][kind][method]
            assert 0.0 <= recall["at_50"] <= recall["at_100"] <= recall["at_200"] <= 1.0
            assert 0.0 < recall["area"] <= 1.0
    curves = pd.read_csv(tmp_path / "out" / f"{experiment}_curves.csv")
    for (kind, method), curve in curves.groupby(["noise", "method"]):
        found = curve.sort_values("documents")["found"].to_numpy()
        assert np.all(np.diff(found) >= 0), (kind, method)
        assert found[-1] == pytest.approx(1.0), (kind, method)
        assert len(found) == result["documents"]


NOISE_METHODS = ["random", "sentence-loss-max", "word-loss-mean", "entropy-max", "grad-norm-mean",
                 "segment-influence-max", "instance-influence-mean", "nn-max"]


def test_noise_synthetic_quick(tmp_path, tiny_encoder):
    data_dir = shared_data_dir("segment_influence_paper/data/conll_corrected/train_corrected_modified_docs.jsonl")
    result = run_experiment("noise-synthetic", quick_settings(tmp_path, tiny_encoder, data_dir))
    check_noise_result(result, tmp_path, "noise-synthetic", ("org_to_loc", "random"), NOISE_METHODS)
    assert result["documents"] == 18
    assert result["bad_documents"] == {"org_to_loc": 6, "random": 6}


def test_noise_real_quick(tmp_path, tiny_encoder):
    data_dir = shared_data_dir("segment_influence_paper/data/conll_corrected/train_original.jsonl")
    result = run_experiment("noise-real", quick_settings(tmp_path, tiny_encoder, data_dir))
    check_noise_result(result, tmp_path, "noise-real", ("annotation_errors",), NOISE_METHODS + ["cleanlab"])
    assert result["bad_documents"] == {"annotation_errors": 6}
    assert result["settings"]["cleanlab_version"]


DOSAGE_EXAMPLES = [
    ("Nitrendipine was given orally at a dosage of 20 mg once daily", ["20 mg"]),
    ("The dose of oral famotidine was 2 mg/kg/day", ["2 mg/kg/day"]),
    ("patients received 0.5 mg/kg of ketamine", ["0.5 mg/kg"]),
    ("aspirin 2 x 100 mg per day", ["2 x 100 mg"]),
    ("low doses of aspirin ( 100 mg/-day ) on clinic", ["100 mg/-day"]),
    ("either 10-20 mg or 1.5 g of the drug", ["10-20 mg", "1.5 g"]),
    ("infusion at the dose of 7.5 ml/kg for 30 minutes", ["7.5 ml/kg"]),
    ("vitamin D 1000 IU daily and 400 units of insulin", ["1000 IU", "400 units"]),
    ("a 25mg tablet", ["25mg"]),
]
NON_DOSAGE_EXAMPLES = [
    "Thirty-six extracted human molars were assigned to six groups",
    "120 patients were followed for 12 months",
    "pain decreased by 30 % ( 95 % CI 10 to 40 )",
    "the 2 groups differed at 10 min and 4 h",
    "mean age 54.5 years , BMI 27 kg/m2",
    "Group A ( n = 20 ) and group B ( n = 25 )",
]


@pytest.mark.parametrize("text, expected", DOSAGE_EXAMPLES)
def test_dosage_spans_find_dosages(text, expected):
    from segflu_core.reproduce.dosage import dosage_spans

    tokens = text.split(" ")
    found = [" ".join(tokens[start:end]) for start, end in dosage_spans(tokens)]
    assert found == expected


@pytest.mark.parametrize("text", NON_DOSAGE_EXAMPLES)
def test_dosage_spans_skip_non_dosages(text):
    from segflu_core.reproduce.dosage import dosage_spans

    assert dosage_spans(text.split(" ")) == []


def test_intervention_tags_make_spans():
    from segflu_core.reproduce.dosage import intervention_tags

    labels = ["N", "I", "I", "P", "I", "O", "I", "I", "I", "N"]
    expected = ["O", "B-INT", "I-INT", "O", "B-INT", "O", "B-INT", "I-INT", "I-INT", "O"]
    assert intervention_tags(labels) == expected


def test_drop_empty_tokens_counts_lines(tmp_path):
    from segflu_core.reproduce.dosage import drop_empty_tokens

    source = tmp_path / "crowd.txt"
    source.write_bytes("-DOCSTART- -X- N\n\nA DT N\n VBD N\ncaf\xe9 NN I\n\n".encode("cp1252"))
    target = tmp_path / "clean.txt"
    assert drop_empty_tokens(source, target, "cp1252") == 1
    assert target.read_text(encoding="utf-8") == "-DOCSTART- -X- N\n\nA DT N\ncaf\xe9 NN I\n\n"


def test_dosage_quick(tmp_path, tiny_encoder):
    data_dir = shared_data_dir("ebm_nlp/acl_lstm_crf_data/dev.txt")
    result = run_experiment("dosage", quick_settings(tmp_path, tiny_encoder, data_dir))
    check_common_keys(result, tmp_path / "out", "dosage")
    assert result["test_dosages"] >= result["queries"] >= 1
    assert result["settings"]["empty_tokens_dropped"] >= 1
    assert set(result["shares"]) == {"instance", "segment", "nn_dot", "nn_cosine"}
    assert "supporting_word" not in result["shares"]["instance"]
    for shares in result["shares"].values():
        for value in shares.values():
            assert 0.0 <= value <= 1.0
        assert shares["conflicting_example"] <= min(shares["supporting_example"], shares["opposing_example"])


def test_dosage_quick_fine_tuned(tmp_path, tiny_encoder):
    data_dir = shared_data_dir("ebm_nlp/acl_lstm_crf_data/dev.txt")
    settings = quick_settings(tmp_path, tiny_encoder, data_dir)
    settings.fine_tune_epochs = 2
    result = run_experiment("dosage", settings)
    check_common_keys(result, tmp_path / "out", "dosage")
    assert result["settings"]["encoder_mode"] == "fine-tuned"
    assert result["settings"]["fine_tune_epochs"] == 2
    # The tiny encoder lowercases and has token types, so fine-tuning turns case embeddings on.
    assert result["settings"]["case_embeddings"] is True
    project_config = json.loads((tmp_path / "out" / "dosage-work" / "project" / "project.json").read_text(encoding="utf-8"))
    assert project_config["training"]["freeze_encoder"] is False
    assert (tmp_path / "out" / "dosage-work" / "project" / "model" / "encoder").is_dir()


def test_tagger_config_follows_settings(tmp_path):
    from segflu_core.reproduce.common import tagger_config

    frozen = tagger_config(RunSettings(data_dir=tmp_path))
    assert frozen.freeze_encoder is True
    assert frozen.head_epochs == 20
    fine_tuned = tagger_config(RunSettings(data_dir=tmp_path, fine_tune_epochs=4))
    assert fine_tuned.freeze_encoder is False
    assert fine_tuned.epochs == 4
    assert fine_tuned.batch_size == 32
    assert fine_tuned.case_embeddings is None
    with pytest.raises(ValueError, match="fine_tune_epochs"):
        RunSettings(data_dir=tmp_path, fine_tune_epochs=0)


def test_f1_quick(tmp_path, tiny_encoder):
    data_dir = shared_data_dir("conllpp/conllpp_train.txt")
    shared_file("conll2003_original/eng.testb")
    result = run_experiment("f1", quick_settings(tmp_path, tiny_encoder, data_dir))
    check_common_keys(result, tmp_path / "out", "f1")
    for key in ("frozen_test_f1", "frozen_dev_f1", "fine_tuned_test_f1", "fine_tuned_dev_f1"):
        assert 0.0 <= result[key] <= 1.0
    assert result["settings"]["sentences"] == {"train": 60, "dev": 20, "test": 20}
    assert result["settings"]["modes"]["frozen"]["freeze_encoder"] is True
    assert result["settings"]["modes"]["fine_tuned"]["freeze_encoder"] is False
    assert "f1_per_type.csv" in result["files"]
    assert "f1_per_type.png" in result["files"]


def test_f1_test_split_is_iob2(tmp_path):
    from segflu_core.reproduce.f1 import read_splits
    from segflu_core.schemes import find_tag_problems

    data_dir = shared_data_dir("conll2003_original/eng.testb")
    splits = read_splits(RunSettings(data_dir=data_dir, out_dir=tmp_path, quick=True))
    test_tags = [tag for sentence in splits["test"] for tag in sentence.tags]
    assert any(tag.startswith("B-") for tag in test_tags)
    for sentence in splits["test"]:
        assert find_tag_problems(sentence.tags, "iob2") == []


def test_best_methods_break_ties_by_area():
    from segflu_core.reproduce.noise import best_methods

    recall = {"kind": {"random": {"at_100": 1.0, "area": 0.5}, "nn-max": {"at_100": 1.0, "area": 0.8},
                       "entropy-max": {"at_100": 0.9, "area": 0.95}}}
    assert best_methods(recall) == {"kind": "nn-max"}


def test_cli_reports_missing_corpus(tmp_path, capsys):
    from segflu_core.cli import main

    code = main(["reproduce", "dosage", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    assert code == 2
    error = capsys.readouterr().err
    assert "ebm_nlp/acl_lstm_crf_data/dev.txt: file not found" in error
    assert "--data-dir" in error
    assert not (tmp_path / "out" / "dosage.json").exists()


def full_settings(tmp_path, relative: str) -> RunSettings:
    return RunSettings(data_dir=shared_data_dir(relative), out_dir=tmp_path / "out")


def test_noise_synthetic_full_data(tmp_path):
    from segflu_core.reproduce.noise import synthetic_data

    settings = full_settings(tmp_path, "segment_influence_paper/data/conll_corrected/train_corrected_modified_docs.jsonl")
    splits, truth, clean = synthetic_data(settings, np.random.default_rng(0))
    assert len(splits["train"]) == 879
    assert int(truth["org_to_loc"].sum()) == 20
    assert int(truth["random"].sum()) == 100
    assert not np.any(truth["org_to_loc"] & truth["random"])
    assert len(clean) == 10
    first_sentences = {}
    for sentence in splits["dev"]:
        first_sentences.setdefault(sentence.doc, sentence)
    for doc in clean:
        assert first_sentences[doc].tokens[0] == "SOCCER"


def test_noise_real_full_data(tmp_path):
    from segflu_core.reproduce.noise import real_data

    settings = full_settings(tmp_path, "segment_influence_paper/data/conll_corrected/train_original.jsonl")
    splits, truth, clean = real_data(settings, np.random.default_rng(0))
    assert len(truth["annotation_errors"]) == 887
    assert int(truth["annotation_errors"].sum()) == 127
    assert len(splits["train"]) == 12528
    assert len(clean) == 10


def test_dosage_full_splits(tmp_path):
    from segflu_core.reproduce.dosage import load_splits

    settings = full_settings(tmp_path, "ebm_nlp/acl_lstm_crf_data/dev.txt")
    splits, counts = load_splits(settings, np.random.default_rng(0))
    assert counts == {"train_abstracts": 450, "dev_abstracts": 50, "test_abstracts": 191, "empty_tokens_dropped": 78}
    assert len({sentence.doc_id for sentence in splits["test"]}) == 191
    assert all(tag in ("O", "B-INT", "I-INT") for sentence in splits["train"] for tag in sentence.tags)
    assert all("" not in sentence.tokens for sentence in splits["train"])


def test_artifact_validation_share(tmp_path):
    from segflu_core.reproduce.artifact import ARTIFACT, artifact_validation
    from segflu_core.reproduce.common import read_paper_jsonl

    path = shared_file("segment_influence_paper/data/conll_corrected/validation_corrected.jsonl")
    validation, _ = read_paper_jsonl(path)
    modified, queries = artifact_validation(validation, 0.1, np.random.default_rng(0))
    assert len(modified) == len(validation) == 2775
    assert len(queries) == round(0.1 * 2775)
    changed = [i for i, (old, new) in enumerate(zip(validation, modified)) if old.tokens != new.tokens]
    assert sorted(changed) == sorted(queries)
    for index, position in queries.items():
        assert modified[index].tokens[position - 1] == ARTIFACT
        assert modified[index].tags[position] == "B-PER"
