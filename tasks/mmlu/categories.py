"""The original MMLU grouping: 57 subjects -> 17 subcategories -> 4 categories.

Transcribed from ``categories.py`` of the original MMLU repository (Hendrycks et al., ICLR 2021), the
same mapping that ``shared/data/mmlu/categories.json`` holds as data.  The project keeps its own copy so
that results never depend on a data folder's side file, and it is *not* lm-eval's grouping: lm-eval's
``mmlu_stem`` etc. put some subjects elsewhere (e.g. anatomy is STEM in lm-eval, but "health" ->
"other (business, health, misc.)" here).  Every aggregate of the study uses this mapping.
"""
from __future__ import annotations

from types import MappingProxyType

#: subject -> subcategory (the original lists have exactly one subcategory per subject).
_SUBJECT_TO_SUBCATEGORY = MappingProxyType({
    "abstract_algebra": "math",
    "anatomy": "health",
    "astronomy": "physics",
    "business_ethics": "business",
    "clinical_knowledge": "health",
    "college_biology": "biology",
    "college_chemistry": "chemistry",
    "college_computer_science": "computer science",
    "college_mathematics": "math",
    "college_medicine": "health",
    "college_physics": "physics",
    "computer_security": "computer science",
    "conceptual_physics": "physics",
    "econometrics": "economics",
    "electrical_engineering": "engineering",
    "elementary_mathematics": "math",
    "formal_logic": "philosophy",
    "global_facts": "other",
    "high_school_biology": "biology",
    "high_school_chemistry": "chemistry",
    "high_school_computer_science": "computer science",
    "high_school_european_history": "history",
    "high_school_geography": "geography",
    "high_school_government_and_politics": "politics",
    "high_school_macroeconomics": "economics",
    "high_school_mathematics": "math",
    "high_school_microeconomics": "economics",
    "high_school_physics": "physics",
    "high_school_psychology": "psychology",
    "high_school_statistics": "math",
    "high_school_us_history": "history",
    "high_school_world_history": "history",
    "human_aging": "health",
    "human_sexuality": "culture",
    "international_law": "law",
    "jurisprudence": "law",
    "logical_fallacies": "philosophy",
    "machine_learning": "computer science",
    "management": "business",
    "marketing": "business",
    "medical_genetics": "health",
    "miscellaneous": "other",
    "moral_disputes": "philosophy",
    "moral_scenarios": "philosophy",
    "nutrition": "health",
    "philosophy": "philosophy",
    "prehistory": "history",
    "professional_accounting": "other",
    "professional_law": "law",
    "professional_medicine": "health",
    "professional_psychology": "psychology",
    "public_relations": "politics",
    "security_studies": "politics",
    "sociology": "culture",
    "us_foreign_policy": "politics",
    "virology": "health",
    "world_religions": "philosophy",
})

#: category -> its subcategories, in the original order.
_CATEGORY_TO_SUBCATEGORIES = MappingProxyType({
    "STEM": ("physics", "chemistry", "biology", "computer science", "math", "engineering"),
    "humanities": ("history", "philosophy", "law"),
    "social sciences": ("politics", "culture", "economics", "geography", "psychology"),
    "other (business, health, misc.)": ("other", "business", "health"),
})

_SUBCATEGORY_TO_CATEGORY = MappingProxyType(
    {sub: cat for cat, subs in _CATEGORY_TO_SUBCATEGORIES.items() for sub in subs}
)

#: The 57 subjects, sorted (the order of the released ``test/`` folder listing).
SUBJECTS: tuple[str, ...] = tuple(sorted(_SUBJECT_TO_SUBCATEGORY))
#: The 17 subcategories, grouped by category in the original order.
SUBCATEGORIES: tuple[str, ...] = tuple(s for subs in _CATEGORY_TO_SUBCATEGORIES.values() for s in subs)
#: The 4 categories: STEM, humanities, social sciences, other (business, health, misc.).
CATEGORIES: tuple[str, ...] = tuple(_CATEGORY_TO_SUBCATEGORIES)


def _check(subject: str) -> str:
    if subject not in _SUBJECT_TO_SUBCATEGORY:
        raise KeyError(f"unknown MMLU subject {subject!r}; allowed: {', '.join(SUBJECTS)}")
    return subject


def subcategory(subject: str) -> str:
    """The original subcategory of ``subject`` (e.g. anatomy -> "health")."""
    return _SUBJECT_TO_SUBCATEGORY[_check(subject)]


def category(subject: str) -> str:
    """The original category of ``subject`` (e.g. anatomy -> "other (business, health, misc.)")."""
    return _SUBCATEGORY_TO_CATEGORY[subcategory(subject)]


def subcategories_of(category_name: str) -> tuple[str, ...]:
    """The subcategories of one category, in the original order."""
    return _CATEGORY_TO_SUBCATEGORIES[category_name]


def subject_to_subcategory() -> dict[str, str]:
    """A copy of the whole subject -> subcategory mapping."""
    return dict(_SUBJECT_TO_SUBCATEGORY)


def subcategory_to_category() -> dict[str, str]:
    """A copy of the whole subcategory -> category mapping."""
    return dict(_SUBCATEGORY_TO_CATEGORY)
