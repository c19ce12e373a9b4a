"""subject-ffhq's trainer: stream shards, FastComposer model and losses, Ray Train entry point."""
