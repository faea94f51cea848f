"""The class table of the dictation-to-mask pipeline: tumour classes, their synonyms per language, negation cues.

The table is data: the packaged ``default_classes.yaml`` (glioma, meningioma, pituitary and ``healthy``, in
English and German) describes its own layout. A user file with the same layout extends the default table, adding
classes, synonyms or languages (``ClassTable.from_yaml``); ``base: none`` in the file makes it a table of its own.

``healthy`` is the outcome without a tumour (the pipeline stops, no mask). Its terms are the whole-report negative
phrases ("no intracranial mass"), which decide ``healthy`` only when no tumour is mentioned without negation.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from dae.errors import ConfigError

__all__ = ["HEALTHY", "NEGEX_KEYS", "ClassTable", "LanguageTerms", "TableClass"]

HEALTHY = "healthy"
"""Name of the class for a report without a tumour."""

NEGEX_KEYS: tuple[str, ...] = ("pseudo_negations", "preceding_negations", "following_negations", "termination")
"""The four lists of a negspacy termset."""

_PHRASE_KINDS = ("terms", "variants", "exclude")
_CLASS_NAME = re.compile(r"[a-z][a-z0-9_]*")
_LANGUAGE_CODE = re.compile(r"[a-z]{2,3}")
_BASES = ("default", "none")


@dataclass(frozen=True)
class TableClass:
    """One class of a :class:`ClassTable`.

    Attributes:
        name: the class name (lower case, e.g. ``"pituitary"``).
        caption: the detector's phrase for a tumour class (e.g. ``"pituitary tumour"``); None for ``healthy``.
        terms: per language, the names used in reports (matched, and listed in the speech prompt).
        variants: per language, inflections, spellings and speech-recognition errors (matched only).
        exclude: per language, phrases that contain a term but do not name the class.
    """

    name: str
    caption: str | None
    terms: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    variants: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    exclude: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class LanguageTerms:
    """The language-wide entries of a :class:`ClassTable`.

    Attributes:
        code: the language code, also the spaCy language (``"en"``, ``"de"``).
        prompt_prefix: opening words of the speech-recognition prompt.
        negex_base: a negspacy termset that ``negex`` extends (e.g. ``"en_clinical"``), or None.
        negex: the four negspacy lists (:data:`NEGEX_KEYS`) added to the base.
        finding_terms: phrases that introduce a finding; they end a negation's scope except right after a cue.
    """

    code: str
    prompt_prefix: str
    negex_base: str | None
    negex: Mapping[str, tuple[str, ...]]
    finding_terms: tuple[str, ...]


@dataclass(frozen=True)
class ClassTable:
    """The classes, their synonyms per language and the negation cues.

    Attributes:
        classes: every class, tumour classes first in file order, ``healthy`` last.
        language_terms: the language-wide entries, keyed by language code.
        source: the file(s) the table came from, for messages.
    """

    classes: tuple[TableClass, ...]
    language_terms: Mapping[str, LanguageTerms]
    source: str

    @classmethod
    def default(cls) -> ClassTable:
        """The packaged table (glioma, meningioma, pituitary, healthy; English and German)."""
        return _default_table()

    @classmethod
    def from_yaml(cls, path: str | Path) -> ClassTable:
        """Read a class table from a YAML file.

        The file extends the default table unless it says ``base: none``: new classes and languages are added,
        the synonym and negation lists of existing ones are extended and a given caption or prompt prefix
        replaces the default one.

        Args:
            path: the YAML file.

        Returns:
            The table.

        Raises:
            FileNotFoundError: when the file does not exist.
            ConfigError: (a ValueError) naming the file and key when the content is invalid.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"class table file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from error
        raw = _parse(data, str(path))
        if raw["base"] == "default":
            raw = _merge(_default_raw(), raw)
            source = f"{path} (extending the default table)"
        else:
            source = str(path)
        return _build(raw, source)

    @property
    def names(self) -> tuple[str, ...]:
        """All class names, ``healthy`` last."""
        return tuple(c.name for c in self.classes)

    @property
    def tumour_names(self) -> tuple[str, ...]:
        """The detectable classes: every class but ``healthy``."""
        return tuple(c.name for c in self.classes if c.name != HEALTHY)

    @property
    def languages(self) -> tuple[str, ...]:
        """The language codes the table covers."""
        return tuple(self.language_terms)

    def caption(self, name: str) -> str:
        """The detector phrase of tumour class ``name`` (e.g. ``"pituitary tumour"``).

        Raises:
            ValueError: for ``healthy`` (nothing to detect) or an unknown name.
        """
        entry = self._class(name)
        if entry.caption is None:
            raise ValueError(f"class {name!r} has no caption: it is not a detectable class ({self.tumour_names})")
        return entry.caption

    def synonyms(self, name: str, language: str) -> tuple[str, ...]:
        """The phrases that name class ``name`` in ``language``: its terms, then its variants."""
        entry = self._class(name)
        code = self._language(language).code
        return entry.terms.get(code, ()) + entry.variants.get(code, ())

    def exclusions(self, name: str, language: str) -> tuple[str, ...]:
        """Phrases in ``language`` that contain a synonym of ``name`` but do not name it (``"pituitary gland"``)."""
        return self._class(name).exclude.get(self._language(language).code, ())

    def negative_phrases(self, language: str) -> tuple[str, ...]:
        """Whole-report negative phrases in ``language`` (the synonyms of ``healthy``)."""
        return self.synonyms(HEALTHY, language)

    def finding_terms(self, language: str) -> tuple[str, ...]:
        """Phrases in ``language`` that introduce a finding (see :class:`LanguageTerms`)."""
        return self._language(language).finding_terms

    def negex_termset(self, language: str) -> dict[str, list[str]]:
        """The negspacy termset for ``language``: the base termset plus the table's lists and finding terms.

        Returns:
            A dict with the four :data:`NEGEX_KEYS`; ``termination`` includes the finding terms.

        Raises:
            ImportError: when the language extends a negspacy termset and negspacy is not installed.
            ConfigError: when the base termset is unknown to negspacy.
        """
        entry = self._language(language)
        lists: dict[str, list[str]] = {key: [] for key in NEGEX_KEYS}
        if entry.negex_base is not None:
            lists = _negspacy_termset(entry.negex_base, f"{self.source}: languages.{entry.code}.negex.base")
        for key in NEGEX_KEYS:
            extra = entry.negex[key] + (entry.finding_terms if key == "termination" else ())
            lists[key] = _unique([*lists[key], *extra])
        return lists

    def initial_prompt(self, language: str) -> str:
        """The speech-recognition prompt for ``language``: the prefix and the tumour classes' terms.

        Negation words are left out on purpose: in a Whisper prompt they made the model write "kein Hinweis"
        into positive dictations.

        Example:
            ``"Radiology report: glioma, glioblastoma, ..., macroadenoma, microadenoma."``
        """
        entry = self._language(language)
        terms = _unique([t for c in self.classes if c.name != HEALTHY for t in c.terms.get(entry.code, ())])
        return " ".join(part for part in (entry.prompt_prefix, ", ".join(terms) + ".") if part)

    def _class(self, name: str) -> TableClass:
        for entry in self.classes:
            if entry.name == name:
                return entry
        raise ValueError(f"unknown class {name!r}; the table ({self.source}) has {self.names}")

    def _language(self, language: str) -> LanguageTerms:
        try:
            return self.language_terms[language]
        except KeyError:
            raise ValueError(
                f"language {language!r} is not in the class table ({self.source}); it has {self.languages}"
            ) from None


