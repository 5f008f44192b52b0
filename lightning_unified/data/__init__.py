"""Data: reading example files (:mod:`files`), chat templates (:mod:`chat`) and turning
tokenized examples into the batch fields of :mod:`lightning_unified.batch` (:mod:`collate`)."""
