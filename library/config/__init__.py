"""Run configuration as a pure schema: the TOML sections every trainer shares, the loader that applies
`section.key=value` overrides, and error formatting (every problem at once, with its TOML line).

Nothing here imports a model, a registry or a tokenizer, touches the file system beyond reading the TOML,
or changes a value while validating; checks that need those live in the run step (library/recipes/resolve.py).
"""
