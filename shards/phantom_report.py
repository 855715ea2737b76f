"""Report text of the phantom: CT-RATE-style sentences from a modest set of templates per statement.

Each finding is stated with what the volume holds (side, lobe, size in mm) and every absent
finding gets a normal statement, in CT-RATE's vocabulary so a CT-RATE-trained labeler reads it.
The text is the project's own; nothing here reads CT-RATE files.

Finding kinds (``KINDS``) are finer than CT-RATE's classes: a "Lung nodule" is either a
millimetric ``small nodule`` (one HR voxel) or a ``large nodule``. ``HR_ONLY_KINDS`` are the kinds
the phantom draws too small to survive the LR downsampling (``shards.phantom`` checks it by physics
for every finding); ``read_findings`` reads the kinds back from a report (a reference or a generated
one), so finding F1 can be scored per group.
"""

from __future__ import annotations

import re

import numpy as np

# Finding kinds -> CT-RATE class. HR-only kinds are one-voxel findings (see shards.phantom).
KINDS: dict[str, str] = {
    "small nodule": "Lung nodule",
    "aortic calcification": "Arterial wall calcification",
    "coronary calcification": "Coronary artery wall calcification",
    "large nodule": "Lung nodule",
    "pleural effusion": "Pleural effusion",
    "consolidation": "Consolidation",
    "opacity": "Lung opacity",
    "emphysema": "Emphysema",
    "cardiomegaly": "Cardiomegaly",
    "pericardial effusion": "Pericardial effusion",
    "lymphadenopathy": "Lymphadenopathy",
}
HR_ONLY_KINDS: tuple[str, ...] = ("small nodule", "aortic calcification", "coronary calcification")
LR_VISIBLE_KINDS: tuple[str, ...] = tuple(k for k in KINDS if k not in HR_ONLY_KINDS)

# One sentence list per statement; the generator picks one at random (two variants each keep the
# text learnable). Placeholders are filled from the finding: {d} size, {t} thickness, {side}, {lobe}.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "airway": ("Trachea and both main bronchi are open.", "Trachea and both main bronchi are patent."),
    "cardiomegaly": (
        "The heart is enlarged (cardiomegaly).",
        "Cardiomegaly is observed; the heart size is increased.",
    ),
    "no cardiomegaly": ("Heart contour and size are normal.", "The heart size is within normal limits."),
    "pericardial": (
        "Pericardial effusion reaching {t} mm in thickness is observed.",
        "There is pericardial effusion with a thickness of {t} mm.",
    ),
    "no pericardial": ("No pericardial effusion was observed.", "Pericardial effusion was not detected."),
    "aortic calcification": (
        "Calcific atheroma plaques are observed in the thoracic aorta.",
        "There are wall calcifications in the thoracic aorta.",
    ),
    "no aortic calcification": ("Thoracic aorta diameter is normal.",),
    "coronary calcification": (
        "Calcific plaques are observed in the coronary arteries.",
        "There are wall calcifications in the coronary arteries.",
    ),
    "lymphadenopathy": (
        "Enlarged lymph nodes are observed in the {where} area, the largest with a short axis of {t} mm (lymphadenopathy).",
    ),
    "no lymphadenopathy": (
        "No enlarged lymph nodes of pathological size were detected in the mediastinum or hilar regions.",
        "There are no pathologically enlarged lymph nodes in the mediastinum.",
    ),
    "emphysema": (
        "Emphysematous changes are present in both lungs.",
        "Both lungs show emphysematous changes.",
    ),
    "nodule": (
        "A nodule measuring {d} mm is observed in the {lobe} lobe of the {side} lung.",
        "There is a {d} mm nodule in the {side} lung {lobe} lobe.",
    ),
    "small nodule": (
        "A millimetric nodule ({d} mm) is observed in the {lobe} lobe of the {side} lung.",
        "There is a millimetric nodule of {d} mm in the {side} lung {lobe} lobe.",
    ),
    "no nodule": (
        "No nodule or mass was detected in either lung.",
        "No nodular lesion was observed in both lungs.",
    ),
    "consolidation": (
        "An area of consolidation is observed in the {lobe} lobe of the {side} lung.",
        "There is consolidation in the {side} lung {lobe} lobe.",
    ),
    "opacity": (
        "Ground-glass opacities are observed in the {lobe} lobe of the {side} lung.",
        "There are ground-glass density increases in the {side} lung {lobe} lobe.",
    ),
    "no consolidation or opacity": (
        "No consolidation or ground-glass opacity was observed in the lung parenchyma.",
        "No infiltration or consolidation area was detected in the lung parenchyma.",
    ),
    "bilateral effusion": (
        "Bilateral pleural effusion is observed, measuring {r} mm on the right and {l} mm on the left in its thickest part.",
    ),
    "effusion": (
        "Pleural effusion measuring {t} mm in its thickest part is observed in the {side} hemithorax.",
        "There is {side} pleural effusion with a thickness of {t} mm.",
    ),
    "no effusion": ("No pleural effusion was detected on either side.", "Pleural effusion was not observed."),
    "abdomen": (
        "Upper abdominal organs included in the sections are normal.",
        "The upper abdominal organs in the study area are unremarkable.",
    ),
    "bones": ("Bone structures in the study area are normal.", "Vertebral corpus heights are preserved."),
    "clinical": ("Not given.", "Cough.", "Shortness of breath.", "Follow-up examination.", "Chest pain."),
}


