"""The online driver: workers, stop and signals around the row pipeline."""
