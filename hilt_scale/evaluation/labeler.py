"""Rule-based labeler for CT-RATE's 18 chest-CT abnormality classes, with negation handling.

Clinical efficacy compares the findings of a generated report with those of its reference; this
labeler reads the findings. A report is split into sentences, sentences into clauses (at "but",
"however", ";" ...). A class is positive when one of its phrases occurs in a clause that does
not negate it: a negation cue before the phrase ("no", "without", "neither/nor", "absence of")
or a negating predicate after it ("was not observed", "not detected", "is absent", "within
normal limits"). Uncertain mentions ("?", "suspicious for", "may be compatible with") count as
positive, as CT-RATE's own labels do, and so does "cannot be excluded"; "was ruled out" and
"to rule out" count as negative.

Command: ``python -m hilt_scale.labeler INPUT --out labels.csv`` (INPUT: CSV with a
``report_text`` column, or JSONL with ``text``); the output has the id column and one 0/1
column per class named exactly as CT-RATE names them.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path

from shards.io import atomic_write
from shards.schema import CLASSES

# Phrases that mention each class, as regular expressions over lowercased text. A phrase is a
# mention; whether the mention asserts the finding is decided by the negation rules below.
# Arteries other than the coronaries; the abdominal aorta, aortic valve and "aortopulmonary"
# (a lymph-node station) are not what CT-RATE's arterial class means.
_ARTERY = (
    r"(?<!coronary )(?<!pulmonary )(?<!\babdominal )(?:aort(?!ic valve|opulmonary)\w*|arter\w*|carotid|subclavian"
    r"|brachiocephalic|vascular|vessels?|arch|arcus)"
)
_CALC = (
    r"(?:calcif\w*|atheroma\w*|atheromatous|atherosclero\w*|(?:calcific|atheromatous) plaque\w*|plaque\w*)"
)
_CORONARY = r"(?:coronar\w*|lad|circumflex|lcx|rca)\b"
# A mention in a clause that also names a non-lung structure, or calls a density a scar, is not
# a lung opacity.
_NOT_LUNG = (
    r"\b(?:fat\w*|soft tissue|subcutaneous|skin|breast|bone|vertebra\w*|liver|gallbladder|renal"
    r"|perirenal|kidney|mesenter\w*|muscle|lymph|node|metallic|thym\w*|mediastinum|adrenal|surrenal)\b"
)
# Organs outside the chest whose sequelae/fibrosis are not pulmonary.
_NOT_CHEST = (
    r"\b(?:kidneys?|renal|perirenal|liver|hepatic|spleen|breast|bone|vertebra\w*|rib|pyelonephritis)\b"
)
_SCAR = r"|sequel\w*|fibro\w*|pleuroparenchymal|linear|band|atelecta\w*|scar"
# Each phrase is a pattern, or (pattern, veto): a veto pattern anywhere in the clause cancels it.
PHRASES: dict[str, tuple[str | tuple[str, str], ...]] = {
    "Medical material": (
        r"\bcatheter\w*",
        r"\bpeg\b",
        r"\bport\b",
        r"\bstent\w*",
        r"\bpacemaker\w*",
        r"\bprosthe\w*",
        r"\bsutur\w*",
        r"\b(?:surgical|vascular|metallic)? ?clips?\b",
        r"\b(?:nasogastric|endotracheal|tracheostomy|chest|thoracostomy|drainage|feeding) tube\w*",
        r"\btracheostomy\b",
        r"\bdrain\b",
        r"\bsternotomy wires?\b",
        r"\bcerclage\w*",
        r"\belectrode\w*",
        r"\bvalve replacement\b",
        r"\b(?:metallic|surgical|suture|stent|fixation) material\w*",
        r"\bfixation\b",
        r"\bfixators?\b",
        r"\bbreast implants?\b",
        r"\bscrews?\b",
        r"\bimplant(?:ed)? (?:device|cardioverter)\w*",
        r"\bdefibrillator\b",
        r"\bcoils?\b",
        r"\bcannula\w*",
        r"\bsternal wires?\b",
        r"\b(?:stent|vascular|aortic|bypass) grafts?\b",
        r"\b(?:cabg|acbg)\b",
        r"\bicd\b",
        r"\b(?:surgical|metallic) mesh\b",
    ),
    "Arterial wall calcification": (
        rf"\b{_CALC}\b[^.;,]{{0,60}}?\b{_ARTERY}",
        rf"\b{_ARTERY}[^.;,]{{0,60}}?\b{_CALC}",
    ),
    "Cardiomegaly": (
        r"\bcardiomegal\w*",
        r"\b(?:heart|cardiac) (?:size|dimensions?|contour)[^.;]*?\b(?:increased|enlarged|large)\b",
        r"\b(?:increased?|enlarged?|enlargement|large) (?:in |of )?(?:the )?(?:heart|cardiac) (?:size|dimensions?)",
        r"\benlarged heart\b",
        r"\bheart (?:is|was) (?:enlarged|larger than normal)\b",
        r"\b(?:cardiothoracic (?:ratio|index)|ctr)[^.;]{0,30}?\bincrease\w*",
        r"\bincrease\w* (?:in |of )?(?:the )?(?:cardiothoracic (?:ratio|index)|ctr)\b",
        r"\bin favou?r of the heart\b",
    ),
    "Pericardial effusion": (
        r"\bpericardial (?:\w+ )?(?:effusion|fluid)",
        r"\bpericardial thickening-effusion\b",
        r"\b(?:effusion|fluid)[^.;]*?\bpericardi\w*",
    ),
    "Coronary artery wall calcification": (
        rf"\b{_CALC}\b[^.;]*?\b{_CORONARY}",
        rf"\b{_CORONARY}[^.;]*?\b{_CALC}",
    ),
    "Hiatal hernia": (r"\bhiatal? hernia\w*", r"\bhiatus hernia\w*", r"\bhernia\w*[^.;]*?\bhiatus\b"),
    "Lymphadenopathy": (
        r"\blymphadenopath\w*",
        r"\blap\b",
        # Intrapulmonary / subpleural / fissural "lymph nodes" are lung-nodule mimics, not nodes of
        # the mediastinum, hila or axillae.
        (r"\blymph nod(?:e|es|ules?)\b", r"\b(?:intrapulmonary|subpleural|perifissural|fissur\w*)\b"),
    ),
    # CT-RATE's hand labels count subcutaneous "emphysema" (free air) here too.
    "Emphysema": (r"\bemphysem\w*", r"\bbulla\w*", r"\bbullous\b"),
    "Atelectasis": (r"\batelecta\w*",),
    "Lung nodule": (
        (
            r"\b(?:micro)?nodul(?!ar (?:consolidation|density|densities|ground|infiltrat|opacit|calcif|thicken|appearance|pattern|increase))\w*",
            r"\b(?:thyroid|spleen|splenic|liver|hepatic|breast|adrenal|schmorl|mesenter\w*|kidney|renal|pancrea\w*|lobe of the liver|thymus|mediastinum|subcutaneous|fat)\b",
        ),
    ),
    "Lung opacity": (
        r"\b(?<!acinar )(?<!micronodular )opacit\w*",
        r"\bground[- ]glass(?![- ]nodul)\w*",
        (r"\b(?:increased|increases? in|increase of) (?:\w+ )?densit\w*", _NOT_LUNG + _SCAR),
        (r"\bdensity increase\w*", _NOT_LUNG + _SCAR),
    ),
    "Pulmonary fibrotic sequela": (
        (r"\bfibro\w*", _NOT_CHEST),
        (r"\bsequel\w*", _NOT_CHEST),
        (r"\bscar\w*", _NOT_CHEST),
        r"\b(?:pleuro)?parenchymal bands?\b",
        r"\bpleuroparenchymal (?:\w+ )?(?:densit\w*|density increases?)",
        r"\bhoneycomb\w*",
    ),
    "Pleural effusion": (
        r"\bpleural (?:\w+ )?(?:effusion|fluid)",
        r"\b(?:effusion|fluid)[^.;]*?\bpleura\w*",
        r"\bhydro(?:pneumo)?thorax\b",
        r"\bhydropnomothorax\b",
        # An effusion without "pleural" but placed in a hemithorax, a lung or on a side.
        r"\b(?:bilateral|right|left)(?: (?!pericardial)\w+){0,2} effusions?\b",
        r"(?<!pericardial )\beffusions?\b[^.;]{0,40}?\b(?:hemithora\w*|lungs?)\b",
        r"\bhemithora\w*[^.;]{0,40}?\beffusions?\b",
    ),
    "Mosaic attenuation pattern": (r"\bmosaic\w*", r"\bair[- ]trapping\b"),
    "Peribronchial thickening": (
        r"\bperibronch\w* (?:\w+ ){0,2}(?:thicken\w*|thickness increase\w*|cuffing)",
        r"\bthickening of (?:the )?peribronch\w*",
        r"\bperibronch\w*[^.;]{0,30}?\bincrease\w*",
        r"\bincrease\w* (?:in |of )?(?:the )?peribronch\w*",
        r"\bbronchial wall thicken\w*",
        r"\bthickening of (?:the )?bronchial walls?\b",
    ),
    "Consolidation": (r"\bconsolidat\w*",),
    "Bronchiectasis": (r"\bbronchiecta\w*", r"\bbronchiolectas\w*"),
    "Interlobular septal thickening": (
        r"\b(?:interlobular )?sept\w* (?:\w+ )?(?:thicken\w*|thickness increase\w*)",
        r"\binterlobular sept\w*",
        r"\bthickening of (?:the )?interlobular sept\w*",
        r"\binterstitial thicken\w*",
    ),
}


# "A, then B later in the same sentence part": as one regex, ``A[^.;]*?B`` rescans the rest of
# the clause from every A, quadratic in clause length (0.9 s at 4k words, 23 s at 16k words on a
# clause full of "effusion"s without "pericardial"). ``_Near`` finds the same first match in linear
# time, so such phrases are written in this form and compiled into a ``_Near``.
_GAP = "[^.;]*?"


class _Span:
    """The part of ``re.Match`` the labeler uses."""

    def __init__(self, text: str, start: int, end: int) -> None:
        self.string, self._start, self._end = text, start, end

    def start(self) -> int:
        return self._start

    def end(self) -> int:
        return self._end

    def span(self) -> tuple[int, int]:
        return self._start, self._end

    def group(self, n: int = 0) -> str:
        if n:
            raise IndexError("no such group")
        return self.string[self._start : self._end]


class _Near:
    """``re.compile(a + "[^.;]*?" + b).search`` in linear time (the same first match).

    For each start of ``a`` in order (the regex's order), the match is the first ``b`` at or after
    the end of ``a`` if no "." or ";" lies between. The next ``b`` and the next stop are cached
    and only searched again past the point reached, so the clause is scanned a bounded number of
    times. Equivalence with the regex holds because every ``b`` here starts with ``\b`` and a
    word character, so a shorter ``a`` (backtracking) never lets a ``b`` start inside ``a``.
    """

    def __init__(self, a: str, b: str) -> None:
        self.a, self.b = re.compile(a), re.compile(b)
        self.pattern = a + _GAP + b

    def search(self, text: str) -> _Span | None:
        b_from, b_hit = -1, None  # b_hit: the first b match at or after b_from
        s_from, s_at = -1, -1  # s_at: the first "." or ";" at or after s_from (len(text): none)
        pos = 0
        while True:
            m = self.a.search(text, pos)
            if m is None:
                return None
            end = m.end()
            if not (0 <= b_from <= end and (b_hit is None or b_hit.start() >= end)):
                b_from, b_hit = end, self.b.search(text, end)
            if b_hit is None:
                return None  # no b after here: no later a can match either
            if not (0 <= s_from <= end and s_at >= end):
                s_from, s_at = end, _next_stop(text, end)
            if b_hit.start() <= s_at:
                return _Span(text, m.start(), b_hit.end())
            pos = m.start() + 1


_STOP = re.compile(r"[.;]")


def _next_stop(text: str, start: int) -> int:
    """Index of the first "." or ";" at or after ``start``; ``len(text)`` when there is none."""
    m = _STOP.search(text, start)
    return m.start() if m else len(text)


def _compile_one(pattern: str) -> re.Pattern | _Near:
    if _GAP in pattern:
        a, b = pattern.split(_GAP, 1)
        return _Near(a, b)
    return re.compile(pattern)


def _compile(phrase: str | tuple[str, str]) -> tuple[re.Pattern | _Near, re.Pattern | _Near | None]:
    """Compile a phrase and its optional veto."""
    if isinstance(phrase, tuple):
        return _compile_one(phrase[0]), _compile_one(phrase[1])
    return _compile_one(phrase), None


_COMPILED = {name: [_compile(p) for p in PHRASES[name]] for name in CLASSES}
if set(PHRASES) != set(CLASSES):
    raise RuntimeError("labeler PHRASES must name exactly the CT-RATE classes")

# Negation cues before a mention, in the same clause.
_PRE_NEGATION = re.compile(
    r"\b(?:no|without|neither|nor|absence of|free of|negative for|rule out|to exclude)\b"
)
# Negating predicates after a mention, in the same clause.
_NOT = re.compile(r"\b(?:not|no)\b")
_SCOPE_END = re.compile(r"\b(?:is|are|was|were|has|have|had|there|observed|detected|seen|noted)\b")
_NEG_VERB = (
    r"(?:observed|detected|seen|present|identified|found|visuali[sz]ed|noted|evident|monitored|distinguished)"
)
_POST_NEGATION = re.compile(
    rf"\b(?:(?:(?:was|were|is|are|has|have|had)(?: been)? not|not been|not) (?:\w+ )?{_NEG_VERB}"
    r"(?! (?:in|on) (?:the )?(?:previous|prior|former|earlier))"
    r"|absent|none|within normal limits|disappeared|(?:completely|totally) (?:regressed|resolved)"
    r"|(?:was|were|is|are|been) (?:excluded|ruled out))\b"
)
_CLAUSE_SPLIT = re.compile(r";|\bbut\b|\bhowever\b|\bwhereas\b|\balthough\b|\bapart from\b|\bother than\b")
# Sentence ends: a full stop, "?" or "!" followed by space, quote or bullet; newlines; bullets.
_SENTENCE_SPLIT = re.compile(r"(?<!\d)\.(?!\d)|[?!]\s|\n|•|·|\"")


def clauses(text: str) -> list[str]:
    """Split a report into lowercased clauses, the unit inside which negation applies."""
    out = []
    for sentence in _SENTENCE_SPLIT.split(text.lower()):
        out.extend(c.strip() for c in _CLAUSE_SPLIT.split(sentence) if c.strip())
    return out


def _negated(clause: str, start: int, end: int) -> bool:
    """Whether the mention at clause[start:end] is negated inside its clause.

    A cue before the mention negates it unless a verb or "there" stands between them ("no
    effusion was detected, there are sutures": the cue's scope ends at "was"), as in NegEx.
    """
    if _NOT.search(clause, start, end):  # "heart size is not increased"
        return True
    cues = list(_PRE_NEGATION.finditer(clause, 0, start))
    if cues and not _SCOPE_END.search(clause, cues[-1].end(), start):
        return True
    return bool(_POST_NEGATION.search(clause, end))


def mentions(text: str) -> dict[str, list[tuple[str, bool]]]:
    """Each class's mentions in a report as (clause, negated) pairs; for debugging a label."""
    found: dict[str, list[tuple[str, bool]]] = {name: [] for name in CLASSES}
    for clause in clauses(text):
        for name in CLASSES:
            for pattern, veto in _COMPILED[name]:
                match = pattern.search(clause)
                if match and not (veto and veto.search(clause)):
                    found[name].append((clause, _negated(clause, match.start(), match.end())))
                    break
    return found


def label_report(text: str) -> dict[str, int]:
    """CT-RATE's 18 classes -> 1 if the report asserts the finding anywhere, else 0."""
    found = mentions(text)
    return {name: int(any(not neg for _, neg in found[name])) for name in CLASSES}


def label_reports(texts: Iterable[str]) -> list[dict[str, int]]:
    """Label many reports; see ``label_report``."""
    return [label_report(t) for t in texts]


def clinical_efficacy(truth: list[dict[str, int]], predicted: list[dict[str, int]]) -> dict:
    """Precision, recall, F1 per class and micro/macro over classes, of predicted vs true labels.

    Keys: ``ce_micro_{precision,recall,f1}``, ``ce_macro_{precision,recall,f1}``,
    ``ce_weighted_{precision,recall,f1}`` (per-class values weighted by support, the "Weighted
    Average" of CT-CLIP's ``text_classifier/eval.py``; 0 without any true positive label) and
    ``per_class`` -> {class: {precision, recall, f1, support}}. Scale 0-1. A class with no true
    and no predicted positive has P = R = F1 = 0 and still counts in the macro mean (as in
    scikit-learn's ``zero_division=0``), so macro scores on small sets are conservative.
    """
    if len(truth) != len(predicted):
        raise ValueError(f"{len(truth)} true label rows but {len(predicted)} predicted")
    per_class = {}
    tp_all = fp_all = fn_all = 0
    for name in CLASSES:
        tp = sum(1 for t, p in zip(truth, predicted) if t[name] and p[name])
        fp = sum(1 for t, p in zip(truth, predicted) if not t[name] and p[name])
        fn = sum(1 for t, p in zip(truth, predicted) if t[name] and not p[name])
        tp_all, fp_all, fn_all = tp_all + tp, fp_all + fp, fn_all + fn
        per_class[name] = {**prf(tp, fp, fn), "support": tp + fn}
    out = {f"ce_micro_{k}": v for k, v in prf(tp_all, fp_all, fn_all).items()}
    for k in ("precision", "recall", "f1"):
        out[f"ce_macro_{k}"] = sum(c[k] for c in per_class.values()) / len(CLASSES)
    support = sum(c["support"] for c in per_class.values())
    for k in ("precision", "recall", "f1"):
        out[f"ce_weighted_{k}"] = (
            sum(c[k] * c["support"] for c in per_class.values()) / support if support else 0.0
        )
    out["per_class"] = per_class
    return out


def prf(tp: float, fp: float, fn: float) -> dict[str, float]:
    """Precision, recall and F1 from counts; 0 where undefined."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def format_scores(scores: dict) -> str:
    """A Markdown table of per-class and micro/macro P/R/F1, as printed by ``--score``."""
    lines = ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name, c in scores["per_class"].items():
        lines.append(
            f"| {name} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |"
        )
    for kind in ("micro", "macro"):
        p, r, f = (scores[f"ce_{kind}_{k}"] for k in ("precision", "recall", "f1"))
        lines.append(f"| **{kind}** | {p:.3f} | {r:.3f} | {f:.3f} | |")
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


def read_truth(path: Path) -> list[dict[str, int]]:
    """Read the 18 hand-label columns of a labelled CSV (like CT-RATE's), for ``--score``."""
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [name for name in CLASSES if name not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: --score needs the class columns; missing {missing}")
        rows = []
        for number, row in enumerate(reader, 2):
            try:
                rows.append({name: int(row[name]) for name in CLASSES})
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}: line {number}: a class column is not 0/1 ({exc})") from exc
    return rows


def read_reports(path: Path) -> tuple[str, list[str], list[str]]:
    """Read (id column name, ids, texts) from a CSV with ``report_text`` or a JSONL with ``text``."""
    if path.suffix == ".jsonl":
        ids, texts = [], []
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not a JSON line ({exc})") from exc
                if "text" not in row:
                    raise ValueError(f"{path}:{number}: missing key 'text'")
                ids.append(str(row.get("key", row.get("id", number))))
                texts.append(row["text"])
        return "key", ids, texts
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if "report_text" not in columns:
            raise ValueError(f"{path}: no 'report_text' column (columns: {columns})")
        id_column = next((c for c in ("AccessionNo", "VolumeName", "key", "id") if c in columns), None)
        ids, texts = [], []
        for number, row in enumerate(reader, 1):
            ids.append(row[id_column] if id_column else str(number))
            texts.append(row["report_text"] or "")
    return id_column or "row", ids, texts


def write_labels(path: Path, id_column: str, ids: list[str], labels: list[dict[str, int]]) -> None:
    """Write the id column and one 0/1 column per class, atomically (temp file + rename)."""
    with atomic_write(path) as f:
        writer = csv.writer(f)
        writer.writerow([id_column, *CLASSES])
        for key, row in zip(ids, labels):
            writer.writerow([key, *(row[name] for name in CLASSES)])


def main(argv: list[str] | None = None) -> None:
    """Label a CSV/JSONL of reports and write CT-RATE-style label columns."""
    parser = argparse.ArgumentParser(prog="python -m hilt_scale.labeler", description=__doc__.split("\n")[0])
    parser.add_argument("input", type=Path, help="CSV with report_text (+ id column) or JSONL with text")
    parser.add_argument("--out", type=Path, help="output CSV (id column + one 0/1 column per class)")
    parser.add_argument("--score", action="store_true", help="compare with the CSV's own class columns")
    parser.add_argument("--rows", default=":", help="with --score: a Python slice of rows, e.g. 0:400")
    args = parser.parse_args(argv)
    if args.out is None and not args.score:
        parser.error("give --out and/or --score")
    try:
        id_column, ids, texts = read_reports(args.input)
        truth = read_truth(args.input) if args.score else []
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        sys.exit(f"error: {exc}")
    labels = label_reports(texts)
    if args.out is not None:
        write_labels(args.out, id_column, ids, labels)
    summary: dict = {"reports": len(labels), "out": str(args.out) if args.out else None}
    summary["positives"] = {name: sum(row[name] for row in labels) for name in CLASSES}
    if args.score:
        start, _, stop = args.rows.partition(":")
        rows = slice(int(start) if start else None, int(stop) if stop else None)
        scores = clinical_efficacy(truth[rows], labels[rows])
        print(f"rows {args.rows} of {args.input} ({len(truth[rows])} reports)")
        print(format_scores(scores))
        summary.update({k: v for k, v in scores.items() if k != "per_class"})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
