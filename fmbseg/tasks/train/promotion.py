"""Champion promotion: the rule that decides whether a new model version replaces the champion.

A pure decision (metrics in, verdict out) plus :func:`decide_and_record`, which writes the
verdict to the registry: ``champion.json`` history and the new version's card.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fmbseg.storage.models import ModelRegistry

METRIC = "mIoU"


@dataclass(frozen=True)
class Verdict:
    promote: bool
    reason: str


def decide(
    candidate: dict[str, Any] | None,
    champion: dict[str, Any] | None,
    has_champion: bool,
    metric: str = METRIC,
) -> Verdict:
    """Promote when there is no champion yet, or the candidate is at least as good.

    Args:
        candidate: the new version's evaluation metrics (``None``: not evaluated).
        champion: the champion's metrics on the same evaluation set (``None``: unknown).
        has_champion: whether a champion exists at all.
    Without an evaluation, only a first model is promoted: an unmeasured model never
    replaces a champion.
    """
    if not has_champion:
        return Verdict(True, "no champion yet: the first model becomes the champion")
    new = None if candidate is None else candidate.get(metric)
    if new is None:
        return Verdict(False, f"not evaluated ({metric} unknown): the champion stays")
    old = None if champion is None else champion.get(metric)
    if old is None:
        return Verdict(True, f"{metric} {new:.4f}; the champion has no {metric} on this set")
    if new >= old:
        return Verdict(True, f"{metric} {new:.4f} >= champion's {old:.4f}")
    return Verdict(False, f"{metric} {new:.4f} < champion's {old:.4f}: the champion stays")


def decide_and_record(
    registry: ModelRegistry,
    name: str,
    version: str,
    candidate: dict[str, Any] | None,
    champion: dict[str, Any] | None,
    context: dict[str, Any] | None = None,
) -> Verdict:
    """Apply :func:`decide` and record it: champion history + ``promotion`` in the card.

    A version that already is the champion is left as it is (a rerun decides nothing new).
    A first model becomes the champion through :meth:`ModelRegistry.promote_first`, so of
    two first models trained at once exactly one does.
    """
    current = registry.champion(name)
    if current == version:
        return Verdict(True, "already the champion")
    verdict = decide(candidate, champion, current is not None)
    metrics = dict(candidate or {})
    if current is None and not registry.promote_first(name, version, verdict.reason, metrics):
        # another first model won the race: decide against it as for any later model
        return decide_and_record(registry, name, version, candidate, None, context)
    if current is not None and verdict.promote:
        registry.promote(name, version, verdict.reason, metrics)
    elif not verdict.promote:
        registry.reject(name, version, verdict.reason, metrics)
    registry.update_card(
        name,
        version,
        {
            "promotion": {
                "promoted": verdict.promote,
                "reason": verdict.reason,
                "previous_champion": current,
                "candidate_metrics": metrics,
                "champion_metrics": dict(champion or {}),
                **(context or {}),
            }
        },
    )
    return verdict


def promote_if_first(registry: ModelRegistry, name: str, version: str) -> Verdict | None:
    """The one rule for a freshly trained version: the first model of ``name`` becomes its
    champion; later ones only by an explicit decision (evaluation or ``fmbseg models
    promote``). Returns the verdict when ``version`` was promoted, else None."""
    if registry.champion(name) is not None:
        return None
    verdict = decide_and_record(registry, name, version, None, None)
    return verdict if verdict.promote else None
