"""A project folder: its data, model and influence index, and the queries on them.

``project.json`` names the labels, the encoder and, per split, the data file
(relative to the project folder) with the settings to read it. The corpora
are read on first use, the tagger is loaded on first use, and the index
arrays are memory-mapped on first use, so opening a project is cheap.

Gold labels are those of the data files with the active label edits of
``edits.sqlite`` applied. Opening the index recomputes in place the sentences
whose labels changed since it was built or last updated.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from segflu_core.edits import EditStore
from segflu_core.errors import IndexNotBuiltError, ProjectError, UnsafePathError
from segflu_core.influence import explain as explain_module
from segflu_core.influence import update as index_update
from segflu_core.influence.index import INDEX_FOLDER, InfluenceIndex, corpus_digest, decode, label_indices, make_batch
from segflu_core.schemes import tags_to_spans

logger = logging.getLogger(__name__)

PROJECT_FILE = "project.json"
EDITS_FILE = "edits.sqlite"
# Dev documents that count as clean validation data when no others are named.
DEFAULT_CLEAN_DOCUMENTS = 10
ERROR_COLUMNS = ["sentence", "start", "end", "gold_type", "predicted_type", "text", "kind"]


def resolve_inside(root: Path, relative: str | os.PathLike, *, source: str) -> Path:
    """Resolve ``relative`` against ``root`` and check that it stays inside ``root``.

    Raises
    ------
    UnsafePathError
        When the path is absolute or leads outside ``root`` (through ``..`` or a symlink).
    """
    root = Path(root).resolve()
    candidate = Path(relative)
    resolved = (root / candidate).resolve()
    if candidate.is_absolute() or not resolved.is_relative_to(root):
        raise UnsafePathError(
            f"{source}: path {str(relative)!r} points outside the project folder {root}; "
            "use a path relative to the project folder, such as data/train.conll"
        )
    return resolved


def read_project_file(path: Path) -> dict:
    """Read and check ``project.json``; raise :class:`ProjectError` when it is missing or incomplete."""
    config_path = path / PROJECT_FILE
    if not config_path.is_file():
        raise ProjectError(f"{config_path}: file not found; create the project with `segflu train`")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ProjectError(f"{config_path}:{error.lineno}: invalid JSON ({error.msg}); fix or recreate the file") from error
    for key in ("labels", "data"):
        if key not in config:
            raise ProjectError(f"{config_path}: missing key {key!r}; recreate the project with `segflu train`")
    for split, entry in config["data"].items():
        if not isinstance(entry, dict) or "path" not in entry:
            raise ProjectError(f"{config_path}: data.{split} has no 'path'; recreate the project with `segflu train`")
    return config


class Project:
    """A project folder with its corpora, tagger and influence index.

    Parameters
    ----------
    path : pathlib.Path
        The project folder.
    config : dict
        The content of ``project.json``.
    device : str
        Device for the tagger: ``"auto"``, ``"cpu"`` or ``"cuda"``.
    """

    def __init__(self, path: Path, config: dict, *, device: str = "auto"):
        self.path = Path(path)
        self.config = config
        self.device = device
        self._corpora: dict = {}
        self._tagger = None
        self._index: InfluenceIndex | None = None
        self._edit_store: EditStore | None = None
        # Per split: the edit state the edited sentences were built for, and those sentences.
        self._edited: dict[str, tuple[tuple, list]] = {}

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str = "auto") -> "Project":
        """Open a project folder; checks ``project.json`` and every data path in it."""
        path = Path(path)
        config = read_project_file(path)
        project = cls(path, config, device=device)
        for split in project.splits:
            project.data_path(split)
        return project

    @property
    def labels(self) -> list[str]:
        """IOB2 labels of the model, ``"O"`` first."""
        return list(self.config["labels"])

    @property
    def splits(self) -> list[str]:
        """Names of the splits in ``project.json``, such as ``["train", "dev", "test"]``."""
        return list(self.config["data"])

    def data_path(self, split: str) -> Path:
        """Return the data file of a split, resolved inside the project folder."""
        entry = self._data_entry(split)
        return resolve_inside(self.path, entry["path"], source=f"{self.path / PROJECT_FILE}: data.{split}.path")

    def _data_entry(self, split: str) -> dict:
        if split not in self.config["data"]:
            raise ValueError(f"expected a split in {self.splits}, got {split!r}")
        return self.config["data"][split]

    def corpus(self, split: str):
        """Return the split's :class:`segflu_core.conll.Corpus`, read once with the settings of ``project.json``."""
        if split not in self._corpora:
            from segflu_core.conll import read_corpus

            entry = self._data_entry(split)
            options = {key: entry[key] for key in ("format", "tag_column", "encoding", "scheme") if entry.get(key) is not None}
            self._corpora[split] = read_corpus(self.data_path(split), **options)
        return self._corpora[split]

    def original_sentences(self, split: str) -> list:
        """Return the sentences of a split as its data file has them, without label edits, in file order."""
        return self.corpus(split).sentences

    def sentences(self, split: str) -> list:
        """Return the sentences of a split, in file order, with the active edits of ``edits.sqlite`` applied.

        Sentences without active edits are the objects of :meth:`original_sentences`.
        The edited list is rebuilt whenever the split's edits change, so edits
        saved by another :class:`EditStore` (another page or process) show at once.
        """
        original = self.original_sentences(split)
        state = self.edit_state(split)
        if not state:
            return original
        cached = self._edited.get(split)
        if cached is not None and cached[0] == state:
            return cached[1]
        edited_tags = self.edit_store().apply(split, [sentence.tags for sentence in original])
        edited = [
            sentence if tags == sentence.tags else dataclasses.replace(sentence, tags=tags)
            for sentence, tags in zip(original, edited_tags)
        ]
        self._edited[split] = (state, edited)
        return edited

    def edit_store(self) -> EditStore | None:
        """Return the project's :class:`EditStore`, or ``None`` while ``edits.sqlite`` does not exist.

        Reading never creates the database, so a project without edits stays unchanged.
        """
        if self._edit_store is None:
            path = self.path / EDITS_FILE
            if not path.is_file():
                return None
            self._edit_store = EditStore(path)
        return self._edit_store

    def edit_state(self, split: str) -> tuple[tuple[int, bool], ...]:
        """Return ``(id, undone)`` of every edit of a split in id order; empty without edits."""
        store = self.edit_store()
        if store is None:
            return ()
        return tuple((edit.id, edit.undone) for edit in store.edits(split=split, include_undone=True))

    def sentence(self, split: str, index: int):
        """Return sentence ``index`` (0-based, ``-DOCSTART-`` lines not counted) of a split."""
        sentences = self.sentences(split)
        if not 0 <= index < len(sentences):
            raise ValueError(f"expected a sentence index in [0, {len(sentences)}) for split {split!r}, got {index}")
        return sentences[index]

    @property
    def tagger(self):
        """The trained :class:`segflu_core.tagger.Tagger`, loaded on first use."""
        if self._tagger is None:
            from segflu_core.tagger import Tagger

            self._tagger = Tagger.load(self.path / "model", device=self.device)
        return self._tagger

    @property
    def index(self) -> InfluenceIndex:
        """The influence index, opened on first use and brought up to date with the label edits.

        Raises
        ------
        IndexNotBuiltError
            When ``index/`` has not been built or was built from other data
            files; the message names the command.
        """
        if self._index is None:
            self.apply_edits()
        return self._index

    def _open_index(self) -> InfluenceIndex:
        index = InfluenceIndex.load(self.path / INDEX_FOLDER, project_path=self.path)
        self._check_index_matches(index)
        return index

    def apply_edits(self) -> dict[str, list[int]]:
        """Bring the index up to date with the edit store and return the recomputed sentences per split.

        Only sentences whose current labels differ from the labels the index
        holds are recomputed, and nothing is read beyond one query of the edit
        store when the edits did not change since the last update.

        Raises
        ------
        IndexNotBuiltError
            When the index has not been built.
        """
        if self._index is None:
            self._index = self._open_index()
        updated = index_update.sync_edits(self, self._index)
        if any(updated.values()):
            # The data files were checked on opening, and the update rewrote arrays and manifest.
            self._index = InfluenceIndex.load(self.path / INDEX_FOLDER, project_path=self.path)
        return updated

    def _check_index_matches(self, index: InfluenceIndex) -> None:
        """Raise ``IndexNotBuiltError`` when the index was built from other data files than the project's.

        The check compares the unedited data files, because label edits are
        applied to the index in place by :meth:`apply_edits`.
        """
        for split, counts in index.manifest["splits"].items():
            sentences = self.original_sentences(split) if split in self.splits else []
            words = sum(len(sentence.tokens) for sentence in sentences)
            # An index written before source_sha256 existed was built from the unedited files.
            built_from = counts.get("source_sha256", counts.get("sha256"))
            if built_from not in (None, corpus_digest(sentences)):
                raise IndexNotBuiltError(
                    f"{index.folder / 'manifest.json'}: the {split} tokens or tags changed in the data file since the index was built; "
                    f"rebuild the index with `segflu index {self.path}`"
                )
            if (len(sentences), words) != (counts["sentences"], counts["words"]):
                raise IndexNotBuiltError(
                    f"{index.folder / 'manifest.json'}: the index covers {counts['sentences']} {split} sentences "
                    f"({counts['words']} words) but {self.path / PROJECT_FILE} names {len(sentences)} ({words} words); "
                    f"rebuild the index with `segflu index {self.path}`"
                )

    def reload_index(self) -> None:
        """Forget the opened index so the next query opens the one on disk."""
        self._index = None

    # ------------------------------------------------------------------
    # Queries
    # ------------------------------------------------------------------

    def stored_query(self, split: str, sentence: int, start: int, end: int, *, labels: str = "gold") -> explain_module.Query:
        """Build the query for segment ``[start, end)`` of a stored sentence from the index arrays."""
        index = self.index
        if split not in index.splits:
            raise ValueError(f"expected a split in {index.splits}, got {split!r}")
        if labels not in explain_module.LABEL_SOURCES:
            raise ValueError(f"expected labels 'gold' or 'predicted', got {labels!r}")
        offsets = index[f"{split}_sentence_offsets"]
        if not 0 <= sentence < len(offsets) - 1:
            raise ValueError(f"expected a sentence index in [0, {len(offsets) - 1}) for split {split!r}, got {sentence}")
        first, last = int(offsets[sentence]), int(offsets[sentence + 1])
        check_segment(start, end, last - first)
        source = f"{split}_gold" if labels == "gold" else f"{split}_predictions"
        return explain_module.Query(
            features=index.features(split)[first:last],
            labels=np.asarray(index[source][first:last], dtype=np.int64),
            start=int(start),
            end=int(end),
            train_sentence=sentence if split == "train" else None,
        )

    def explain(
        self,
        split: str,
        sentence: int,
        start: int,
        end: int,
        *,
        labels: str = "gold",
        method: str = "segment",
        granularity: str = "word",
        hessian: bool = False,
        label_filter: str | None = None,
        top_k: int = 20,
    ) -> pd.DataFrame:
        """List the training items that most support and oppose segment ``[start, end)`` of a sentence.

        Parameters
        ----------
        split : str
            ``"dev"`` or ``"test"`` (``"train"`` works too).
        sentence : int
            0-based sentence position in the split's file, ``-DOCSTART-`` lines not counted.
        start, end : int
            The segment ``[start, end)`` in words.
        labels : {"gold", "predicted"}
            Labels of the query sentence that the segment's loss is taken under.
        method : {"segment", "instance", "nn-dot", "nn-cosine"}
            Segment influence, instance influence (whole test sentence against
            training sentences) or nearest training words by dot product or
            cosine similarity of features.
        granularity : {"word", "span", "sentence"}
            Training items of segment influence: words, gold spans (an O word
            is a span of its own) or sentences. Ignored by the other methods.
        hessian : bool
            Use the stored Cholesky factor of the Hessian, ``I = −g_testᵀ H⁻¹ g``.
        label_filter : {None, "same", "different"}
            Keep only training words or spans whose gold label type equals
            (differs from) the type of the segment's first label.
        top_k : int
            Items per role.

        Returns
        -------
        pandas.DataFrame
            Columns ``sentence, doc, start, end, tokens, gold, score, role,
            conflict``. Influence methods return up to ``top_k`` supporting
            (negative score) and ``top_k`` opposing rows, sorted by ascending
            score. Nearest-neighbour methods return ``top_k`` rows with role
            ``"neighbour"`` and the similarity as score, sorted descending.

        Raises
        ------
        IndexNotBuiltError
            When the index, or its Hessian factor for ``hessian=True``, is missing.
        """
        self.apply_edits()
        query = self.stored_query(split, sentence, start, end, labels=labels)
        return explain_module.explain_query(
            self.index, self.sentences("train"), query, method=method, granularity=granularity,
            hessian=hessian, label_filter=label_filter, top_k=top_k,
        )

    def explain_tokens(self, tokens: list[str], start: int, end: int, **options) -> pd.DataFrame:
        """Explain segment ``[start, end)`` of a free-text sentence under its predicted labels.

        The features come from the tagger, and the labels are the Viterbi path
        of the head stored in the index. ``options`` are those of :meth:`explain`
        except ``labels``.
        """
        if not tokens:
            raise ValueError("expected at least one token, got none")
        check_segment(start, end, len(tokens))
        self.apply_edits()
        features = self.tagger.word_features([list(tokens)], progress=False)[0]
        query = explain_module.Query(
            features=np.asarray(features, dtype=np.float32),
            labels=self._decode_with_index_head(features),
            start=int(start),
            end=int(end),
        )
        return explain_module.explain_query(self.index, self.sentences("train"), query, **options)

    def _decode_with_index_head(self, features: np.ndarray) -> np.ndarray:
        placeholder = [np.zeros(len(features), dtype=np.int64)]
        batch = make_batch([np.asarray(features, dtype=np.float32)], placeholder, self.index.head)
        return decode(batch, self.index.labels)

    def predict(self, tokens: list[str]) -> list[str]:
        """Tag one tokenised sentence with the project's tagger; returns one IOB2 label per token."""
        if not tokens:
            return []
        return self.tagger.predict([list(tokens)])[0]

    def predicted_tags(self, split: str) -> list[list[str]]:
        """Return the predicted IOB2 tags of every sentence of a split, from the index when it is built."""
        try:
            index = self.index
            offsets = index[f"{split}_sentence_offsets"]
            predictions = np.asarray(index[f"{split}_predictions"])
        except (IndexNotBuiltError, KeyError):
            return self.tagger.predict([sentence.tokens for sentence in self.sentences(split)])
        labels = index.labels
        return [[labels[i] for i in predictions[offsets[s] : offsets[s + 1]]] for s in range(len(offsets) - 1)]

    def errors(self, split: str) -> pd.DataFrame:
        """List every mispredicted entity of a split.

        Returns
        -------
        pandas.DataFrame
            Columns ``sentence, start, end, gold_type, predicted_type, text,
            kind``. ``kind`` is one of:

            - ``"missed"``: no predicted span overlaps the gold span.
            - ``"spurious"``: no gold span overlaps the predicted span.
            - ``"wrong type"``: same bounds, other type.
            - ``"wrong boundary"``: overlapping spans with other bounds, whose type may differ too.

            ``start`` and ``end`` are the predicted span's bounds, except for missed entities.
        """
        records = []
        for number, (sentence, predicted) in enumerate(zip(self.sentences(split), self.predicted_tags(split))):
            records.extend(sentence_errors(number, sentence.tokens, sentence.tags, predicted))
        return pd.DataFrame.from_records(records, columns=ERROR_COLUMNS)


    def rank_noise(self, method: str, *, clean_docs=None, aggregate: str = "max") -> pd.DataFrame:
        """Rank training documents by how likely they are misannotated, most suspicious first.

        Parameters
        ----------
        method : str
            One of :data:`segflu_core.influence.noise.METHODS`.
        clean_docs : None, sequence of int, str or path
            Clean validation documents for the influence and nearest-neighbour
            methods: dev document indices (default: the first 10 dev documents),
            or a corrected corpus file whose every sentence counts.
        aggregate : {"max", "mean"}
            How word or sentence scores combine into a document score.

        Returns
        -------
        pandas.DataFrame
            Columns ``doc, score, sentences, first_tokens``.
        """
        from segflu_core.influence import noise

        validation = None
        if method in noise.VALIDATION_METHODS:
            validation = self.clean_validation(clean_docs)
        train = self.sentences("train")
        documents = self.ranking_documents("train")
        if len(documents) != len(self.documents("train")):
            train = [dataclasses.replace(sentence, doc=position) for position, sentence in enumerate(train)]
        return noise.rank_documents(self.index, train, method, validation=validation, aggregate=aggregate)

    def documents(self, split: str) -> list[list[int]]:
        """Return the sentence positions of each document of a split, as the corpus has them."""
        return self.corpus(split).documents

    def ranking_documents(self, split: str) -> list[list[int]]:
        """Return the documents that noise ranking and the default clean validation set use.

        A file without ``-DOCSTART-`` lines is one document, which ranks
        nothing. So each of its sentences (a tweet, say) counts as a document.
        """
        documents = self.documents(split)
        if len(documents) == 1 and len(documents[0]) > 1:
            return [[position] for position in documents[0]]
        return documents


    def clean_validation(self, clean_docs=None):
        """Return the clean validation words for noise ranking; see :meth:`rank_noise`."""
        from segflu_core.influence import noise

        if clean_docs is None or not isinstance(clean_docs, (str, os.PathLike)):
            documents = self.ranking_documents("dev")
            chosen = range(min(DEFAULT_CLEAN_DOCUMENTS, len(documents))) if clean_docs is None else list(clean_docs)
            for doc in chosen:
                if not 0 <= doc < len(documents):
                    raise ValueError(f"expected dev document indices in [0, {len(documents)}), got {doc}")
            sentences = [s for doc in chosen for s in documents[doc]]
            return noise.validation_from_index(self.index, "dev", sentences)
        from segflu_core.conll import read_corpus

        corpus = read_corpus(clean_docs)
        tag_lists = [sentence.tags for sentence in corpus.sentences if sentence.tokens]
        gold = label_indices(tag_lists, self.index.labels, split=str(clean_docs))
        features = self.tagger.word_features([s.tokens for s in corpus.sentences if s.tokens], progress=False)
        return noise.validation_from_features(features, gold, self.index.head)

