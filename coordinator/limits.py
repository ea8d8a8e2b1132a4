"""Every limit a change event must meet, in one place: the strictest of the stores it reaches.

An event is validated against these before anything is prepared, so that a store never gets
the chance to refuse a document halfway through a two-phase apply. Each limit names the store
(or lockstep's own reason) it comes from; docs/configuration.md ("Input limits") lists them.

=========================  ==========  ============================================================
limit                      value       where it comes from
=========================  ==========  ============================================================
CHUNK_ID_BYTES_MAX         512 B       Elasticsearch/OpenSearch ``_id``; the Tantivy adapter
                                       refuses the same (every keyword backend accepts the same IDs)
CHUNK_INDEX_DIGITS_MAX     7 digits    a TEXT_BYTES_MAX text cut into 1-character chunks
DOC_ID_BYTES_MAX           498 B       CHUNK_ID_BYTES_MAX minus ``:chunk-`` and the index digits
doc_id characters          no Cc       Milvus VARCHAR keys refuse NUL; control characters in IDs
                                       are never intended, and invisible in every tool
VERSION_MAX                2^63 - 1    ES external versions and Milvus INT64 are signed longs
TEXT_BYTES_MAX             8 MiB       lockstep's own: a bigger document is a blob or a dump
METADATA_BYTES_MAX         64 KiB      Milvus JSON field (65,536 B, compact encoding)
METADATA_INT_MIN/MAX       int64       Milvus JSON integers; ES ``long``
RECORD_BYTES_MAX           ~24 MiB     the longest source record that can still be a valid event;
                                       dead letters keep records whole up to it
METADATA_DEPTH_MAX         32 levels   lockstep's own (Milvus's JSON encoder stops at 254)
CHUNK_CHARS_MAX            16,383      Milvus VARCHAR text (65,535 B) / 4 B per character: bounds
                                       ``chunking.max_chars + overlap_chars``
=========================  ==========  ============================================================
"""

from __future__ import annotations

# Elasticsearch and OpenSearch refuse an ``_id`` over 512 bytes (a whole-request error in
# ``_bulk``); chunk IDs are the keyword index's ``_id``.
CHUNK_ID_BYTES_MAX = 512
# ``:chunk-`` (coordinator.chunking.CHUNK_SEPARATOR, which imports this module) in bytes.
CHUNK_SEPARATOR_BYTES = 7
# A TEXT_BYTES_MAX text cut into 1-character chunks has fewer than 10^7 of them.
CHUNK_INDEX_DIGITS_MAX = 7
# The longest doc_id whose every chunk ID fits CHUNK_ID_BYTES_MAX.
DOC_ID_BYTES_MAX = CHUNK_ID_BYTES_MAX - CHUNK_SEPARATOR_BYTES - CHUNK_INDEX_DIGITS_MAX
# Versions travel as ES external versions and Milvus INT64 values: signed 64-bit integers.
VERSION_MAX = 2**63 - 1
# A bigger document is almost certainly a mistake (a binary blob, a dump) and would produce
# thousands of chunks in one transaction; it goes to the dead-letter queue instead.
TEXT_BYTES_MAX = 8 * 1024 * 1024
# Metadata is copied onto every chunk in both indexes; Milvus refuses a JSON value over 64 KiB.
METADATA_BYTES_MAX = 64 * 1024
# Milvus stores JSON integers as int64 and refuses the whole request for a bigger one.
METADATA_INT_MIN, METADATA_INT_MAX = -(2**63), 2**63 - 1
# The longest source record (a JSON line, a request item) that can still be a valid event: a
# TEXT_BYTES_MAX text can triple when a writer escapes it (``ensure_ascii`` spells a 4-byte
# character as a 12-byte surrogate pair), plus metadata and field names. A dead letter keeps a
# record whole up to this size.
RECORD_BYTES_MAX = 3 * TEXT_BYTES_MAX + 2 * METADATA_BYTES_MAX
# Objects and arrays nested deeper than this are refused: no filter reaches that deep, and
# Milvus's JSON encoder gives up at 254 levels.
METADATA_DEPTH_MAX = 32
# Milvus's text field is a VARCHAR of at most 65,535 bytes, and a character takes up to 4 bytes
# in UTF-8: a chunk (max_chars plus overlap_chars characters) must stay within this.
CHUNK_CHARS_MAX = 65_535 // 4
