"""What a rebuild's target (``GenerationSpec``) registers and which generations it recognises."""

from __future__ import annotations

from dataclasses import replace

from coordinator.chunking import ChunkingSettings
from coordinator.generations import GenerationSpec, GenState, physical_names

SPEC = GenerationSpec({"kind": "hashing", "dim": 48}, "hashing-d48", 48, ChunkingSettings(120, 20))


def test_a_spec_registers_a_building_generation_in_the_stores_it_is_given() -> None:
    """The new generation is being built, under the given names, with the spec's embedder record."""
    gen = SPEC.generation(2, physical_names("docs", "chunks", 2), created_at=1.5)
    assert (gen.number, gen.state, gen.keyword_index, gen.vector_collection) == (2, GenState.BUILDING, "docs-g2",
                                                                                 "chunks_g2")
    assert (gen.model_id, gen.dim, gen.chunking, dict(gen.embedder)) == ("hashing-d48", 48, SPEC.chunking,
                                                                         {"kind": "hashing", "dim": 48})
    assert gen.created_at == 1.5 and not gen.backfill_done


def test_a_spec_recognises_only_a_generation_with_its_model_dimension_and_chunking() -> None:
    """Same model, dimension and chunking: built with it; any one of them different: not."""
    gen = SPEC.generation(2, ("a", "b"), created_at=0.0)
    assert SPEC.built(gen)
    assert SPEC.built(replace(gen, embedder={"kind": "hashing"}))  # the record is not the identity
    assert not SPEC.built(replace(gen, model_id="other"))
    assert not SPEC.built(replace(gen, dim=24))
    assert not SPEC.built(replace(gen, chunking=ChunkingSettings(70, 20)))
