"""A corpus of hostile input lines, each with what lockstep must make of it, and a plain model of
the documents the good lines leave behind.

Every case is one JSONL line (bytes, no newline). ``bad`` is a fragment of the dead-letter reason
it must get, or None for a line that must be applied. The model (``expected_documents``) is
written here, from the JSON the lines spell, without any of lockstep's code: the newest version
of a document wins, a delete leaves it absent, an equal version is a duplicate (the corpus marks
its conflicting lines bad by hand).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# Limits the corpus probes, restated from the docs (docs/configuration.md, "Input limits") rather
# than imported: the corpus must fail if the code moves them.
DOC_ID_BYTES_MAX = 498
TEXT_BYTES_MAX = 8 * 1024 * 1024
METADATA_BYTES_MAX = 64 * 1024
METADATA_DEPTH_MAX = 32
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Case:
    name: str
    line: bytes
    bad: str | None = None
    # How the line ends in a file or a request body.
    ending: bytes = b"\n"


def _line(raw: dict[str, Any], *, ascii_only: bool = True) -> bytes:
    return json.dumps(raw, ensure_ascii=ascii_only).encode("utf-8")


def up(doc_id: Any, version: Any, text: Any = "some text", metadata: Any = None, **extra: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"op": "upsert", "doc_id": doc_id, "version": version, "text": text}
    if metadata is not None:
        raw["metadata"] = metadata
    return raw | extra


def good(name: str, raw: dict[str, Any], *, ascii_only: bool = True) -> Case:
    return Case(name, _line(raw, ascii_only=ascii_only))


def bad(name: str, line: bytes | dict[str, Any], reason: str) -> Case:
    return Case(name, line if isinstance(line, bytes) else _line(line), reason)


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"n": value}
    return value


def cases() -> list[Case]:
    """At least 60 kinds of hostile line, with good lines of their own kind among them."""
    long_id = "d" * DOC_ID_BYTES_MAX
    return [
        # --- not JSON, or not an object ---
        bad("malformed-json", b"{not json", "invalid JSON"),
        bad("truncated-json", b'{"op":"upsert","doc_id":"trunc","version":1,"text":"cut', "invalid JSON"),
        bad("empty-object", b"{}", "unknown op"),
        bad("array", b"[1, 2]", "must be a JSON object"),
        bad("string", b'"just a string"', "must be a JSON object"),
        bad("number", b"42", "must be a JSON object"),
        bad("null", b"null", "must be a JSON object"),
        bad("deep-nesting", b"[" * 100_000, "nested too deeply"),
        bad("bom-mid-file", b"\xef\xbb\xbf" + _line(up("bom-mid", 1)), "invalid JSON"),
        bad("raw-nul-in-string", b'{"op":"upsert","doc_id":"rawnul","version":1,"text":"a\x00b"}', "invalid JSON"),
        bad("raw-tab-in-string", b'{"op":"upsert","doc_id":"rawtab","version":1,"text":"a\tb"}', "invalid JSON"),
        bad("trailing-garbage", _line(up("garbage", 1)) + b" }", "invalid JSON"),
        bad("single-quotes", b"{'op': 'upsert'}", "invalid JSON"),
        # --- bytes that are not UTF-8, and escapes that are not characters ---
        bad("invalid-utf8-text", b'{"op":"upsert","doc_id":"u8","version":1,"text":"bad \xff\xfe bytes"}', "invalid UTF-8"),
        bad("invalid-utf8-doc-id", b'{"op":"upsert","doc_id":"u8\xc3","version":1,"text":"t"}', "invalid UTF-8"),
        bad("overlong-utf8", b'{"op":"upsert","doc_id":"ovl","version":1,"text":"\xc0\x80"}', "invalid UTF-8"),
        bad("lone-high-surrogate", b'{"op":"upsert","doc_id":"sur1","version":1,"text":"x\\ud800y"}', "lone surrogate"),
        bad("lone-low-surrogate-id", b'{"op":"upsert","doc_id":"sur\\udc00","version":1,"text":"t"}', "lone surrogate"),
        good("escaped-surrogate-pair", up("emoji-escaped", 1, "smile \U0001f600 please")),
        good("raw-four-byte-utf8", up("emoji-raw", 1, "raw \U0001f680 rocket"), ascii_only=False),
        good("combining-and-rtl", up("rtl", 1, "e\u0301 \u05e9\u05dc\u05d5\u05dd \u0627\u0644\u0633\u0644\u0627\u0645"), ascii_only=False),
        # --- control characters ---
        good("nul-escaped-in-text", up("nul-text", 1, "before\u0000after")),
        good("controls-escaped-in-text", up("ctl-text", 1, "bell\u0007 tab\t vt\u000b esc\u001b")),
        bad("nul-in-doc-id", up("a\u0000b", 1), "control character U+0000"),
        bad("bell-in-doc-id", up("a\u0007b", 1), "control character U+0007"),
        bad("del-in-doc-id", up("a\u007fb", 1), "control character U+007F"),
        bad("c1-in-doc-id", up("a\u0085b", 1), "control character U+0085"),
        good("nul-in-metadata-key", up("nul-meta-key", 1, metadata={"k\u0000": "v"})),
        good("nul-in-metadata-value", up("nul-meta-value", 1, metadata={"k": "v\u0000w"})),
        # --- op ---
        bad("missing-op", {"doc_id": "noop", "version": 1, "text": "t"}, "unknown op None"),
        bad("unknown-op", up("merge", 1) | {"op": "merge"}, "unknown op 'merge'"),
        bad("op-wrong-case", up("case", 1) | {"op": "UPSERT"}, "unknown op 'UPSERT'"),
        bad("op-number", up("opnum", 1) | {"op": 1}, "unknown op 1"),
        # --- doc_id ---
        bad("missing-doc-id", {"op": "upsert", "version": 1, "text": "t"}, "doc_id must be a non-empty string"),
        bad("empty-doc-id", up("", 1), "doc_id must be a non-empty string"),
        bad("number-doc-id", up(5, 1), "doc_id must be a non-empty string"),
        bad("null-doc-id", up(None, 1), "doc_id must be a non-empty string"),
        bad("object-doc-id", up({"id": 1}, 1), "doc_id must be a non-empty string"),
        bad("chunk-id-as-doc-id", up("x:chunk-1", 1), "reserved for chunk IDs"),
        good("doc-id-at-limit", up(long_id, 1)),
        bad("doc-id-over-limit", up(long_id + "d", 1), f"longer than {DOC_ID_BYTES_MAX} bytes"),
        bad("doc-id-512-bytes", up("e" * 512, 1), f"longer than {DOC_ID_BYTES_MAX} bytes"),
        good("multibyte-doc-id-at-limit", up("\u20ac" * (DOC_ID_BYTES_MAX // 3), 1), ascii_only=False),
        bad("multibyte-doc-id-over", up("\u20ac" * (DOC_ID_BYTES_MAX // 3 + 1), 1), f"longer than {DOC_ID_BYTES_MAX}"),
        good("spaces-and-slashes-in-id", up("  kb/a b?c#d  ", 1)),
        # --- version ---
        bad("missing-version", {"op": "upsert", "doc_id": "nover", "text": "t"}, "missing version"),
        bad("string-version", up("strver", "3"), "version must be an integer"),
        bad("float-version", up("fltver", 1.5), "version must be an integer"),
        bad("integral-float-version", b'{"op":"upsert","doc_id":"fver","version":1.0,"text":"t"}', "version must be an integer"),
        bad("exponent-version", b'{"op":"upsert","doc_id":"ever","version":1e3,"text":"t"}', "version must be an integer"),
        bad("bool-version", up("boolver", True), "version must be an integer"),
        bad("null-version", up("nullver", None), "version must be an integer"),
        bad("negative-version", up("negver", -1), "outside 0..2^63-1"),
        bad("version-overflow", up("bigver", 2**63), "outside 0..2^63-1"),
        good("version-at-max", up("maxver", INT64_MAX)),
        good("version-zero", up("zerover", 0)),
        # --- text ---
        bad("missing-text", {"op": "upsert", "doc_id": "notext", "version": 1}, "upsert needs a text string"),
        bad("null-text", up("nulltext", 1, None), "upsert needs a text string"),
        bad("number-text", up("numtext", 1, 42), "upsert needs a text string"),
        bad("object-text", up("objtext", 1, {"a": 1}), "upsert needs a text string"),
        good("empty-text", up("emptytext", 1, "")),
        good("whitespace-text", up("spacetext", 1, "   \n\n  \t ")),
        good("long-valid-text", up("longtext", 1, "word " * 40_000)),
        bad("oversize-text", up("hugetext", 1, "x" * (TEXT_BYTES_MAX + 1)), f"text larger than {TEXT_BYTES_MAX} bytes"),
        good("crlf-in-text", up("crlf-text", 1, "line one\r\nline two\r\n\r\nnext paragraph")),
        Case("crlf-line-ending", _line(up("crlf-line", 1, "a line ending in CR LF")), ending=b"\r\n"),
        Case("trailing-whitespace", _line(up("trailing-ws", 1, "spaces after the object")) + b" \t "),
        # --- metadata ---
        good("metadata-null", up("metanull", 1, metadata=None) | {"metadata": None}),
        bad("metadata-array", up("metaarr", 1, metadata=[1, 2]), "metadata must be an object"),
        bad("metadata-string", up("metastr", 1, metadata="tenant=a"), "metadata must be an object"),
        bad("metadata-int-over-int64", b'{"op":"upsert","doc_id":"x","version":1,"text":"t","metadata":{"big":1180591620717411303424}}',
            "outside the 64-bit range"),
        bad("metadata-int-under-int64", up("negbig", 1, metadata={"n": -(2**63) - 1}), "outside the 64-bit range"),
        bad("nested-int-over-int64", up("nestbig", 1, metadata={"a": [{"b": 2**64}]}), "outside the 64-bit range"),
        good("metadata-int64-extremes", up("int64ok", 1, metadata={"max": INT64_MAX, "min": -(2**63)})),
        good("metadata-huge-float", up("hugefloat", 1, metadata={"f": 1e308})),
        bad("metadata-float-overflow", b'{"op":"upsert","doc_id":"inf1","version":1,"text":"t","metadata":{"f":1e400}}', "JSON cannot spell"),
        bad("metadata-nan", b'{"op":"upsert","doc_id":"nan1","version":1,"text":"t","metadata":{"f":NaN}}', "JSON cannot spell"),
        bad("metadata-infinity", b'{"op":"upsert","doc_id":"inf2","version":1,"text":"t","metadata":{"f":Infinity}}', "JSON cannot spell"),
        bad("metadata-minus-infinity", b'{"op":"upsert","doc_id":"inf3","version":1,"text":"t","metadata":{"f":-Infinity}}', "JSON cannot spell"),
        bad("metadata-too-deep", up("deepmeta", 1, metadata=_nested(METADATA_DEPTH_MAX + 1)), f"deeper than {METADATA_DEPTH_MAX}"),
        good("metadata-deep-at-limit", up("deepok", 1, metadata=_nested(METADATA_DEPTH_MAX))),
        bad("metadata-oversize", up("bigmeta", 1, metadata={"blob": "m" * METADATA_BYTES_MAX}), f"larger than {METADATA_BYTES_MAX}"),
        good("metadata-empty-key", up("emptykey", 1, metadata={"": "empty key"})),
        good("metadata-dotted-keys", up("dotted", 1, metadata={"a.b": 1, "a": {"b": 2}})),
        good("metadata-unicode", up("unimeta", 1, metadata={"\u8a00\u8a9e": "\u65e5\u672c\u8a9e", "acl": ["t1", "t2"]}),
             ascii_only=False),
        good("metadata-mixed-types", up("mixed", 1, metadata={"b": True, "n": None, "f": 0.5, "l": [1, "a", None]})),
        # --- duplicate keys, extra fields ---
        bad("duplicate-top-level-key", b'{"op":"upsert","op":"delete","doc_id":"dupkey","version":1,"text":"t"}', "more than once"),
        bad("duplicate-metadata-key", b'{"op":"upsert","doc_id":"dupmeta","version":1,"text":"t","metadata":{"a":1,"a":2}}',
            "more than once"),
        good("unknown-extra-field", up("extra", 1, source_url="https://example.org/a")),
        # --- versions against each other ---
        good("conflict-first", up("conflict", 3, "the first text")),
        bad("conflict-second", up("conflict", 3, "another text at the same version"), "conflict"),
        bad("conflict-metadata-only", up("conflict", 3, "the first text", metadata={"acl": "x"}), "conflict"),
        good("duplicate-redelivery", up("conflict", 3, "the first text")),
        good("stale-newer", up("stale", 5, "version five")),
        good("stale-older-arrives-late", up("stale", 4, "version four, late")),
        good("delete-unknown-document", {"op": "delete", "doc_id": "never-seen", "version": 1}),
        good("tombstone-upsert", up("tomb", 1, "alive once")),
        good("tombstone-delete", {"op": "delete", "doc_id": "tomb", "version": 2, "text": "ignored on delete"}),
        good("tombstone-late-older-upsert", up("tomb", 1, "alive once")),
        bad("tombstone-conflicting-upsert", up("tomb", 2, "reusing the delete's version"), "conflict"),
        good("recreate-after-delete", up("recreate", 1, "first life")),
        good("recreate-delete", {"op": "delete", "doc_id": "recreate", "version": 2}),
        good("recreate-upsert", up("recreate", 3, "second life")),
        good("shrink-long", up("shrink", 1, "\n\n".join(f"paragraph {i} " + "z" * 150 for i in range(6)))),
        good("shrink-short", up("shrink", 2, "just one paragraph now")),
        good("metadata-only-before", up("metaonly", 1, "same text", metadata={"acl": "a"})),
        good("metadata-only-after", up("metaonly", 2, "same text", metadata={"acl": "b"})),
    ]


def bom_first_line() -> bytes:
    """A good first line carrying a UTF-8 byte order mark (editors on Windows write one)."""
    return b"\xef\xbb\xbf" + _line(up("bom-first", 1, "after a byte order mark"))


def filler(i: int) -> bytes:
    """A good event between hostile lines: each case must spoil nothing around it."""
    return _line(up(f"good-{i}", 1, f"good document {i} about refunds and invoices"))


@dataclass(frozen=True)
class Expected:
    version: int
    text: str
    metadata: dict[str, Any]


def expected_documents(good_lines: list[bytes]) -> tuple[dict[str, Expected], set[str]]:
    """The live documents the good lines leave, and the IDs that must hold nothing."""
    latest: dict[str, dict[str, Any]] = {}
    for line in good_lines:
        raw = json.loads(line.removeprefix(b"\xef\xbb\xbf").rstrip(b"\r").decode("utf-8"))
        kept = latest.get(raw["doc_id"])
        if kept is None or raw["version"] > kept["version"]:
            latest[raw["doc_id"]] = raw
    live = {
        doc_id: Expected(raw["version"], raw["text"], raw.get("metadata") or {})
        for doc_id, raw in latest.items()
        if raw["op"] == "upsert"
    }
    return live, {doc_id for doc_id, raw in latest.items() if raw["op"] == "delete"}
