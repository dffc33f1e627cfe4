"""The experiments' own code that the library does not know: the judges of their tasks (registered by name
in pyproject.toml), kept out of `rlhf/` so that the library names no experiment."""
