"""The sources file: which data goes in, under which licence and conditions, through which stages.

`load_sources(path)` validates the whole YAML file (unknown or missing keys are named with the file
and the key path, paths and globs are resolved relative to the file and must match something,
licences must be known) and returns a `SourcesFile`. The schema is documented in docs/corpus.md.
"""

from __future__ import annotations

import copy
import fnmatch
import glob
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.errors import UserError
from common.suggest import did_you_mean
from corpus.licences import Conditions, check_licence, conditions_for, policy_violation
from corpus.stages import DEFAULT_ORDER, STAGE_DEFAULTS

FORMATS = ("jsonl", "json", "parquet", "text", "arrow")
GENERATORS = ("arithmetic", "edu_chat")
KINDS = ("text", "chat")
ERROR_POLICIES = ("skip", "fatal")
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")

# Files that are evaluation sets: never read, whatever a sources file says.
DEFAULT_NEVER_READ = ["**/gsm8k/test*", "**/gsm8k*/test.*"]

_TOP_KEYS = {"seed", "release", "optout", "never_read", "pipeline", "split", "tokenizer", "shards", "sources"}
_SOURCE_KEYS = {
    "id", "kind", "format", "paths", "hf_dataset", "text_field", "messages_field", "id_field", "id_pattern",
    "template", "metadata", "meta_fields", "licence", "language", "domain", "url", "notice", "conditions",
    "generator", "params", "stages", "chunk_chars", "errors",
}  # fmt: skip
_PIPELINE_KEYS = {"errors", "chunk_chars", "order", *STAGE_DEFAULTS}


@dataclass
class MetadataTable:
    """Per-document metadata joined from a CSV file (e.g. author, title) by document id."""

    csv: Path
    key: str
    fields: dict[str, str]  # our name -> CSV column


@dataclass
class Source:
    id: str
    kind: str  # "text" | "chat"
    licence: str
    language: list[str]
    domain: str
    url: str
    conditions: Conditions
    notice: str | None = None
    format: str | None = None  # None for generator sources
    files: list[Path] = field(default_factory=list)
    hf_dataset: dict | None = None  # {name, config, split}: a dataset already in the local HF cache
    text_field: str = "text"
    messages_field: str = "messages"
    id_field: str | None = None
    id_pattern: re.Pattern | None = None  # for `text`: group 1 of a match on the file name is the doc id
    template: str | None = None  # str.format over the record's fields → the document's text
    metadata: MetadataTable | None = None
    meta_fields: dict[str, str] = field(default_factory=dict)  # our name -> record field (author, url)
    generator: str | None = None
    params: dict = field(default_factory=dict)
    stages: dict[str, dict] = field(default_factory=dict)  # the pipeline's stage params merged with overrides
    chunk_chars: int = 20000
    errors: str = "skip"


@dataclass
class SourcesFile:
    path: Path
    seed: int
    release_licence: str
    optout: Path | None
    never_read: list[str]
    order: list[str]
    errors: str
    chunk_chars: int
    stages: dict[str, dict]  # global stage params
    val_fraction: float
    vocab_size: int
    sample_bytes_per_source: int
    shard_max_tokens: int
    sources: list[Source]
    raw: dict = field(repr=False, default_factory=dict)  # the parsed YAML, for the manifest

    def source(self, source_id: str) -> Source:
        for s in self.sources:
            if s.id == source_id:
                return s
        raise UserError(f"{self.path}: no source {source_id!r}")


def _check_keys(mapping: Any, allowed: set[str], required: set[str], where: str) -> dict:
    if not isinstance(mapping, dict):
        raise UserError(f"{where}: expected a mapping, got {type(mapping).__name__}")
    for key in mapping:
        if key not in allowed:
            raise UserError(f"{where}: unknown key {key!r}{did_you_mean(str(key), allowed)}")
    for key in sorted(required):
        if key not in mapping:
            raise UserError(f"{where}: missing key {key!r}")
    return mapping


