"""The per-document stages of the curation pipeline, each a plain function.

A stage takes a `Doc` (modifying its text for the transforming stages) and its parameters, and
returns None to keep the document or the name of the rule that removes it (e.g.
"quality.min_words"). Parameters come from the sources file (`pipeline.<stage>`, overridden per
source under `sources[i].stages`); `STAGE_DEFAULTS` lists every parameter a stage takes.
The global stage (dedup) lives in corpus/dedup.py and corpus/pipeline.py.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import ipaddress
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from corpus.licences import LICENCES, Conditions, policy_violation

DEFAULT_ORDER = ("normalise", "quality", "langid", "toxicity", "pii", "dedup", "optout", "licence")

# Bump a stage's version when its behaviour changes: it is written into the manifest.
STAGE_VERSIONS = {
    "normalise": 1, "quality": 2, "langid": 1, "toxicity": 1, "pii": 1, "dedup": 1, "optout": 1, "licence": 2,
}  # fmt: skip

STAGE_DEFAULTS: dict[str, dict] = {
    "normalise": {"enabled": True, "form": "NFC", "max_blank_lines": 1},
    # Gopher (Rae et al. 2021) and C4 heuristics; thresholds are theirs unless noted.
    "quality": {
        "enabled": True,
        "min_words": 50,
        "max_words": 100_000,
        "min_mean_word_length": 3.0,
        "max_mean_word_length": 10.0,
        "max_symbol_word_ratio": 0.1,  # '#' and '…' / '...' per word
        "max_bullet_lines": 0.9,
        "max_ellipsis_lines": 0.3,
        "min_alpha_words": 0.8,  # words holding at least one letter
        "max_digit_ratio": 0.15,  # digits / characters (C4-style; off for maths with 1.0)
        "min_stop_words": 2,  # stop words of the source's languages (fr, en)
        "max_dup_line_fraction": 0.3,
        "max_dup_line_char_fraction": 0.2,
        "max_top_2gram": 0.2,
        "max_top_3gram": 0.18,
        "max_top_4gram": 0.16,
        "max_dup_5gram": 0.15,
        "max_dup_7gram": 0.13,
        "max_dup_10gram": 0.10,
    },
    "langid": {"enabled": True, "min_prob": 0.5, "max_chars": 1000},
    "toxicity": {"enabled": True, "wordlist": "default", "max_ratio": 0.002, "min_count": 3},
    "pii": {"enabled": True, "kinds": ["email", "phone", "iban", "nir", "ip"], "replacement": "<{KIND}>"},
    "dedup": {"enabled": True, "exact": True, "near": True, "threshold": 0.8, "num_perm": 128, "shingle": 5},
    # Opt-out and the licence policy cannot be turned off: they take no parameters.
    "optout": {},
    "licence": {},
}


def content_text(text: str | None, messages: list[dict] | None) -> str:
    """What the filters look at and the tokenizer samples: the text, or a chat's message contents one
    per line."""
    if messages is None:
        return text or ""
    return "\n".join(m["content"] for m in messages)


@dataclass
class Doc:
    """One document (or chunk of a long one) on its way through the pipeline."""

    id: str
    source: str
    parent: str  # id of the document it was cut from (itself when not chunked)
    raw_sha256: str  # sha256 of the parent document's text as read (opt-out by content hash)
    text: str | None = None  # kind "text"
    messages: list[dict] | None = None  # kind "chat": [{"role", "content"}]
    meta: dict = field(default_factory=dict)  # author, title, url … (from metadata.csv or fields)
    pii: dict[str, int] = field(default_factory=dict)

    def content(self) -> str:
        """The text the filters look at (a chat's message contents, one per line)."""
        return content_text(self.text, self.messages)

    def map_text(self, fn) -> None:
        if self.messages is None:
            self.text = fn(self.text or "")
        else:
            self.messages = [{**m, "content": fn(m["content"])} for m in self.messages]

    def sha256(self) -> str:
        """Hash of the final text; for chat documents, of the roles and contents."""
        if self.messages is None:
            data = (self.text or "").encode("utf-8")
        else:
            data = "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in self.messages).encode("utf-8")
        return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------ normalise

# Line separators other than \n (NEL, LINE/PARAGRAPH SEPARATOR, lone CR) all become \n.
_LINE_BREAKS = re.compile(r"\r\n|[\r\x85\u2028\u2029\x0b\x0c]")
# Control and format characters that carry nothing (keep \n and \t, turned into space below).
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f\u200b\ufeff]")
_SPACES = re.compile(r"[ \t]+")


