"""negspacy's ``negex`` with finding terms that do not cut a negated phrase short.

Terms such as "consistent with" or "findings" end a negation's scope, so that in "no evidence of glioma, findings
are consistent with a meningioma" only the glioma is negated. Right after a negation cue, though, the same terms
belong to the negated phrase: "no lesion consistent with glioma", "no findings suggestive of glioma". This
component drops such a finding term from the scope ends when it follows a preceding-negation cue within
``max_gap`` tokens, with no punctuation and no class mention in between.

Importing this module registers the spaCy factory :data:`FACTORY`; it needs spaCy and negspacy.
"""

from __future__ import annotations

from negspacy.negation import Negex
from spacy.language import Language
from spacy.tokens import Doc

__all__ = ["FACTORY", "FindingAwareNegex"]

FACTORY = "logsam_negex"

_Match = tuple[int, int, int]


@Language.factory(FACTORY, default_config={"ent_types": None, "finding_terms": [], "max_gap": 2})
class FindingAwareNegex(Negex):
    """``negex`` whose finding terms end a scope only when they are not part of a negated phrase.

    Args:
        nlp: the pipeline.
        name: the component name.
        neg_termset: the four negspacy lists; ``termination`` must include ``finding_terms``.
        ent_types: entity labels to negate (None: all).
        finding_terms: the termination phrases that introduce a finding.
        max_gap: how many tokens may separate a negation cue from a finding term that belongs to it.
    """

    def __init__(
        self,
        nlp: Language,
        name: str,
        neg_termset: dict[str, list[str]],
        ent_types: list[str] | None,
        finding_terms: list[str],
        max_gap: int,
    ) -> None:
        super().__init__(nlp, name, neg_termset=neg_termset, ent_types=ent_types)
        self.finding_terms = {tuple(t.lower_ for t in doc) for doc in nlp.tokenizer.pipe(finding_terms)}
        self.max_gap = max_gap

    def process_negations(self, doc: Doc) -> tuple[list[_Match], list[_Match], list[_Match]]:
        """negspacy's cue matching, less the finding terms that belong to a preceding negation cue."""
        preceding, following, terminating = super().process_negations(doc)
        kept = [t for t in terminating if not self._continues_negated_phrase(doc, t, preceding)]
        return preceding, following, kept

    def _continues_negated_phrase(self, doc: Doc, term: _Match, preceding: list[_Match]) -> bool:
        _, start, end = term
        if tuple(t.lower_ for t in doc[start:end]) not in self.finding_terms:
            return False
        if doc[start].is_sent_start:
            return False
        return any(
            start - self.max_gap <= cue_end <= start
            and not any(t.is_punct or t.is_sent_start or self._is_mention(t.ent_type_) for t in doc[cue_end:start])
            for _, _, cue_end in preceding
        )

    def _is_mention(self, label: str) -> bool:
        return bool(label) and (not self.ent_types or label in self.ent_types)