def pick(rng: np.random.Generator, name: str, **fields) -> str:
    """One variant of a template, filled with the finding's fields."""
    options = TEMPLATES[name]
    return options[int(rng.integers(0, len(options)))].format(**fields)


def _mm(v: float) -> str:
    return f"{v:.0f}" if v >= 10 else f"{v:.1f}".rstrip("0").rstrip(".")


def write_report(findings: list[dict], rng: np.random.Generator) -> tuple[str, str]:
    """(Findings_EN, Impressions_EN) stating each finding with its side / lobe / size, normals otherwise."""
    by: dict[str, list[dict]] = {}
    for f in findings:
        by.setdefault(f["class"], []).append(f)

    def one(cls: str, yes: str, no: str | None, impression: str, **fields) -> None:
        if cls in by:
            s.append(pick(rng, yes, **fields))
            imp.append(impression)
        elif no is not None:
            s.append(pick(rng, no))

    s, imp = [pick(rng, "airway")], []
    one("Cardiomegaly", "cardiomegaly", "no cardiomegaly", "Cardiomegaly.")
    peri = by.get("Pericardial effusion", [{}])[0]
    one(
        "Pericardial effusion",
        "pericardial",
        "no pericardial",
        "Pericardial effusion.",
        t=peri.get("size_mm"),
    )
    one(
        "Arterial wall calcification",
        "aortic calcification",
        "no aortic calcification",
        "Atherosclerotic calcifications in the thoracic aorta.",
    )
    one(
        "Coronary artery wall calcification", "coronary calcification", None, "Coronary artery calcification."
    )
    ln = by.get("Lymphadenopathy", [{}])[0]
    one(
        "Lymphadenopathy",
        "lymphadenopathy",
        "no lymphadenopathy",
        "Mediastinal lymphadenopathy.",
        where=" and ".join(ln.get("stations", [])),
        t=ln.get("size_mm"),
    )
    parenchyma, s = s, []  # lung statements are gathered into one "lung parenchyma window" sentence
    one("Emphysema", "emphysema", None, "Emphysema in both lungs.")
    for f in by.get("Lung nodule", []):
        d = _mm(f["size_mm"])
        small = f.get("kind") == "small nodule"
        s.append(pick(rng, "small nodule" if small else "nodule", d=d, side=f["side"], lobe=f["lobe"]))
        imp.append(
            f"{'Millimetric ' if small else ''}{d} mm nodule in the {f['side']} lung {f['lobe']} lobe."
        )
    if "Lung nodule" not in by:
        s.append(pick(rng, "no nodule"))
    for cls, name, what in (
        ("Consolidation", "consolidation", "Consolidation"),
        ("Lung opacity", "opacity", "Ground-glass opacity"),
    ):
        for f in by.get(cls, []):
            s.append(pick(rng, name, side=f["side"], lobe=f["lobe"]))
            imp.append(f"{what} in the {f['side']} lung {f['lobe']} lobe.")
    if "Consolidation" not in by and "Lung opacity" not in by:
        s.append(pick(rng, "no consolidation or opacity"))
    s = [*parenchyma, "When examined in the lung parenchyma window; " + " ".join(s)]
    eff = sorted(by.get("Pleural effusion", []), key=lambda f: f["side"] != "right")
    if len(eff) == 2:
        s.append(pick(rng, "bilateral effusion", r=eff[0]["size_mm"], l=eff[1]["size_mm"]))
        imp.append("Bilateral pleural effusion.")
    elif eff:
        s.append(pick(rng, "effusion", side=eff[0]["side"], t=eff[0]["size_mm"]))
        imp.append(f"{eff[0]['side'].capitalize()} pleural effusion.")
    else:
        s.append(pick(rng, "no effusion"))
    s += [pick(rng, "abdomen"), pick(rng, "bones")]
    return " ".join(s), " ".join(imp) if imp else "No significant pathology was detected in the thorax."


