from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from common.errors import UserError
from corpus.licences import Conditions, conditions_for, policy_violation
from corpus.sources import load_sources

DEMO = Path(__file__).resolve().parents[2] / "data" / "demo"


def _edit(path: Path, fn) -> Path:
    raw = yaml.safe_load(path.read_text())
    fn(raw)
    path.write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False))
    return path


def test_demo_sources_file_loads():
    sf = load_sources(DEMO / "sources.yaml")
    ids = [s.id for s in sf.sources]
    assert ids == ["roman19", "nouvelles19", "shakespeare", "gsm8k", "arithmetic", "edu_chat"]
    roman = sf.source("roman19")
    assert [p.name for p in roman.files][0] == "About_OreilleCassee-rd0730.txt"
    assert roman.conditions.attribution is True and roman.conditions.phases == (
        "pretrain",
        "context-extension",
        "anneal",
    )
    assert sf.source("gsm8k").stages["quality"]["min_words"] == 15  # per-source override
    assert sf.source("roman19").stages["quality"]["min_words"] == 50  # the default
    assert sf.source("edu_chat").kind == "chat"
    assert all(not str(p).endswith("test.jsonl") for s in sf.sources for p in s.files)


def test_unknown_key_is_named_with_a_suggestion(corpus_dir):
    _edit(corpus_dir, lambda r: r["sources"][0].update(licnce="MIT"))
    with pytest.raises(
        UserError, match=r"sources\.yaml: sources\[0\]: unknown key 'licnce' \(did you mean 'licence'\?\)"
    ):
        load_sources(corpus_dir)


def test_unknown_stage_param_is_named(corpus_dir):
    _edit(corpus_dir, lambda r: r["pipeline"].update(quality={"min_wrods": 3}))
    with pytest.raises(
        UserError, match=r"pipeline\.quality: unknown key 'min_wrods' \(did you mean 'min_words'\?\)"
    ):
        load_sources(corpus_dir)


def test_missing_key_is_named(corpus_dir):
    _edit(corpus_dir, lambda r: r["sources"][1].pop("domain"))
    with pytest.raises(UserError, match=r"sources\.yaml: sources\[1\]: missing key 'domain'"):
        load_sources(corpus_dir)


def test_unknown_licence(corpus_dir):
    _edit(corpus_dir, lambda r: r["sources"][1].update(licence="WTFPL-9"))
    with pytest.raises(
        UserError, match=r"sources\[qa\]\.licence: unknown licence 'WTFPL-9'; known: .*CC-BY-4\.0"
    ):
        load_sources(corpus_dir)


def test_licence_case_hint(corpus_dir):
    _edit(corpus_dir, lambda r: r["sources"][1].update(licence="mit"))
    with pytest.raises(UserError, match=r"unknown licence 'mit' \(did you mean 'MIT'\?\)"):
        load_sources(corpus_dir)


def test_licence_that_forbids_the_target(corpus_dir):
    _edit(corpus_dir, lambda r: r["sources"][1].update(licence="CC-BY-NC-4.0"))
    with pytest.raises(
        UserError,
        match=r"sources\[qa\]\.licence: CC-BY-NC-4\.0 cannot be released under Apache-2\.0: .*commercial",
    ):
        load_sources(corpus_dir)


def test_declared_conditions_cannot_loosen_the_licence(corpus_dir):
    _edit(corpus_dir, lambda r: r["sources"][1].update(conditions={"attribution": False}))
    with pytest.raises(
        UserError, match=r"sources\[qa\]\.conditions\.attribution: False is looser than licence MIT"
    ):
        load_sources(corpus_dir)


def test_missing_file(corpus_dir):
    _edit(corpus_dir, lambda r: r["sources"][1].update(paths=["nowhere/*.jsonl"]))
    with pytest.raises(UserError, match=r"sources\[qa\]\.paths: 'nowhere/\*\.jsonl': no such file"):
        load_sources(corpus_dir)


