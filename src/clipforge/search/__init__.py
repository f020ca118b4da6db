"""Embedding at scale, vector index and search service (``clipforge embed | index | dedup | serve``).

    layout.py    the on-disk layout of embedding and index directories, read by writers and readers
    sources.py   what to embed: image folders, CSV/TSV/Parquet of paths, WebDataset shards, text files
    decode.py    image decoding in DataLoader workers (JPEG draft mode) or batched on the device
    embed.py     resumable float16 .npy + Parquet parts (the clip-retrieval layout), torchrun ranks
    index.py     index kind by size and memory budget, recall@k against exact search, tuning
    build.py     create / add to / remove from an index directory (FAISS + SQLite, versioned)
    store.py     SQLite metadata next to the index, metadata filters
    searcher.py  k-NN search with filters over an index directory
    dedup.py     near-duplicate groups from the index
    service.py   FastAPI app (``create_app``) and its web page in static/; http.py: its models, host
                 and origin checks; engine.py: the model-side work behind it and ``ServeSettings``

Nothing is imported here, so ``import clipforge.search`` stays cheap.
"""