# ---- Reading the kinds back from a report (reference or generated) ----

_NEGATION = re.compile(r"\b(?:no|not|without)\b", re.IGNORECASE)
_SIZED_NODULE = re.compile(r"\bnodule measuring \d|\b\d+(?:\.\d+)? mm nodule", re.IGNORECASE)
_KIND_PATTERNS: dict[str, tuple[re.Pattern, ...]] = {
    "aortic calcification": (re.compile(r"calci\w*[^.]*thoracic aorta", re.IGNORECASE),),
    "coronary calcification": (re.compile(r"calci\w*[^.]*coronary arter", re.IGNORECASE),),
    "pleural effusion": (re.compile(r"pleural effusion", re.IGNORECASE),),
    "consolidation": (re.compile(r"consolidation", re.IGNORECASE),),
    "opacity": (re.compile(r"ground-glass", re.IGNORECASE),),
    "emphysema": (re.compile(r"emphysema", re.IGNORECASE),),
    "cardiomegaly": (re.compile(r"cardiomegaly", re.IGNORECASE),),
    "pericardial effusion": (re.compile(r"pericardial effusion", re.IGNORECASE),),
    "lymphadenopathy": (re.compile(r"enlarged lymph nodes|lymphadenopathy", re.IGNORECASE),),
}


def sentences(text: str) -> list[str]:
    """Sentences of a report: split after '.', ';' or ':' followed by white space (keeps "2.5 mm")."""
    return [p.strip() for p in re.split(r"(?<=[.;:])\s+", text) if p.strip()]


def read_findings(text: str) -> set[str]:
    """The finding kinds a phantom-style report states as present (negated sentences say absent).

    A sentence naming a millimetric nodule is a ``small nodule``; any other sized nodule is a
    ``large nodule``. The phantom's normal statements all carry a negation ("No ...", "... was
    not detected"), so a negated sentence never counts as a finding.
    """
    found: set[str] = set()
    for sentence in sentences(text):
        if _NEGATION.search(sentence):
            continue
        if "millimetric" in sentence.lower():
            found.add("small nodule")
        elif _SIZED_NODULE.search(sentence):
            found.add("large nodule")
        for kind, patterns in _KIND_PATTERNS.items():
            if any(p.search(sentence) for p in patterns):
                found.add(kind)
    return found