_SPACES_AROUND_NEWLINE = re.compile(r" *\n *")


def normalise_text(text: str, form: str = "NFC", max_blank_lines: int = 1) -> str:
    text = unicodedata.normalize(form, text)
    text = _CONTROL.sub("", _LINE_BREAKS.sub("\n", text))
    text = _SPACES_AROUND_NEWLINE.sub("\n", _SPACES.sub(" ", text))
    text = re.sub(f"\n{{{max_blank_lines + 2},}}", "\n" * (max_blank_lines + 1), text)
    return text.strip(" \n")


def normalise(doc: Doc, p: dict, ctx: StageContext) -> str | None:
    doc.map_text(lambda t: normalise_text(t, p["form"], p["max_blank_lines"]))
    if not doc.content().strip():
        return "normalise.empty"
    return None


# -------------------------------------------------------------------------------------- quality

STOP_WORDS = {
    "fr": set(
        "le la les de des du un une et est en que qui dans pour pas sur au aux il elle ils elles "
        "ne se ce son sa ses par plus avec nous vous je tu on mais ou donc car cette été être a".split()
    ),
    "en": set(
        "the be to of and that have with a an in is it for not on as was are this by from at "
        "or his her but they we you he she".split()
    ),
}
_BULLET = re.compile(r"^\s*[-*•‣◦▪–]\s")
# A whitespace-separated word holding no letter ([^\W\d_]): only non-word characters, digits and "_".
# Counting these (rare) and subtracting from the word count is cheaper than matching the words with one.
_LETTERLESS_WORD = re.compile(r"(?<!\S)(?:[^\w\s]|[\d_])+(?!\S)")
_DIGITS = re.compile(r"\d+")  # runs of digits: far fewer matches than digits, the same count
_WORD = re.compile(r"\w+(?:['’]\w+)*")


