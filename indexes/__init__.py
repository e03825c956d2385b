"""Indexing an image collection into FAISS + SQLite, and searching it."""
