"""From a dictation's text to a class prompt: class mentions, their negation and the deciding rule.

The pipeline is spaCy's blank tokenizer (no statistical model) with ``sentencizer``, an ``entity_ruler`` holding
the class table's synonyms (matched on lower case) and negspacy's ``negex`` restricted to the class labels
(:mod:`dae.logsam.negation`). The decision:

1. the first class mention that is not negated decides the class (``"positive_mention"``);
2. otherwise the report is ``healthy``: because of a whole-report negative phrase (``"global_negative_phrase"``,
   matched as whole tokens, so "no mass effect" never overrides a glioblastoma named in the same report), because
   every mention is negated (``"all_mentions_negated"``) or because no class is named (``"no_mention"``).

Known limit of negex scopes: a following negation cue ("ruled out") also acts as a preceding one for the rest of
its sentence part, so "Glioma ruled out, meningioma present." negates both (a ";" or a new sentence separates them).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

from dae.logsam.classes import HEALTHY, ClassTable

__all__ = ["Mention", "PromptExtractor", "PromptResult", "Rule", "extract_prompt", "normalise_text"]

Rule = Literal["positive_mention", "all_mentions_negated", "global_negative_phrase", "no_mention"]

_EXCLUDED_LABEL = "_excluded"
_CACHE_SIZE = 8


@dataclass(frozen=True)
class Mention:
    """A class named in the text.

    Attributes:
        class_name: the class (a name of the class table).
        text: the words as they stand in the original text.
        start_char: offset of the first character in the original text.
        end_char: offset after the last character in the original text.
        negated: whether a negation cue covers the mention.
    """

    class_name: str
    text: str
    start_char: int
    end_char: int
    negated: bool


@dataclass(frozen=True)
class PromptResult:
    """What :meth:`PromptExtractor.extract` found.

    Attributes:
        tumour_class: the decided class; ``"healthy"`` when no tumour is named without negation.
        mentions: every class mention in text order.
        negated_classes: classes all of whose mentions are negated, in order of first mention.
        evidence: the words that decided (the mention or negative phrase), or None for ``"no_mention"``.
        evidence_span: ``(start_char, end_char)`` of the evidence in ``text``, or None.
        rule: which rule decided (see the module docstring).
        language: the language of the extractor.
        text: the original text.
    """

    tumour_class: str
    mentions: list[Mention]
    negated_classes: list[str]
    evidence: str | None
    evidence_span: tuple[int, int] | None
    rule: Rule
    language: str
    text: str

    @property
    def is_tumour(self) -> bool:
        """Whether the decided class is a tumour class (the pipeline goes on to detection)."""
        return self.tumour_class != HEALTHY


def normalise_text(text: str) -> tuple[str, list[int]]:
    """Strip, lower-case and collapse whitespace runs to one space, keeping where each character came from.

    Args:
        text: the original text.

    Returns:
        ``(normalised, origin)``: ``origin[i]`` is the offset in ``text`` of character ``i`` of ``normalised``
        (a collapsed space points at the first whitespace character of its run).
    """
    chars: list[str] = []
    origin: list[int] = []
    for word in re.finditer(r"\S+", text):
        if chars:
            chars.append(" ")
            origin.append(word.start() - 1)
        for i in range(word.start(), word.end()):
            lower = text[i].lower()
            # A few characters lower-case to two (e.g. the dotted capital I); keep those so offsets stay 1:1.
            chars.append(lower if len(lower) == 1 else text[i])
            origin.append(i)
    return "".join(chars), origin


class PromptExtractor:
    """Finds the class a dictation names, with negation (spaCy blank pipeline, built once).

    Args:
        table: the class table (default: :meth:`ClassTable.default`).
        language: a language of the table (``"en"``, ``"de"``); also the spaCy language.

    Raises:
        ImportError: when spaCy or negspacy is not installed.
        ValueError: when the table does not cover ``language``.
    """

    def __init__(self, table: ClassTable | None = None, language: str = "en") -> None:
        self.table = table if table is not None else ClassTable.default()
        self.language = language
        termset = self.table.negex_termset(language)
        try:
            import spacy
            from spacy.matcher import PhraseMatcher

            from dae.logsam.negation import FACTORY
        except ImportError as error:
            raise ImportError(
                'prompt extraction needs spacy and negspacy; install them with: pip install -e ".[logsam]"'
            ) from error
        labels = list(self.table.tumour_names)
        nlp = spacy.blank(language)
        nlp.add_pipe("sentencizer")
        ruler = nlp.add_pipe("entity_ruler", config={"phrase_matcher_attr": "LOWER"})
        patterns = [{"label": name, "pattern": p} for name in labels for p in self.table.synonyms(name, language)]
        # The longest match wins, so "pituitary gland" under a label of its own hides the class term "pituitary".
        patterns += [
            {"label": _EXCLUDED_LABEL, "pattern": p} for name in labels for p in self.table.exclusions(name, language)
        ]
        ruler.add_patterns(patterns)
        nlp.add_pipe(
            FACTORY,
            name="negex",
            config={
                "neg_termset": termset,
                "ent_types": labels,
                "finding_terms": list(self.table.finding_terms(language)),
            },
        )
        self._nlp = nlp
        self._negative = PhraseMatcher(nlp.vocab, attr="LOWER")
        self._negative.add(HEALTHY, list(nlp.tokenizer.pipe(self.table.negative_phrases(language))))

    def extract(self, text: str) -> PromptResult:
        """Decide the class a dictation names.

        Args:
            text: the dictation (e.g. a transcript); offsets in the result refer to it unchanged.

        Returns:
            The :class:`PromptResult`.
        """
        normalised, origin = normalise_text(text)
        doc = self._nlp(normalised)

        def span(start: int, end: int) -> tuple[int, int]:
            return origin[start], origin[end - 1] + 1

        mentions = []
        for ent in doc.ents:
            if ent.label_ == _EXCLUDED_LABEL:
                continue
            start, end = span(ent.start_char, ent.end_char)
            mentions.append(Mention(ent.label_, text[start:end], start, end, bool(ent._.negex)))
        negated_classes = [
            name
            for name in dict.fromkeys(m.class_name for m in mentions)
            if all(m.negated for m in mentions if m.class_name == name)
        ]
        positive = next((m for m in mentions if not m.negated), None)
        # The first negative phrase; of two starting together, the longer one.
        phrase = min(self._negative(doc), key=lambda match: (match[1], -match[2]), default=None)
        rule: Rule
        evidence_span: tuple[int, int] | None
        if positive is not None:
            tumour_class, rule = positive.class_name, "positive_mention"
            evidence_span = (positive.start_char, positive.end_char)
        elif phrase is not None:
            tumour_class, rule = HEALTHY, "global_negative_phrase"
            words = doc[phrase[1] : phrase[2]]
            evidence_span = span(words.start_char, words.end_char)
        elif mentions:
            tumour_class, rule = HEALTHY, "all_mentions_negated"
            evidence_span = (mentions[0].start_char, mentions[0].end_char)
        else:
            tumour_class, rule, evidence_span = HEALTHY, "no_mention", None
        return PromptResult(
            tumour_class=tumour_class,
            mentions=mentions,
            negated_classes=negated_classes,
            evidence=None if evidence_span is None else text[evidence_span[0] : evidence_span[1]],
            evidence_span=evidence_span,
            rule=rule,
            language=self.language,
            text=text,
        )


# Keyed by the table's id: the extractor keeps its table alive, so the id is not reused while cached.
_EXTRACTORS: OrderedDict[tuple[int, str], PromptExtractor] = OrderedDict()


def extract_prompt(text: str, language: str = "en", table: ClassTable | None = None) -> PromptResult:
    """:meth:`PromptExtractor.extract` with an extractor kept for the last few (table, language) pairs.

    Args:
        text: the dictation.
        language: a language of the table.
        table: the class table (default: :meth:`ClassTable.default`).

    Returns:
        The :class:`PromptResult`.
    """
    table = table if table is not None else ClassTable.default()
    key = (id(table), language)
    extractor = _EXTRACTORS.get(key)
    if extractor is None:
        extractor = _EXTRACTORS[key] = PromptExtractor(table, language)
        if len(_EXTRACTORS) > _CACHE_SIZE:
            _EXTRACTORS.popitem(last=False)
    _EXTRACTORS.move_to_end(key)
    return extractor.extract(text)