@functools.cache
def _default_table() -> ClassTable:
    return _build(_default_raw(), "dae/logsam/default_classes.yaml")


def _default_raw() -> dict[str, Any]:
    text = resources.files("dae.logsam").joinpath("default_classes.yaml").read_text(encoding="utf-8")
    return _parse(yaml.safe_load(text), "dae/logsam/default_classes.yaml")


def _negspacy_termset(name: str, where: str) -> dict[str, list[str]]:
    try:
        from negspacy.termsets import termset
    except ImportError as error:
        raise ImportError(f'{where} extends a negspacy termset; install it with: pip install -e ".[logsam]"') from error
    try:
        patterns = termset(name).get_patterns()
    except KeyError:
        raise ConfigError(f"{where}: {name!r} is not a negspacy termset (e.g. 'en_clinical', 'en')") from None
    return {key: list(patterns[key]) for key in NEGEX_KEYS}


def _unique(phrases: list[str]) -> list[str]:
    """The phrases in order without repeats that differ only in case (spaCy matches on ``LOWER``)."""
    seen: set[str] = set()
    out = []
    for phrase in phrases:
        if phrase.lower() not in seen:
            seen.add(phrase.lower())
            out.append(phrase)
    return out


# Parsing: YAML data -> a checked plain dict ("raw") -> merged onto the default -> ClassTable.