def test_gsm8k_test_split_is_never_read(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    (tmp_path / "s.yaml").write_text(
        "release: {licence: MIT}\nsources:\n  - {id: g, format: jsonl, paths: [gsm8k/test.jsonl], "
        "licence: MIT, language: en, domain: maths, url: u}\n"
    )
    with pytest.raises(UserError, match=r"gsm8k/test\.jsonl is an evaluation set"):
        load_sources(tmp_path / "s.yaml")


def test_bad_format_and_stage_that_cannot_be_disabled(corpus_dir):
    _edit(corpus_dir, lambda r: r["sources"][1].update(format="xml"))
    with pytest.raises(UserError, match=r"sources\[qa\]\.format: 'xml' is not one of"):
        load_sources(corpus_dir)
    _edit(
        corpus_dir,
        lambda r: (r["sources"][1].update(format="jsonl"), r["sources"][1].update(stages={"optout": False})),
    )
    with pytest.raises(UserError, match=r"stages\.optout: this stage cannot be turned off"):
        load_sources(corpus_dir)


def test_licence_policy_rules():
    cc_by_sa = conditions_for("CC-BY-SA-4.0", None, "x")
    assert policy_violation("CC-BY-SA-4.0", cc_by_sa, "Apache-2.0").startswith("it is share-alike")
    assert policy_violation("CC-BY-SA-4.0", cc_by_sa, "CC-BY-SA-4.0") is None
    nd = conditions_for("CC-BY-ND-4.0", None, "x")
    assert "derivatives" in policy_violation("CC-BY-ND-4.0", nd, "CC-BY-ND-4.0")
    nc = conditions_for("CC-BY-NC-4.0", None, "x")
    assert policy_violation("CC-BY-NC-4.0", nc, "CC-BY-NC-4.0") is None
    assert conditions_for("MIT", {"commercial": False}, "x") == Conditions(False, True, False, False)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("Q: {0}", "{0}: positional field; name a record field, e.g. {question}"),
        ("Q: {}", "{}: positional field; name a record field, e.g. {question}"),
        ("Q: {question.text}", "{question.text}: attribute or index lookups are not supported; name a record field"),
        ("Q: {question[0]}", "{question[0]}: attribute or index lookups are not supported; name a record field"),
        ("Q: {question!x}", "{question!x}: unknown conversion !x (use !r, !s or !a)"),
        ("Q: {question:{width}}", "{question:{width}}: nested fields in a format spec are not supported"),
        ("Q: {question", "'Q: {question' is not a valid format string (expected '}' before end of string; "
                         "write {{ and }} for braces)"),
        ("Q: question}", "'Q: question}' is not a valid format string (Single '}' encountered in format string; "
                         "write {{ and }} for braces)"),
    ],
)  # fmt: skip
def test_bad_template_is_one_error_naming_file_and_key(corpus_dir, template, message):
    _edit(corpus_dir, lambda r: r["sources"][1].update(template=template))
    with pytest.raises(UserError) as e:
        load_sources(corpus_dir)
    assert str(e.value) == f"{corpus_dir}: sources[qa].template: {message}"


def test_good_template_with_literal_braces_and_a_format_spec_loads(corpus_dir):
    _edit(corpus_dir, lambda r: r["sources"][1].update(template="{{Q}} {question!s:>3}\n{answer}"))
    assert load_sources(corpus_dir).source("qa").template == "{{Q}} {question!s:>3}\n{answer}"


def test_non_string_stage_names_in_the_order(corpus_dir):
    order = ["normalise", "quality", "langid", "toxicity", "pii", "dedup", "optout", {"licence": True}]
    _edit(corpus_dir, lambda r: r["pipeline"].update(order=order))
    with pytest.raises(UserError) as e:
        load_sources(corpus_dir)
    assert str(e.value).startswith(f"{corpus_dir}: pipeline.order: expected each of ['normalise', ")
    assert str(e.value).endswith(f"once, got {order!r}")
    _edit(corpus_dir, lambda r: r["pipeline"].update(order=[1, 2, 3]))
    with pytest.raises(UserError, match=r"pipeline\.order: expected each of .* once, got \[1, 2, 3\]$"):
        load_sources(corpus_dir)


def test_non_string_optout_is_named(corpus_dir):
    _edit(corpus_dir, lambda r: r.update(optout=["optout.jsonl"]))
    with pytest.raises(UserError) as e:
        load_sources(corpus_dir)
    assert str(e.value) == f"{corpus_dir}: optout: expected a file path, got ['optout.jsonl']"
