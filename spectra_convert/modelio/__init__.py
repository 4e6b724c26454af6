"""Everything about model folders and files, nothing about MoE routing (docs/ARCHITECTURE.md, "Layers").

``resolve`` (local folder or Hub id), ``config`` (parent configs), ``adapters`` (the architecture registry),
``outdir`` (atomic output folders), ``safetensors_files`` (one file: header, tensor reads, writes),
``checkpoint`` (a folder's shards: ``CheckpointReader``, ``ShardWriter``), ``direct_io`` (``O_DIRECT``
writes), ``dense_ffn`` (a dense parent's FFN read from its files), ``gguf_once`` (GGUF parsed once),
``side_files`` (tokenizer files, shipped runtime, ``config.json``).
"""