def check_segment(start: int, end: int, length: int) -> None:
    """Raise ``ValueError`` unless ``0 <= start < end <= length``."""
    if not 0 <= start < end <= length:
        raise ValueError(f"expected a segment with 0 <= start < end <= {length}, got [{start}, {end})")


def sentence_errors(number: int, tokens: list[str], gold: list[str], predicted: list[str]) -> list[dict]:
    """Compare the gold and predicted spans of one sentence; see :meth:`Project.errors` for the kinds."""
    gold_spans = tags_to_spans(gold, "iob2")
    predicted_spans = tags_to_spans(predicted, "iob2")
    exact = {(s.start, s.end, s.label) for s in gold_spans}
    records = []

    def record(span, gold_type, predicted_type, kind):
        records.append({
            "sentence": number, "start": span.start, "end": span.end, "gold_type": gold_type,
            "predicted_type": predicted_type, "text": " ".join(tokens[span.start : span.end]), "kind": kind,
        })

    for span in predicted_spans:
        if (span.start, span.end, span.label) in exact:
            continue
        overlapping = [g for g in gold_spans if g.start < span.end and span.start < g.end]
        if not overlapping:
            record(span, None, span.label, "spurious")
            continue
        same_bounds = [g for g in overlapping if (g.start, g.end) == (span.start, span.end)]
        if same_bounds:
            record(span, same_bounds[0].label, span.label, "wrong type")
        else:
            record(span, overlapping[0].label, span.label, "wrong boundary")
    for span in gold_spans:
        if not any(p.start < span.end and span.start < p.end for p in predicted_spans):
            record(span, span.label, None, "missed")
    return sorted(records, key=lambda r: (r["start"], r["end"]))

