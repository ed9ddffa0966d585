"""Data: the embedded demo corpus, offline preparation and collation."""
