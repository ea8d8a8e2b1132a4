"""A deterministic help-center corpus generator for the demo, the tests and the benchmarks.

Documents are built from a seeded ``random.Random``, so the same seed always yields the same
texts. Each paragraph is sized so that, with the default chunking (1000 chars), one paragraph
becomes one chunk: edits to one paragraph touch exactly one chunk.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any

TOPICS = {
    "billing": ["invoice", "refund", "credit card", "subscription", "VAT receipt", "payment method"],
    "account": ["password", "two-factor login", "email address", "profile", "username", "session"],
    "shipping": ["parcel", "tracking number", "courier", "delivery window", "customs form", "address label"],
    "returns": ["return label", "exchange", "damaged item", "refund window", "warranty", "restocking fee"],
    "integrations": ["webhook", "API token", "Slack app", "calendar sync", "SSO", "CSV export"],
    "security": [
        "data deletion",
        "audit log",
        "encryption",
        "access role",
        "IP allowlist",
        "privacy request",
    ],
}
_VERBS = [
    "reset",
    "update",
    "cancel",
    "download",
    "verify",
    "change",
    "enable",
    "remove",
    "request",
    "review",
]
_PLACES = [
    "Settings",
    "the Billing page",
    "the mobile app",
    "your dashboard",
    "the Help menu",
    "the admin console",
]
_TIMES = [
    "within 24 hours",
    "in 3 to 5 business days",
    "immediately",
    "at the end of the cycle",
    "within 30 days",
]
_TEMPLATES = [
    "To {verb} your {thing}, open {place} and choose the {thing} section.",
    "Most customers can {verb} a {thing} {time}; enterprise plans follow their contract instead.",
    "If the {thing} does not appear, sign out, sign back in and try to {verb} it again from {place}.",
    "Support agents can {verb} the {thing} for you, but they will ask you to confirm the request by email.",
    "Changes to a {thing} are logged, and an administrator can review them from {place} {time}.",
    "We never ask for your {thing} over the phone; report such calls to the security team.",
    "A {thing} that was changed by mistake can be restored {time} by contacting support.",
]


@dataclass(frozen=True)
class Doc:
    doc_id: str
    version: int
    paragraphs: tuple[str, ...]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "\n\n".join(self.paragraphs)


def paragraph(rng: random.Random, topic: str, target_chars: int) -> str:
    """One paragraph about ``topic`` of roughly ``target_chars`` characters (never more)."""
    sentences: list[str] = []
    while True:
        thing = rng.choice(TOPICS[topic])
        sentence = rng.choice(_TEMPLATES).format(
            verb=rng.choice(_VERBS), thing=thing, place=rng.choice(_PLACES), time=rng.choice(_TIMES)
        )
        candidate = " ".join([*sentences, sentence])
        if len(candidate) > target_chars and sentences:
            return " ".join(sentences)
        sentences.append(sentence)


def make_doc(rng: random.Random, index: int, *, paragraphs: int, para_chars: int) -> Doc:
    topic = rng.choice(sorted(TOPICS))
    title = f"How to {rng.choice(_VERBS)} your {rng.choice(TOPICS[topic])} ({index})"
    body = tuple(paragraph(rng, topic, para_chars) for _ in range(paragraphs))
    metadata = {"title": title, "topic": topic, "audience": rng.choice(["customer", "admin"])}
    return Doc(f"help/{topic}/{index:06d}", 1, (f"# {title}", *body), metadata)


def make_corpus(
    n: int, *, seed: int = 7, paragraphs: tuple[int, int] = (2, 6), para_chars: int = 700
) -> list[Doc]:
    """``n`` help-center documents; paragraph counts drawn from ``paragraphs`` (inclusive)."""
    rng = random.Random(seed)
    return [make_doc(rng, i, paragraphs=rng.randint(*paragraphs), para_chars=para_chars) for i in range(n)]


def edit_one_paragraph(rng: random.Random, doc: Doc, para_chars: int = 700) -> Doc:
    """The document with one body paragraph rewritten, at the next version."""
    i = rng.randrange(1, len(doc.paragraphs)) if len(doc.paragraphs) > 1 else 0
    paras = list(doc.paragraphs)
    paras[i] = paragraph(rng, doc.metadata["topic"], para_chars) + " (edited)"
    return replace(doc, version=doc.version + 1, paragraphs=tuple(paras))


def shrink(doc: Doc) -> Doc:
    """The document cut to its title and first paragraph, at the next version."""
    return replace(doc, version=doc.version + 1, paragraphs=doc.paragraphs[:2])


def retag(doc: Doc) -> Doc:
    """The document with only its metadata changed, at the next version."""
    audience = "admin" if doc.metadata.get("audience") == "customer" else "customer"
    return replace(doc, version=doc.version + 1, metadata={**doc.metadata, "audience": audience})
