"""ovseg.curation: caption sources, spaCy parsing, entity selection, manifest, entity index,
pairs, image download and the synthetic captioned-shapes world.

Imports nothing of ovseg. Heavy dependencies (spaCy, DuckDB, img2dataset) load inside the
stage that needs them.
"""
