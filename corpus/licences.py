"""Licences the corpus knows, what each permits, and the release policy built on them.

A source's usage conditions are machine-readable (commercial use, attribution, share-alike,
no-derivatives, allowed training phases). They default to what its licence implies; a source may
declare stricter conditions (an owner's terms), never looser ones. The policy refuses a source whose
conditions forbid releasing a model trained on it under the target licence.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from common.errors import UserError

# Training phase kinds (train/'s recipe `kind`); `conditions.phases` lists the ones a source may feed.
PHASES = ("pretrain", "context-extension", "anneal", "sft")


@dataclass(frozen=True)
class Terms:
    """What a licence permits (True = allowed / required)."""

    commercial: bool
    attribution: bool
    share_alike: bool
    no_derivatives: bool


_T, _F = True, False
# SPDX identifiers (plus `public-domain`). Terms: commercial, attribution, share_alike, no_derivatives.
LICENCES: dict[str, Terms] = {
    "public-domain": Terms(_T, _F, _F, _F),
    "CC0-1.0": Terms(_T, _F, _F, _F),
    "PDDL-1.0": Terms(_T, _F, _F, _F),
    "Unlicense": Terms(_T, _F, _F, _F),
    "CC-BY-3.0": Terms(_T, _T, _F, _F),
    "CC-BY-4.0": Terms(_T, _T, _F, _F),
    "CC-BY-SA-3.0": Terms(_T, _T, _T, _F),
    "CC-BY-SA-4.0": Terms(_T, _T, _T, _F),
    "CC-BY-NC-4.0": Terms(_F, _T, _F, _F),
    "CC-BY-NC-SA-4.0": Terms(_F, _T, _T, _F),
    "CC-BY-ND-4.0": Terms(_T, _T, _F, _T),
    "CC-BY-NC-ND-4.0": Terms(_F, _T, _F, _T),
    "ODC-By-1.0": Terms(_T, _T, _F, _F),
    "ODbL-1.0": Terms(_T, _T, _T, _F),
    "etalab-2.0": Terms(_T, _T, _F, _F),
    "MIT": Terms(_T, _T, _F, _F),
    "BSD-2-Clause": Terms(_T, _T, _F, _F),
    "BSD-3-Clause": Terms(_T, _T, _F, _F),
    "Apache-2.0": Terms(_T, _T, _F, _F),
    "GPL-3.0-only": Terms(_T, _T, _T, _F),
    "GPL-3.0-or-later": Terms(_T, _T, _T, _F),
}

# Share-alike licences whose terms are satisfied by releasing under another licence.
_SHARE_ALIKE_COMPATIBLE = {
    "CC-BY-SA-3.0": {"CC-BY-SA-3.0", "CC-BY-SA-4.0"},
    "CC-BY-SA-4.0": {"CC-BY-SA-4.0", "GPL-3.0-only", "GPL-3.0-or-later"},
    "GPL-3.0-only": {"GPL-3.0-only"},
    "GPL-3.0-or-later": {"GPL-3.0-or-later", "GPL-3.0-only"},
    "ODbL-1.0": {"ODbL-1.0"},
    "CC-BY-NC-SA-4.0": {"CC-BY-NC-SA-4.0"},
}


@dataclass(frozen=True)
class Conditions:
    """A source's usage conditions as written in the manifest."""

    commercial: bool
    attribution: bool
    share_alike: bool
    no_derivatives: bool
    phases: tuple[str, ...] = field(default=PHASES)

    def to_json(self) -> dict:
        d = asdict(self)
        d["phases"] = list(self.phases)
        return d


def check_licence(licence: object, where: str) -> str:
    """Return the licence id if known, else raise naming the place and the known ids."""
    if not isinstance(licence, str) or licence not in LICENCES:
        lowered = {k.lower(): k for k in LICENCES}
        hint = (
            f" (did you mean {lowered[str(licence).lower()]!r}?)" if str(licence).lower() in lowered else ""
        )
        raise UserError(f"{where}: unknown licence {licence!r}{hint}; known: {', '.join(sorted(LICENCES))}")
    return licence


def conditions_for(licence: str, declared: dict | None, where: str) -> Conditions:
    """The conditions of a source: its licence's terms, tightened (never loosened) by `declared`."""
    terms = LICENCES[licence]
    declared = dict(declared or {})
    values = {}
    for name in ("commercial", "attribution", "share_alike", "no_derivatives"):
        implied = getattr(terms, name)
        value = declared.pop(name, implied)
        if not isinstance(value, bool):
            raise UserError(f"{where}.conditions.{name}: expected true or false, got {value!r}")
        # For `commercial` True is the looser value; for the three obligations False is.
        looser = (value and not implied) if name == "commercial" else (implied and not value)
        if looser:
            raise UserError(
                f"{where}.conditions.{name}: {value} is looser than licence {licence} allows ({implied})"
            )
        values[name] = value
    phases = declared.pop("phases", list(PHASES))
    if not isinstance(phases, list) or not phases or any(p not in PHASES for p in phases):
        raise UserError(
            f"{where}.conditions.phases: expected a non-empty list of {list(PHASES)}, got {phases!r}"
        )
    if declared:
        raise UserError(f"{where}.conditions: unknown key {sorted(declared)[0]!r}")
    return Conditions(**values, phases=tuple(p for p in PHASES if p in phases))


def policy_violation(source_licence: str, conditions: Conditions, target: str) -> str | None:
    """Why releasing under `target` is forbidden by a source's conditions (None when allowed)."""
    target_terms = LICENCES[target]
    if conditions.no_derivatives:
        return "its conditions forbid derivatives (a trained model is one)"
    if not conditions.commercial and target_terms.commercial:
        return f"its conditions forbid commercial use, which {target} permits"
    if conditions.share_alike and target not in _SHARE_ALIKE_COMPATIBLE.get(source_licence, {source_licence}):
        return f"it is share-alike: a release must be under {source_licence} or a compatible licence"
    return None