def check_template(template: str, where: str) -> str:
    """A `str.format` template over a record's fields: every replacement field names one field.

    Refused, naming the field: positional fields (`{}`, `{0}`), attribute or index lookups (`{a.b}`,
    `{a[0]}`), nested fields in a format spec, unknown conversions, and malformed braces (an unclosed
    `{`, a lone `}`; write `{{` and `}}` for literal braces).
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise UserError(
            f"{where}: {template!r} is not a valid format string ({e}; write {{{{ and }}}} for braces)"
        ) from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        field = "{" + name + ("!" + conversion if conversion else "") + (":" + spec if spec else "") + "}"
        if name == "" or name.isdigit():
            raise UserError(f"{where}: {field}: positional field; name a record field, e.g. {{question}}")
        if "." in name or "[" in name:
            raise UserError(
                f"{where}: {field}: attribute or index lookups are not supported; name a record field"
            )
        if conversion not in (None, "r", "s", "a"):
            raise UserError(f"{where}: {field}: unknown conversion !{conversion} (use !r, !s or !a)")
        if spec and "{" in spec:
            raise UserError(f"{where}: {field}: nested fields in a format spec are not supported")
    return template


def _typed(value: Any, types: type | tuple, where: str, what: str) -> Any:
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise UserError(f"{where}: expected {what}, got {value!r}")
    if not isinstance(value, types):
        raise UserError(f"{where}: expected {what}, got {value!r}")
    return value


def _merge_stage_params(base: dict[str, dict], overrides: Any, where: str) -> dict[str, dict]:
    """Stage params with `overrides` ({stage: {param: value}} or {stage: false}) applied, validated."""
    merged = copy.deepcopy(base)
    _check_keys(overrides, set(STAGE_DEFAULTS), set(), where)
    for stage, params in overrides.items():
        if params is False:
            if "enabled" not in STAGE_DEFAULTS[stage]:
                raise UserError(f"{where}.{stage}: this stage cannot be turned off")
            merged[stage]["enabled"] = False
            continue
        _check_keys(params, set(STAGE_DEFAULTS[stage]), set(), f"{where}.{stage}")
        for key, value in params.items():
            default = STAGE_DEFAULTS[stage][key]
            if default is not None and not isinstance(value, type(default)):
                # ints are acceptable where a float is expected
                if not (
                    isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool)
                ):
                    raise UserError(
                        f"{where}.{stage}.{key}: expected {type(default).__name__}, got {value!r}"
                    )
            merged[stage][key] = value
    return merged


def _resolve_paths(patterns: Any, base: Path, where: str, never_read: list[str]) -> list[Path]:
    _typed(patterns, list, where, "a list of paths or globs")
    files: list[Path] = []
    for pattern in patterns:
        _typed(pattern, str, where, "a path or glob")
        full = str(base / pattern)
        matches = sorted(glob.glob(full, recursive=True)) if glob.has_magic(pattern) else [full]
        matches = [m for m in matches if Path(m).is_file()]
        if not matches:
            raise UserError(f"{where}: {pattern!r}: no such file (looked for {full})")
        for m in matches:
            rel = Path(m).resolve()
            for banned in never_read:
                if fnmatch.fnmatch(str(rel), banned) or fnmatch.fnmatch(str(rel), f"*/{banned.lstrip('*/')}"):
                    raise UserError(
                        f"{where}: {m} is an evaluation set (never_read {banned!r}); never train on it"
                    )
            files.append(Path(m))
    return files


def _load_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: no such sources file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    return raw if raw is not None else {}


def _parse_source(raw: Any, i: int, top: SourcesFile, base: Path) -> Source:
    where = f"{top.path}: sources[{i}]"
    _check_keys(raw, _SOURCE_KEYS, {"id", "licence", "language", "domain", "url"}, where)
    sid = _typed(raw["id"], str, f"{where}.id", "a source id")
    if not _ID_RE.match(sid):
        raise UserError(f"{where}.id: {sid!r} must be lower-case letters, digits, '_', '-', '.'")
    where = f"{top.path}: sources[{sid}]"
    licence = check_licence(raw["licence"], f"{where}.licence")
    conditions = conditions_for(
        licence, _typed(raw.get("conditions", {}), dict, f"{where}.conditions", "a mapping"), where
    )
    language = raw["language"]
    language = [language] if isinstance(language, str) else language
    if not isinstance(language, list) or not language or not all(isinstance(x, str) for x in language):
        raise UserError(
            f"{where}.language: expected a language code or a list of them, got {raw['language']!r}"
        )
    kind = raw.get("kind", "text")
    if kind not in KINDS:
        raise UserError(f"{where}.kind: {kind!r} is not one of {list(KINDS)}")
    src = Source(
        id=sid,
        kind=kind,
        licence=licence,
        language=language,
        domain=_typed(raw["domain"], str, f"{where}.domain", "a string"),
        url=_typed(raw["url"], str, f"{where}.url", "a string"),
        conditions=conditions,
        notice=raw.get("notice"),
        chunk_chars=_typed(
            raw.get("chunk_chars", top.chunk_chars), int, f"{where}.chunk_chars", "an integer"
        ),
        errors=raw.get("errors", top.errors),
    )
    if src.errors not in ERROR_POLICIES:
        raise UserError(f"{where}.errors: {src.errors!r} is not one of {list(ERROR_POLICIES)}")
    if src.chunk_chars < 1000:
        raise UserError(f"{where}.chunk_chars: {src.chunk_chars} is too small (at least 1000)")
    origins = [k for k in ("generator", "paths", "hf_dataset") if k in raw]
    if len(origins) != 1:
        raise UserError(
            f"{where}: needs exactly one of 'paths', 'hf_dataset', 'generator' (got {origins or 'none'})"
        )
    if "generator" in raw:
        src.generator = raw["generator"]
        if src.generator not in GENERATORS:
            raise UserError(f"{where}.generator: {src.generator!r} is not one of {list(GENERATORS)}")
        src.params = _typed(raw.get("params", {}), dict, f"{where}.params", "a mapping")
        from corpus.generators import check_params

        check_params(src, base, f"{where}.params", top.never_read)
        if "format" in raw:
            raise UserError(f"{where}.format: a generator source has no format")
    else:
        if "params" in raw:
            raise UserError(f"{where}.params: only generator sources take params")
        src.format = raw.get("format")
        if "hf_dataset" in raw and src.format is None:
            src.format = "hf_dataset"  # the dataset's own builder decides
        elif src.format not in FORMATS:
            raise UserError(f"{where}.format: {src.format!r} is not one of {list(FORMATS)}")
        if "paths" in raw:
            src.files = _resolve_paths(raw["paths"], base, f"{where}.paths", top.never_read)
        else:
            hf = _check_keys(raw["hf_dataset"], {"name", "config", "split"}, {"name"}, f"{where}.hf_dataset")
            src.hf_dataset = {
                "name": hf["name"],
                "config": hf.get("config"),
                "split": hf.get("split", "train"),
            }
            if "test" in str(src.hf_dataset["split"]):
                raise UserError(
                    f"{where}.hf_dataset.split: {src.hf_dataset['split']!r} is an evaluation split"
                )
        for key in ("text_field", "messages_field", "id_field"):
            if key in raw:
                setattr(src, key, _typed(raw[key], str, f"{where}.{key}", "a field name"))
        if "template" in raw:
            src.template = check_template(
                _typed(raw["template"], str, f"{where}.template", "a format string"), f"{where}.template"
            )
            if kind == "chat":
                raise UserError(f"{where}.template: chat sources take their `messages_field`, not a template")
        if "id_pattern" in raw:
            if src.format != "text":
                raise UserError(f"{where}.id_pattern: only for format 'text' (one document per file)")
            try:
                src.id_pattern = re.compile(raw["id_pattern"])
            except (re.error, TypeError) as e:
                raise UserError(f"{where}.id_pattern: not a valid regex: {e}") from None
            if src.id_pattern.groups != 1:
                raise UserError(f"{where}.id_pattern: needs exactly one group (the document id)")
        if "metadata" in raw:
            m = _check_keys(
                raw["metadata"], {"csv", "key", "fields"}, {"csv", "key", "fields"}, f"{where}.metadata"
            )
            csv_path = base / m["csv"]
            if not csv_path.is_file():
                raise UserError(f"{where}.metadata.csv: {m['csv']!r}: no such file (looked for {csv_path})")
            src.metadata = MetadataTable(
                csv_path, m["key"], _typed(m["fields"], dict, f"{where}.metadata.fields", "a mapping")
            )
        if "meta_fields" in raw:
            src.meta_fields = _typed(raw["meta_fields"], dict, f"{where}.meta_fields", "a mapping")
    src.stages = _merge_stage_params(top.stages, raw.get("stages", {}), f"{where}.stages")
    violation = policy_violation(licence, conditions, top.release_licence)
    if violation:
        raise UserError(
            f"{where}.licence: {licence} cannot be released under {top.release_licence}: {violation}"
        )
    return src


def load_sources(path: str | Path) -> SourcesFile:
    """Parse and validate a sources file; every error names the file and the key."""
    path = Path(path)
    raw = _load_yaml(path)
    _check_keys(raw, _TOP_KEYS, {"sources", "release"}, str(path))
    base = path.parent
    release = _check_keys(raw["release"], {"licence"}, {"licence"}, f"{path}: release")
    pipeline = _check_keys(raw.get("pipeline", {}), _PIPELINE_KEYS, set(), f"{path}: pipeline")
    split = _check_keys(raw.get("split", {}), {"val_fraction"}, set(), f"{path}: split")
    tok = _check_keys(
        raw.get("tokenizer", {}), {"vocab_size", "sample_bytes_per_source"}, set(), f"{path}: tokenizer"
    )
    shards = _check_keys(raw.get("shards", {}), {"max_tokens"}, set(), f"{path}: shards")
    order = pipeline.get("order", list(DEFAULT_ORDER))
    if (
        not isinstance(order, list)
        or not all(isinstance(name, str) for name in order)
        or sorted(order) != sorted(DEFAULT_ORDER)
    ):
        raise UserError(f"{path}: pipeline.order: expected each of {list(DEFAULT_ORDER)} once, got {order!r}")
    if order.index("normalise") != 0:
        raise UserError(
            f"{path}: pipeline.order: 'normalise' must come first (the other stages expect NFC text)"
        )
    never_read = raw.get("never_read", DEFAULT_NEVER_READ)
    top = SourcesFile(
        path=path,
        seed=_typed(raw.get("seed", 0), int, f"{path}: seed", "an integer"),
        release_licence=check_licence(release["licence"], f"{path}: release.licence"),
        optout=(base / _typed(raw["optout"], str, f"{path}: optout", "a file path"))
        if raw.get("optout") is not None
        else None,
        never_read=_typed(never_read, list, f"{path}: never_read", "a list of globs"),
        order=order,
        errors=pipeline.get("errors", "skip"),
        chunk_chars=_typed(
            pipeline.get("chunk_chars", 20000), int, f"{path}: pipeline.chunk_chars", "an integer"
        ),
        stages=_merge_stage_params(
            STAGE_DEFAULTS, {k: v for k, v in pipeline.items() if k in STAGE_DEFAULTS}, f"{path}: pipeline"
        ),
        val_fraction=float(
            _typed(split.get("val_fraction", 0.02), (int, float), f"{path}: split.val_fraction", "a number")
        ),
        vocab_size=_typed(tok.get("vocab_size", 8192), int, f"{path}: tokenizer.vocab_size", "an integer"),
        sample_bytes_per_source=_typed(
            tok.get("sample_bytes_per_source", 2_000_000),
            int,
            f"{path}: tokenizer.sample_bytes_per_source",
            "an integer",
        ),
        shard_max_tokens=_typed(
            shards.get("max_tokens", 1 << 24), int, f"{path}: shards.max_tokens", "an integer"
        ),
        sources=[],
        raw=raw,
    )
    if top.optout is not None and not top.optout.is_file():
        raise UserError(
            f"{path}: optout: {raw['optout']!r}: no such file (create it empty, or with `communs data optout add`)"
        )
    if top.errors not in ERROR_POLICIES:
        raise UserError(f"{path}: pipeline.errors: {top.errors!r} is not one of {list(ERROR_POLICIES)}")
    if not 0.0 <= top.val_fraction < 1.0:
        raise UserError(f"{path}: split.val_fraction: {top.val_fraction} is not in [0, 1)")
    if top.shard_max_tokens < 1024:
        raise UserError(f"{path}: shards.max_tokens: {top.shard_max_tokens} is too small (at least 1024)")
    raw_sources = _typed(raw["sources"], list, f"{path}: sources", "a list of sources")
    if not raw_sources:
        raise UserError(f"{path}: sources: the list is empty")
    for i, rs in enumerate(raw_sources):
        src = _parse_source(rs, i, top, base)
        if any(s.id == src.id for s in top.sources):
            raise UserError(f"{path}: sources[{i}].id: {src.id!r} is declared twice")
        top.sources.append(src)
    return top
