"""`facetrain`: one command for every stage of the project (see `facetrain --help`, docs/design.md)."""
