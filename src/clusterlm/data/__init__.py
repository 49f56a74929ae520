"""Data layer: text -> tokenizer -> checksummed token shards -> deterministic, rank-aware batches.

Modules: ``corpus`` (embedded Shakespeare, Gutenberg cleanup), ``tokenizer`` (char, byte-level
BPE, tokenizer.json), ``prepare`` (the ``clusterlm prepare`` command), ``manifest`` (what a
prepared directory holds, and its checks), ``loader`` (training and evaluation batches) and
``storage`` (local and fsspec paths, atomic writes); labelled tasks: ``task`` (format and
reader), ``task_prepare`` (``clusterlm prepare --task``), ``plays`` and ``jsonl_task``; translation
tasks: ``translation`` (format and reader), ``translation_prepare``, ``bible``, ``verse_text`` and
``sword_dump`` (the English-Spanish Bible from SWORD modules) and ``pair_batches``. Import from
the modules; this package imports nothing, so ``clusterlm prepare`` does not load torch.
"""
