"""Issue 15 case 10: the labeler runs in linear time on arbitrarily long clauses, same labels."""

from __future__ import annotations

import random
import re

from hilt_scale.evaluation import labeler

# An unbounded repetition of a character class or "." (greedy or lazy) between two parts of a
# pattern: re rescans the rest of the clause from every start of the first part.
UNBOUNDED_GAP = re.compile(r"(?:\[[^\]]*\]|\.)[*+]")


def all_patterns():
    for name in labeler.CLASSES:
        for pattern, veto in labeler._COMPILED[name]:
            yield name, pattern
            if veto is not None:
                yield name, veto


def test_no_labeler_regex_has_an_unbounded_gap():
    """Structural: every "A ... B in the same sentence part" phrase is a linear ``_Near`` matcher."""
    offenders = [
        (name, p.pattern)
        for name, p in all_patterns()
        if isinstance(p, re.Pattern) and UNBOUNDED_GAP.search(p.pattern)
    ]
    assert offenders == []
    for p in (labeler._PRE_NEGATION, labeler._NOT, labeler._SCOPE_END, labeler._POST_NEGATION):
        assert not UNBOUNDED_GAP.search(p.pattern), p.pattern
    # The rewritten phrases are still there (as _Near), so no class lost a phrase.
    near = [(name, p.pattern) for name, p in all_patterns() if isinstance(p, labeler._Near)]
    assert {name for name, _ in near} >= {"Pericardial effusion", "Coronary artery wall calcification"}


def test_near_matcher_finds_exactly_what_the_regex_finds():
    """Random clauses over the phrases' own words, stops and decimals: same first match span."""
    near = [p for _, p in all_patterns() if isinstance(p, labeler._Near)]
    words = (
        "effusion fluid pericardial pericardium pleural pleura calcification calcified plaque "
        "atheroma coronary lad rca heart size cardiac contour dimensions increased enlarged large "
        "hernia herniated hiatus the of mild . ; , 1.5 lad. rca; no"
    ).split()
    rng = random.Random(0)
    for _ in range(3000):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 25)))
        for p in near:
            want = re.search(p.pattern, text)
            got = p.search(text)
            assert (want and want.span()) == (got and got.span()), (p.pattern, text)
