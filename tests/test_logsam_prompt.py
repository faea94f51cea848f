"""Class table and prompt extraction (spaCy blank pipeline + negex) of the dictation-to-mask pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest

from dae.errors import ConfigError
from dae.logsam.classes import HEALTHY, NEGEX_KEYS, ClassTable

pytest.importorskip("spacy")
pytest.importorskip("negspacy")

from dae.logsam.prompt import PromptExtractor, extract_prompt, normalise_text

REFERENCE_NEGATIVE_PHRASES = [
    "no tumor",
    "no tumour",
    "no intracranial mass",
    "no mass",
    "no evidence of tumor",
    "no evidence of pathological lesion",
    "no evidence of lesion",
    "no evidence of diffusion",
    "negative for tumor",
    "negative for tumour",
    "normal mri",
    "unremarkable mri",
    "within normal limits",
    "no acute intracranial abnormality",
]

ENGLISH = [
    # (text, class, negated classes, rule)
    (
        "There is no evidence of glioma, findings are consistent with a meningioma.",
        "meningioma",
        ["glioma"],
        "positive_mention",
    ),
    ("glioblastoma with no mass effect", "glioma", [], "positive_mention"),
    ("No intracranial mass.", HEALTHY, [], "global_negative_phrase"),
    ("Normal MRI of the brain.", HEALTHY, [], "global_negative_phrase"),
    ("Large pituitary macroadenoma.", "pituitary", [], "positive_mention"),
    ("Glioma is ruled out; suspected meningioma.", "meningioma", ["glioma"], "positive_mention"),
    ("There is no glioma tumor on the left frontal lobe.", HEALTHY, ["glioma"], "all_mentions_negated"),
    ("No glioma. No meningioma.", HEALTHY, ["glioma", "meningioma"], "all_mentions_negated"),
    (
        "Meningioma excluded. Enhancing glioblastoma in the left temporal lobe.",
        "glioma",
        ["meningioma"],
        "positive_mention",
    ),
    ("No mass but a meningioma at the falx.", "meningioma", [], "positive_mention"),
    ("No mass effect, findings consistent with a meningioma.", "meningioma", [], "positive_mention"),
    # Finding terms right after a negation cue stay inside the negated phrase.
    ("No lesion consistent with glioma.", HEALTHY, ["glioma"], "all_mentions_negated"),
    ("No findings suggestive of glioma.", HEALTHY, ["glioma"], "all_mentions_negated"),
    ("Not consistent with a meningioma.", HEALTHY, ["meningioma"], "all_mentions_negated"),
    ("Glioma cannot be excluded.", "glioma", [], "positive_mention"),
    ("Glioma is not seen.", HEALTHY, ["glioma"], "all_mentions_negated"),
    ("The pituitary gland is unremarkable.", HEALTHY, [], "no_mention"),
    ("Mild small vessel disease.", HEALTHY, [], "no_mention"),
    ("The reading was meningium.", "meningioma", [], "positive_mention"),
]

GERMAN = [
    (
        "Es gibt keinen Hinweis auf ein Gliom. Der Befund ist vereinbar mit einem Meningeom.",
        "meningioma",
        ["glioma"],
        "positive_mention",
    ),
    ("Gliom ausgeschlossen.", HEALTHY, ["glioma"], "all_mentions_negated"),
    (
        "Kein Hinweis auf ein Gliom, der Befund ist ein Bar mit einem Meningeom.",
        "meningioma",
        ["glioma"],
        "positive_mention",
    ),
    ("Großes Hypophysenadenom.", "pituitary", [], "positive_mention"),
    ("Raumforderung, vereinbar mit Hypophysen tumor.", "pituitary", [], "positive_mention"),  # split compound
    ("Kein Nachweis eines Glioms.", HEALTHY, ["glioma"], "all_mentions_negated"),
    ("Meningeom nicht ausgeschlossen.", "meningioma", [], "positive_mention"),
    ("Nicht auszuschliessen ist ein Gliom.", "glioma", [], "positive_mention"),  # the ASCII spelling of ß
    ("Gliom nicht nachweisbar, jedoch Makroadenom.", "pituitary", ["glioma"], "positive_mention"),
    ("Weder Gliom noch Meningeom.", HEALTHY, ["glioma", "meningioma"], "all_mentions_negated"),
    ("Keine Raumforderung.", HEALTHY, [], "global_negative_phrase"),
    ("Unauffälliger Befund.", HEALTHY, [], "global_negative_phrase"),
    ("Glioblastom mit Masseneffekt, keine Raumforderung kontralateral.", "glioma", [], "positive_mention"),
]


@pytest.fixture(scope="module")
def english() -> PromptExtractor:
    return PromptExtractor(language="en")


@pytest.fixture(scope="module")
def german() -> PromptExtractor:
    return PromptExtractor(language="de")


@pytest.mark.parametrize(("text", "tumour_class", "negated", "rule"), ENGLISH, ids=[row[0] for row in ENGLISH])
def test_english_sentences(english: PromptExtractor, text, tumour_class, negated, rule):
    result = english.extract(text)
    assert (result.tumour_class, result.negated_classes, result.rule) == (tumour_class, negated, rule)
    assert result.is_tumour == (tumour_class != HEALTHY)
    assert result.language == "en"
    assert result.text == text


@pytest.mark.parametrize(("text", "tumour_class", "negated", "rule"), GERMAN, ids=[row[0] for row in GERMAN])
def test_german_sentences(german: PromptExtractor, text, tumour_class, negated, rule):
    result = german.extract(text)
    assert (result.tumour_class, result.negated_classes, result.rule) == (tumour_class, negated, rule)


@pytest.mark.xfail(
    strict=True,
    reason="negex limit: a following cue ('ruled out') also negates what comes after it in the same sentence part",
)
def test_following_negation_does_not_reach_past_a_comma(english: PromptExtractor):
    assert english.extract("Glioma ruled out, meningioma present.").tumour_class == "meningioma"


def test_mentions_and_evidence_point_into_the_original_text(english: PromptExtractor):
    text = "  NO evidence of\n\tGlioma;   suspected Pituitary\n   Adenoma  "
    result = english.extract(text)
    assert [(m.class_name, m.negated) for m in result.mentions] == [("glioma", True), ("pituitary", False)]
    for mention in result.mentions:
        assert text[mention.start_char : mention.end_char] == mention.text
    assert result.evidence == "Pituitary\n   Adenoma"
    assert result.evidence_span is not None
    assert text[slice(*result.evidence_span)] == result.evidence


def test_global_phrase_evidence(english: PromptExtractor):
    text = "Impression:  NO   intracranial mass."
    result = english.extract(text)
    assert result.rule == "global_negative_phrase"
    assert result.evidence == "NO   intracranial mass"
    assert text[slice(*result.evidence_span)] == result.evidence


def test_negative_phrases_match_whole_tokens_only(english: PromptExtractor):
    assert english.extract("No massive bleeding.").rule == "no_mention"


def test_no_mention_has_no_evidence(english: PromptExtractor):
    result = english.extract("")
    assert (result.tumour_class, result.rule, result.evidence, result.evidence_span, result.mentions) == (
        HEALTHY,
        "no_mention",
        None,
        None,
        [],
    )


def test_normalise_text_keeps_offsets():
    text = " A\u00a0 B\n\nC "
    normalised, origin = normalise_text(text)
    assert normalised == "a b c"
    assert [text[i] for i in origin[::2]] == ["A", "B", "C"]


def test_default_table():
    table = ClassTable.default()
    assert table.names == ("glioma", "meningioma", "pituitary", HEALTHY)
    assert table.tumour_names == ("glioma", "meningioma", "pituitary")
    assert table.languages == ("en", "de")
    assert [table.caption(n) for n in table.tumour_names] == ["glioma", "meningioma", "pituitary tumour"]
    with pytest.raises(ValueError, match="not a detectable class"):
        table.caption(HEALTHY)
    with pytest.raises(ValueError, match="unknown class 'astrocytoma'"):
        table.synonyms("astrocytoma", "en")
    with pytest.raises(ValueError, match="language 'fr' is not in the class table"):
        table.synonyms("glioma", "fr")
    assert {"glioma", "glial tumor", "glial tumour", "glioblastoma", "glioplaston"} <= set(
        table.synonyms("glioma", "en")
    )
    assert {"meningioma", "meningium", "meningeum"} <= set(table.synonyms("meningioma", "en"))
    assert {"pituitary", "pituitary adenoma", "pituitary tumour", "pituitary tumor", "macroadenoma"} <= set(
        table.synonyms("pituitary", "en")
    )
    german = {s.lower() for name in table.tumour_names for s in table.synonyms(name, "de")}
    assert {"gliom", "glioblastom", "meningeom", "hypophysenadenom", "makroadenom", "hypophysentumor"} <= german
    assert set(REFERENCE_NEGATIVE_PHRASES) <= set(table.negative_phrases("en"))
    assert {"kein tumor", "keine raumforderung", "unauffälliger befund"} <= {
        p.lower() for p in table.negative_phrases("de")
    }


def test_negex_termsets():
    table = ClassTable.default()
    english = table.negex_termset("en")
    assert tuple(sorted(english)) == tuple(sorted(NEGEX_KEYS))
    assert {"no evidence of", "without"} <= set(english["preceding_negations"])  # from negspacy's en_clinical
    assert {"ruled out", "excluded"} <= set(english["following_negations"])
    assert {"consistent with", "findings", "suspected", "suggestive of", "compatible with", ";"} <= set(
        english["termination"]
    )
    german = table.negex_termset("de")
    assert {"kein", "keine", "keinen", "keinem", "keiner", "kein hinweis auf", "ohne", "nicht"} <= set(
        german["preceding_negations"]
    )
    assert {"ausgeschlossen", "nicht nachweisbar"} <= set(german["following_negations"])
    assert {"aber", "jedoch", "vereinbar mit", "befund", "verdacht auf"} <= set(german["termination"])


@pytest.mark.parametrize("language", ["en", "de"])
def test_initial_prompt_names_classes_and_no_negation(language: str):
    table = ClassTable.default()
    prompt = table.initial_prompt(language)
    words = set(prompt.lower().replace(",", " ").replace(".", " ").replace(":", " ").split())
    for name in table.tumour_names:
        assert table.synonyms(name, language)[0].lower() in prompt.lower()
    cues = table.negex_termset(language)["preceding_negations"] + table.negex_termset(language)["following_negations"]
    assert not words & {c for c in cues if " " not in c}
    assert not any(f" {c} " in f" {prompt.lower()} " for c in cues if " " in c)
    assert "glioplaston" not in prompt.lower() and "pituatory" not in prompt.lower()


def test_user_class_from_yaml(tmp_path: Path):
    path = tmp_path / "classes.yaml"
    path.write_text(
        "classes:\n"
        "  metastasis:\n"
        "    caption: brain metastasis\n"
        "    terms: {en: [metastasis, brain metastases], de: [Metastase]}\n"
        "  glioma:\n"
        "    variants: {en: [glyoma]}\n"
        "languages:\n"
        "  en:\n"
        "    negex: {following_negations: [vanished]}\n",
        encoding="utf-8",
    )
    table = ClassTable.from_yaml(path)
    assert table.names == ("glioma", "meningioma", "pituitary", "metastasis", HEALTHY)
    assert table.caption("metastasis") == "brain metastasis"
    assert "Metastase" in table.initial_prompt("de")
    result = extract_prompt("No glyoma. Multiple brain metastases.", table=table)
    assert (result.tumour_class, result.negated_classes, result.evidence) == (
        "metastasis",
        ["glioma"],
        "brain metastases",
    )
    assert extract_prompt("Kein Gliom, aber eine Metastase.", language="de", table=table).tumour_class == "metastasis"
    assert extract_prompt("The metastasis vanished.", table=table).tumour_class == HEALTHY
    assert extract_prompt("No glyoma.").rule == "no_mention"  # the default table is unchanged


def test_stand_alone_table(tmp_path: Path):
    path = tmp_path / "classes.yaml"
    path.write_text(
        "base: none\n"
        "languages:\n"
        "  en:\n"
        "    negex: {preceding_negations: ['no'], termination: [but]}\n"
        "classes:\n"
        "  lesion: {terms: {en: [lesion]}}\n"
        f"  {HEALTHY}: {{terms: {{en: [all clear]}}}}\n",
        encoding="utf-8",
    )
    table = ClassTable.from_yaml(path)
    assert (table.names, table.languages, table.caption("lesion")) == (("lesion", HEALTHY), ("en",), "lesion")
    extractor = PromptExtractor(table)
    assert extractor.extract("No lesion but a lesion.").tumour_class == "lesion"
    assert extractor.extract("No lesion. All clear.").rule == "global_negative_phrase"


BAD_TABLES = [
    ("classes: [\n", "not valid YAML"),
    ("colours: {}\n", "unknown key(s) ['colours']"),
    ("base: maybe\n", "base: expected one of"),
    ("classes: {Glioma-2: {terms: {en: [x]}}}\n", "classes.Glioma-2: a class name"),
    ("classes: {lesion: {terms: {en: lesion}}}\n", "classes.lesion.terms.en: expected a list"),
    ("classes: {lesion: {terms: {en: [lesion, 3]}}}\n", "classes.lesion.terms.en[1]: expected a non-empty phrase"),
    ("languages: {en: {negex: {preceding_negations: [no]}}}\n", "preceding_negations[0]: got the boolean False: quote"),
    ("classes: {lesion: {terms: {fr: [lésion]}}}\n", "classes.lesion.terms.fr: language 'fr' is not under languages"),
    ("classes: {lesion: {terms: {en: [Glioblastoma]}}}\n", "is also listed under classes.glioma.terms"),
    ("classes: {lesion: {caption: lesion}}\n", "classes.lesion.terms: a tumour class needs at least one term"),
    ("classes: {healthy: {caption: normal}}\n", "classes.healthy: 'healthy' has no caption"),
    ("classes: {lesion: {colour: red}}\n", "classes.lesion: unknown key(s) ['colour']"),
    ("languages: {en: {negex: {after: [gone]}}}\n", "languages.en.negex: unknown key(s) ['after']"),
    ("languages: {English: {}}\n", "languages.English: a language code"),
    ("base: none\nlanguages: {en: {}}\nclasses: {lesion: {terms: {en: [lesion]}}}\n", "needs the class 'healthy'"),
]


@pytest.mark.parametrize(("content", "message"), BAD_TABLES, ids=[m for _, m in BAD_TABLES])
def test_bad_tables_name_file_and_key(tmp_path: Path, content: str, message: str):
    path = tmp_path / "bad.yaml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        ClassTable.from_yaml(path)
    assert str(path) in str(error.value)
    assert message in str(error.value)


def test_missing_table_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"absent\.yaml"):
        ClassTable.from_yaml(tmp_path / "absent.yaml")


def test_unknown_negspacy_base_is_named(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("languages: {en: {negex: {base: en_legal}}}\n", encoding="utf-8")
    table = ClassTable.from_yaml(path)
    with pytest.raises(ConfigError, match=r"bad.yaml.*languages\.en\.negex\.base: 'en_legal' is not a negspacy"):
        PromptExtractor(table)
