"""Few-shot labels: the limits on `examples`, the label template, and the generative prompt."""

from __future__ import annotations

import pytest

from postroom.domain import Label
from postroom.errors import InvalidInput, InvalidLabels
from postroom.labels import validate_label_template, validate_labels
from postroom.prompts import instructions_text, label_texts
from postroom.settings import Settings

SETTINGS = Settings(max_label_examples=3, max_example_length=40, max_examples_total=5)


def _reasons(error: InvalidInput) -> str:
    return " | ".join(str(d["reason"]) for d in error.details)


def test_examples_within_the_limits_are_kept_with_spaces_collapsed() -> None:
    labels = validate_labels(
        [Label(name="sports", examples=("A  late\ngoal wins it",)), "politics"], settings=SETTINGS
    )
    assert labels[0].examples == ("A late goal wins it",)
    assert labels[1].examples is None


def test_each_broken_limit_names_the_label_and_the_fix() -> None:
    raw: list[str | Label] = [
        Label(name="sports", examples=("a", "b", "c", "d")),
        Label(name="politics", examples=("x" * 41, " ")),
    ]
    with pytest.raises(InvalidLabels) as caught:
        validate_labels(raw, settings=SETTINGS)
    reasons = _reasons(caught.value)
    assert "label 'sports' has 4 examples; the limit is 3 per label" in reasons
    assert "example 0 of label 'politics' is 41 characters; shorten it to 40" in reasons
    assert "example 1 of label 'politics' is empty" in reasons
    assert "6 examples in all; a job may carry at most 5" in reasons
    fields = [d["field"] for d in caught.value.details]
    assert "labels[0].examples" in fields
    assert "labels[1].examples[0]" in fields


def test_label_template_default_and_checks() -> None:
    assert validate_label_template(None, settings=SETTINGS) == SETTINGS.embedding_label_template
    assert validate_label_template("A news article about {name}.", settings=SETTINGS)
    for bad, needle in [
        ("about it", "must contain {name}"),
        ("{name} in {place}", "only placeholder may be {name}"),
        ("{name}" + "x" * 300, "over 200 characters"),
    ]:
        with pytest.raises(InvalidInput, match=needle.replace("{", r"\{").replace("}", r"\}")):
            validate_label_template(bad, settings=SETTINGS)


def test_label_texts_use_the_template_only_where_there_is_no_description() -> None:
    labels = [Label(name="sports"), Label(name="tech", description="Gadgets and software.")]
    assert label_texts(labels, "A news article about {name}.") == [
        "A news article about sports.",
        "Gadgets and software.",
    ]
    assert label_texts(labels) == ["sports", "Gadgets and software."]


def test_generative_prefix_carries_the_examples_with_their_answers() -> None:
    labels = [
        Label(name="sports", examples=('He said "goal"', "Cup final")),
        Label(name="politics"),
    ]
    text = instructions_text(labels, "Classify.")
    assert 'Text: "He said \\"goal\\""\nLabel: sports' in text
    assert 'Text: "Cup final"\nLabel: sports' in text
    assert text.index("Examples:") < text.index("Answer with")
    marked = instructions_text(labels, "Classify.", ["A", "B"])
    assert 'Text: "Cup final"\nLabel: A' in marked
    assert "Examples:" not in instructions_text([Label(name="a"), Label(name="b")], "Classify.")
