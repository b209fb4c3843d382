"""Hugging Face interop: config.json and the published tensor layout <-> moejax, a model
directory's tokenizer, and the import, export and upcycle commands."""