def _mapping(value: object, where: str, allowed: tuple[str, ...] | None = None) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
    if allowed is not None:
        unknown = [str(k) for k in value if k not in allowed]
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {list(allowed)}")
    return value


def _phrases(value: object, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list of phrases, got {type(value).__name__} {value!r}")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, bool):
            raise ConfigError(f"{where}[{i}]: got the boolean {item}: quote words such as 'no', 'yes', 'on', 'off'")
        if not isinstance(item, str) or not item.strip():
            raise ConfigError(f"{where}[{i}]: expected a non-empty phrase, got {item!r}")
        out.append(" ".join(item.split()))
    return out


def _text(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")
    return " ".join(value.split())


def _parse(data: object, source: str) -> dict[str, Any]:
    """Check the YAML data of a table file and bring it to plain dicts and lists; errors name file and key."""
    top = _mapping(data, source, ("base", "languages", "classes"))
    base = top.get("base", "default")
    if base not in _BASES:
        raise ConfigError(f"{source}: base: expected one of {list(_BASES)}, got {base!r}")
    languages: dict[str, dict[str, Any]] = {}
    for code, entry in _mapping(top.get("languages"), f"{source}: languages").items():
        where = f"{source}: languages.{code}"
        if not isinstance(code, str) or not _LANGUAGE_CODE.fullmatch(code):
            raise ConfigError(f"{where}: a language code is 2-3 lower-case letters (e.g. 'en')")
        entry = _mapping(entry, where, ("prompt_prefix", "negex", "finding_terms"))
        parsed: dict[str, Any] = {"finding_terms": _phrases(entry.get("finding_terms"), f"{where}.finding_terms")}
        if entry.get("prompt_prefix") is not None:
            parsed["prompt_prefix"] = _text(entry["prompt_prefix"], f"{where}.prompt_prefix")
        negex = _mapping(entry.get("negex"), f"{where}.negex", ("base", *NEGEX_KEYS))
        if "base" in negex:
            parsed["negex_base"] = None if negex["base"] is None else _text(negex["base"], f"{where}.negex.base")
        parsed["negex"] = {key: _phrases(negex.get(key), f"{where}.negex.{key}") for key in NEGEX_KEYS}
        languages[code] = parsed
    classes: dict[str, dict[str, Any]] = {}
    for name, entry in _mapping(top.get("classes"), f"{source}: classes").items():
        where = f"{source}: classes.{name}"
        if not isinstance(name, str) or not _CLASS_NAME.fullmatch(name):
            raise ConfigError(f"{where}: a class name is lower case letters, digits and '_' (e.g. 'glioma')")
        entry = _mapping(entry, where, ("caption", *_PHRASE_KINDS))
        parsed = {}
        if entry.get("caption") is not None:
            parsed["caption"] = _text(entry["caption"], f"{where}.caption")
        for kind in _PHRASE_KINDS:
            per_language = _mapping(entry.get(kind), f"{where}.{kind}")
            parsed[kind] = {str(code): _phrases(p, f"{where}.{kind}.{code}") for code, p in per_language.items()}
        classes[name] = parsed
    return {"base": base, "languages": languages, "classes": classes, "source": source}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` on top of ``base``: lists are extended, single values replaced, new entries added."""
    languages = {code: _copy(entry) for code, entry in base["languages"].items()}
    for code, entry in extra["languages"].items():
        if code not in languages:
            languages[code] = _copy(entry)
            continue
        target = languages[code]
        target["finding_terms"] = [*target["finding_terms"], *entry["finding_terms"]]
        for key in ("prompt_prefix", "negex_base"):
            if key in entry:
                target[key] = entry[key]
        for key in NEGEX_KEYS:
            target["negex"][key] = [*target["negex"][key], *entry["negex"][key]]
    classes = {name: _copy(entry) for name, entry in base["classes"].items()}
    for name, entry in extra["classes"].items():
        target = classes.setdefault(name, {kind: {} for kind in _PHRASE_KINDS})
        if "caption" in entry:
            target["caption"] = entry["caption"]
        for kind in _PHRASE_KINDS:
            for code, phrases in entry[kind].items():
                target[kind][code] = [*target[kind].get(code, []), *phrases]
    return {"base": "none", "languages": languages, "classes": classes, "source": extra["source"]}


def _copy(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: (_copy(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v) for k, v in entry.items()}


def _build(raw: dict[str, Any], source: str) -> ClassTable:
    """Check a complete raw table (classes, languages, no phrase in two classes) and freeze it."""
    where = raw["source"]
    if not raw["languages"]:
        raise ConfigError(f"{where}: languages: the table needs at least one language")
    if HEALTHY not in raw["classes"]:
        raise ConfigError(f"{where}: classes: the table needs the class {HEALTHY!r} (its negative phrases)")
    if len(raw["classes"]) < 2:
        raise ConfigError(f"{where}: classes: the table needs at least one tumour class besides {HEALTHY!r}")
    languages = {}
    for code, entry in raw["languages"].items():
        languages[code] = LanguageTerms(
            code=code,
            prompt_prefix=entry.get("prompt_prefix", ""),
            negex_base=entry.get("negex_base"),
            negex={key: tuple(_unique(entry["negex"][key])) for key in NEGEX_KEYS},
            finding_terms=tuple(_unique(entry["finding_terms"])),
        )
    owner: dict[tuple[str, str], str] = {}
    classes = []
    names = [n for n in raw["classes"] if n != HEALTHY] + [HEALTHY]
    for name in names:
        entry = raw["classes"][name]
        key = f"{where}: classes.{name}"
        if name == HEALTHY and ("caption" in entry or entry["exclude"]):
            raise ConfigError(f"{key}: {HEALTHY!r} has no caption and no exclude list (it is never detected)")
        if name != HEALTHY and not any(entry["terms"].values()):
            raise ConfigError(f"{key}.terms: a tumour class needs at least one term in some language")
        for kind in _PHRASE_KINDS:
            for code, phrases in entry[kind].items():
                if code not in languages:
                    raise ConfigError(f"{key}.{kind}.{code}: language {code!r} is not under languages")
                for phrase in phrases:
                    previous = owner.setdefault((code, phrase.lower()), f"{name}.{kind}")
                    if previous.split(".")[0] != name:
                        raise ConfigError(
                            f"{key}.{kind}.{code}: {phrase!r} is also listed under classes.{previous}; "
                            "a phrase may belong to one class only"
                        )
        caption = None if name == HEALTHY else entry.get("caption", name.replace("_", " "))
        classes.append(
            TableClass(
                name=name,
                caption=caption,
                **{kind: {c: tuple(_unique(p)) for c, p in entry[kind].items() if p} for kind in _PHRASE_KINDS},
            )
        )
    return ClassTable(classes=tuple(classes), language_terms=languages, source=source)
