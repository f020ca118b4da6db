"""Data hygiene over embeddings and indexes: train/test overlap (the CLIP paper's Section 5
analysis and decontamination) and curation of training pairs (duplicates, CLIP-score filtering,
MetaCLIP balancing). Sits above ``search`` and ``eval``; used by ``clipforge data overlap`` and
``clipforge data curate``."""
