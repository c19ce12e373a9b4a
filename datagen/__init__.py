"""subject-ffhq dataset construction: sources, the four annotation stages, records, shards. No Ray here."""
