"""The search service: the production store's CURRENT release behind an HTTP API and a
page (`python -m components serve`). Layer: above release/, below the entry points."""
