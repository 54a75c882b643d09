"""Presets of every model family, importable as a package (`configs.base` holds the shared defaults); each file
is also a config file for `--config=configs/<family>.py:<preset>`."""