def _ngram_ids(word_ids: np.ndarray, sizes: tuple[int, ...]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """For each n in `sizes`: an id per n-gram (equal exactly when the n-grams are equal) and, per id,
    the position of its first occurrence.

    Exact, no hashing: the ids of the (k-1)-grams and the next word's id are packed into one integer
    (both are below the number of words, so it fits in 64 bits) and renumbered by np.unique.
    """
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    n = len(word_ids)
    cur = word_ids.astype(np.int64)
    base = np.int64(int(cur.max()) + 1) if n else np.int64(1)
    for k in range(2, max(sizes) + 1):
        if n < k:
            break
        _, first, cur = np.unique(cur[:-1] * base + word_ids[k - 1 :], return_index=True, return_inverse=True)
        cur = cur.reshape(-1)
        if k in sizes:
            out[k] = (cur, first)
    return out


def _covered(starts: np.ndarray, size: int, n_words: int) -> np.ndarray:
    """Which of `n_words` words lie inside an n-gram of `size` words starting where `starts` is True."""
    return np.convolve(starts.astype(np.int64), np.ones(size, dtype=np.int64))[:n_words] > 0


def _top_share(grams: tuple[np.ndarray, np.ndarray], lengths: np.ndarray, size: int) -> float:
    ids, first = grams
    counts = np.bincount(ids)
    best = counts.max()
    if best < 2:
        return 0.0
    top = np.flatnonzero(counts == best)
    top = top[np.argmin(first[top])]
    return float(lengths[_covered(ids == top, size, len(lengths))].sum() / lengths.sum())


def top_ngram_char_share(word_ids: np.ndarray, lengths: np.ndarray, size: int) -> float:
    """Gopher's "top n-gram" share: the characters (of words) covered by the occurrences of the most
    frequent `size`-gram, each character counted once where occurrences overlap ("a a a" holds the
    2-gram "a a" twice but covers 3 words), over all word characters. 0 when no n-gram repeats.

    `word_ids`: one integer per word, equal exactly for equal words. Ties between equally frequent
    n-grams go to the one that occurs first in the text.
    """
    if len(word_ids) < size:
        return 0.0
    return _top_share(_ngram_ids(np.asarray(word_ids), (size,))[size], lengths, size)


_TOP_SIZES, _DUP_SIZES = (2, 3, 4), (5, 7, 10)


def alpha_word_count(text: str, n_words: int) -> int:
    """How many of the `n_words` whitespace-separated words of `text` hold a letter ([^\\W\\d_])."""
    return n_words - len(_LETTERLESS_WORD.findall(text))


def digit_count(text: str) -> int:
    """How many characters of `text` are (Unicode decimal) digits."""
    return sum(map(len, _DIGITS.findall(text)))


def quality_rule(text: str, p: dict, languages: list[str]) -> str | None:
    """The first Gopher/C4 rule that `text` breaks, or None."""
    words = text.split()
    n = len(words)
    if n < p["min_words"]:
        return "quality.min_words"
    if n > p["max_words"]:
        return "quality.max_words"
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=n)
    mean_len = lengths.mean()
    if not p["min_mean_word_length"] <= mean_len <= p["max_mean_word_length"]:
        return "quality.mean_word_length"
    symbols = text.count("#") + text.count("…") + text.count("...")
    if symbols / n > p["max_symbol_word_ratio"]:
        return "quality.symbol_ratio"
    lines = [line for line in text.split("\n") if line.strip()]
    if lines:
        if sum(1 for line in lines if _BULLET.match(line)) / len(lines) > p["max_bullet_lines"]:
            return "quality.bullet_lines"
        if (
            sum(1 for line in lines if line.rstrip().endswith(("…", "..."))) / len(lines)
            > p["max_ellipsis_lines"]
        ):
            return "quality.ellipsis_lines"
        seen: set[str] = set()
        dup_lines = dup_chars = 0
        for line in lines:
            if line in seen:
                dup_lines += 1
                dup_chars += len(line)
            seen.add(line)
        if dup_lines / len(lines) > p["max_dup_line_fraction"]:
            return "quality.dup_lines"
        if dup_chars / max(1, sum(len(line) for line in lines)) > p["max_dup_line_char_fraction"]:
            return "quality.dup_line_chars"
    if alpha_word_count(text, n) / n < p["min_alpha_words"]:
        return "quality.alpha_words"
    if digit_count(text) / max(1, len(text)) > p["max_digit_ratio"]:
        return "quality.digit_ratio"
    stop = set().union(*(STOP_WORDS.get(lang, set()) for lang in languages))
    if stop:
        hits = sum(map(stop.__contains__, _WORD.findall(text.lower())))
        if hits < p["min_stop_words"]:
            return "quality.stop_words"
    # Repetition (Gopher). Words get stable ids (numbered in order of first appearance) and n-grams
    # are compared exactly: the outcome depends on the text alone, never on a process's salted hash.
    index = {w: i for i, w in enumerate(dict.fromkeys(words))}  # a loop over distinct words only
    ids = np.fromiter(map(index.__getitem__, words), dtype=np.int64, count=n)
    grams = _ngram_ids(ids, _TOP_SIZES + _DUP_SIZES)
    total_chars = lengths.sum()
    for size in _TOP_SIZES:
        if size in grams and _top_share(grams[size], lengths, size) > p[f"max_top_{size}gram"]:
            return f"quality.top_{size}gram"
    for size in _DUP_SIZES:
        if size in grams:
            gram_ids, first = grams[size]
            repeated = np.ones(len(gram_ids), dtype=bool)
            repeated[first] = False  # first occurrences are not duplicates
            if lengths[_covered(repeated, size, n)].sum() / total_chars > p[f"max_dup_{size}gram"]:
                return f"quality.dup_{size}gram"
    return None


def quality(doc: Doc, p: dict, ctx: StageContext) -> str | None:
    return quality_rule(doc.content(), p, ctx.languages)


# --------------------------------------------------------------------------------------- langid


@functools.cache
def _language_identifier():
    # py3langid ships its model in the wheel: nothing is downloaded.
    from py3langid.langid import MODEL_DIR, MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_modelpath(Path(MODEL_DIR) / MODEL_FILE, norm_probs=True)


def detect_language(text: str, max_chars: int = 1000) -> tuple[str, float]:
    lang, prob = _language_identifier().classify(text[:max_chars])
    return str(lang), float(prob)


def langid(doc: Doc, p: dict, ctx: StageContext) -> str | None:
    lang, prob = detect_language(doc.content(), p["max_chars"])
    if lang not in ctx.languages:
        return "langid.other_language"
    if prob < p["min_prob"]:
        return "langid.low_confidence"
    return None


# ------------------------------------------------------------------------------------- toxicity

