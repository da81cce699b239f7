"""Compare methods on equal terms: every (method, seed) of a preset run through Flower, then
one table (Markdown, CSV, JSON) and plots over the run directories.

    python -m server.compare --preset conf/miniature.toml --methods pfedmma,zeroshot --seeds 0,1,2

See :mod:`server.compare.cli` for the options and docs/compare.md for the results folder.
"""