DEFAULT_WORDLIST = Path(__file__).with_name("data") / "toxic_words.txt"
_COMBINING = re.compile(r"[\u0300-\u036f]")


def _fold(text: str) -> str:
    """Lower-case without accents, so that 'Pédé' and 'pede' match the same list entry."""
    return _COMBINING.sub("", unicodedata.normalize("NFD", text.lower()))


@functools.cache
def load_wordlist(path: str) -> frozenset[str]:
    words = set()
    for line in Path(path).read_text(encoding="utf-8").split("\n"):
        line = line.split("#", 1)[0].strip()
        if line:
            words.add(_fold(line))
    return frozenset(words)


def wordlist_path(p: dict, base: Path | None = None) -> Path:
    if p["wordlist"] == "default":
        return DEFAULT_WORDLIST
    path = Path(p["wordlist"])
    return path if path.is_absolute() or base is None else base / path


def toxicity(doc: Doc, p: dict, ctx: StageContext) -> str | None:
    listed = load_wordlist(str(ctx.wordlist))
    words = _WORD.findall(_fold(doc.content()))
    hits = sum(map(listed.__contains__, words))
    if hits >= p["min_count"] and hits / max(1, len(words)) > p["max_ratio"]:
        return "toxicity.wordlist"
    return None


# ------------------------------------------------------------------------------------------ PII

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# IBAN: country, check digits, then 11–30 alphanumerics, optionally in groups of 4.
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,4})?\b")
# NIR (French social security number): sex, year, month, department (2A/2B for Corsica),
# commune, order, then the 2-digit key.
_NIR = re.compile(
    r"\b[12][ .]?\d{2}[ .]?(?:0[1-9]|1[0-2]|[2-9]\d)[ .]?(?:\d{2}|2[AB])[ .]?\d{3}[ .]?\d{3}[ .]?(\d{2})\b"
)
# French numbers: 0X XX XX XX XX, +33 X XX XX XX XX, 0033 …; international: + then 7–15 digits.
_PHONE_FR = re.compile(r"(?<![\w+])(?:(?:\+|00)33[ .-]?(?:\(0\)[ .-]?)?|0)[1-9](?:[ .-]?\d{2}){4}(?!\d)")
_PHONE_INTL = re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}(?!\d)")
_IPV4 = re.compile(
    r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.])"
)
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")


def iban_valid(candidate: str) -> bool:
    """ISO 13616 check: move the first 4 characters to the end, letters → numbers, mod 97 == 1."""
    s = candidate.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    digits = "".join(str(int(c, 36)) for c in s[4:] + s[:4])
    return int(digits) % 97 == 1


def nir_valid(candidate: str) -> bool:
    """The key is 97 − (the 13 first digits mod 97); Corsica's 2A/2B count as 19/18."""
    s = re.sub(r"[ .]", "", candidate)
    body, key = s[:13], s[13:]
    body = body.replace("2A", "19").replace("2B", "18")
    return len(key) == 2 and body.isdigit() and 97 - int(body) % 97 == int(key)


def _ipv6_valid(candidate: str) -> bool:
    if candidate.count(":") < 2 or not any(c.isalnum() for c in candidate):
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


# Order matters: IBANs and NIRs contain digit runs that the phone patterns would also take.
# Each pattern comes with a cheap hint: when the hint is absent from a text (most prose), the
# pattern (slow: look-behinds at every position) is not run at all.
_DIGIT_RUN = re.compile(r"\d[\d .()-]{5,}\d")
_PII_PATTERNS = [
    ("email", _EMAIL, None, re.compile("@")),
    ("iban", _IBAN, iban_valid, re.compile(r"[A-Z]{2}\d{2}")),
    ("nir", _NIR, nir_valid, _DIGIT_RUN),
    ("ip", _IPV6, _ipv6_valid, re.compile(r"[0-9A-Fa-f]{0,4}:[0-9A-Fa-f]{0,4}:")),
    ("ip", _IPV4, None, re.compile(r"\d\.\d{1,3}\.\d{1,3}\.\d")),
    ("phone", _PHONE_FR, None, _DIGIT_RUN),
    ("phone", _PHONE_INTL, lambda s: 7 <= sum(c.isdigit() for c in s) <= 15, re.compile(r"\+\d")),
]


def redact_pii(text: str, kinds: list[str], replacement: str = "<{KIND}>") -> tuple[str, dict[str, int]]:
    """Replace each PII match by `replacement` (formatted with kind / KIND); count them per kind."""
    counts: dict[str, int] = {}
    for kind, pattern, valid, hint in _PII_PATTERNS:
        if kind not in kinds or not hint.search(text):
            continue

        def sub(m: re.Match, kind=kind, valid=valid) -> str:
            if valid is not None and not valid(m.group(0)):
                return m.group(0)
            counts[kind] = counts.get(kind, 0) + 1
            return replacement.format(kind=kind, KIND=kind.upper())

        text = pattern.sub(sub, text)
    return text, counts


def pii(doc: Doc, p: dict, ctx: StageContext) -> str | None:
    def redact(text: str) -> str:
        text, counts = redact_pii(text, p["kinds"], p["replacement"])
        for kind, n in counts.items():
            doc.pii[kind] = doc.pii.get(kind, 0) + n
        return text

    doc.map_text(redact)
    return None


# --------------------------------------------------------------------------------------- opt-out


@dataclass(frozen=True)
class OptOutSet:
    """Opt-out entries, grouped for fast matching."""

    doc_ids: frozenset[str] = frozenset()
    sha256: frozenset[str] = frozenset()
    authors: frozenset[str] = frozenset()  # case-folded
    urls: tuple[str, ...] = ()  # fnmatch patterns on the full URL
    domains: tuple[str, ...] = ()  # fnmatch patterns on the host name

    def match(
        self, doc_id: str, parent: str, shas: tuple[str, ...], author: str | None, url: str | None
    ) -> str | None:
        """The opt-out rule matching this document, or None."""
        if doc_id in self.doc_ids or parent in self.doc_ids:
            return "optout.doc_id"
        if any(s in self.sha256 for s in shas):
            return "optout.sha256"
        if author and author.casefold() in self.authors:
            return "optout.author"
        if url:
            if any(fnmatch.fnmatch(url, pat) for pat in self.urls):
                return "optout.url"
            host = urlsplit(url).hostname or ""
            if any(fnmatch.fnmatch(host, pat) for pat in self.domains):
                return "optout.domain"
        return None


def optout(doc: Doc, p: dict, ctx: StageContext) -> str | None:
    return ctx.optout.match(
        doc.id, doc.parent, (doc.sha256(), doc.raw_sha256), doc.meta.get("author"), doc.meta.get("url")
    )


# ------------------------------------------------------------------------------------- registry


@dataclass
class StageContext:
    """What the per-document stages need besides the document: resolved once per source."""

    languages: list[str]
    wordlist: Path = DEFAULT_WORDLIST
    optout: OptOutSet = field(default_factory=OptOutSet)
    conditions: Conditions | None = None  # the source's declared conditions (licence stage)
    release_licence: str | None = None  # the licence the model is released under (licence stage)


# -------------------------------------------------------------------------------------- licence

_RESTRICTIONS = ("attribution", "share_alike", "no_derivatives")


def document_licence(doc: Doc) -> str | None:
    """The document's own licence, when its record or metadata row gives one (`meta.licence`)."""
    value = doc.meta.get("licence")
    return value.strip() if isinstance(value, str) and value.strip() else None


def licence(doc: Doc, p: dict, ctx: StageContext) -> str | None:
    """Per-document licences (a `licence` metadata field, e.g. a dataset with a licence column).

    A document without one is under its source's licence, which the release policy accepted when
    the sources file was loaded. A document with one is removed when the licence is unknown
    (`licence.unknown`), when it imposes more than its source's declared conditions, which the
    manifest states for every document of the source (`licence.conditions`), or when the release
    policy refuses it for the target licence (`licence.refused`).
    """
    lic = document_licence(doc)
    if lic is None or ctx.conditions is None or ctx.release_licence is None:
        return None
    if lic not in LICENCES:
        return "licence.unknown"
    terms, declared = LICENCES[lic], ctx.conditions
    if (not terms.commercial and declared.commercial) or any(
        getattr(terms, name) and not getattr(declared, name) for name in _RESTRICTIONS
    ):
        return "licence.conditions"
    if policy_violation(lic, declared, ctx.release_licence):
        return "licence.refused"
    return None


PER_DOC_STAGES = {
    "normalise": normalise,
    "quality": quality,
    "langid": langid,
    "toxicity": toxicity,
    "pii": pii,
    "optout": optout,
    "licence": licence,
}
