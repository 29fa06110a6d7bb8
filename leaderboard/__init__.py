"""The static leaderboard: `bench leaderboard build` turns `results/**/*.json` into a site that opens from disk.

- `leaderboard.data`: reading the results tree (invalid files skipped with a reason, `.verified.json` markers
  read as the verified flag), flattening records into table rows, Pareto fronts, tie-aware ranks and quality
  budgets; shared by the site and by `bench recommend`.
- `leaderboard.build`: renders the pages with jinja2 (autoescaped) and writes the site atomically.
- `leaderboard.cli`: the `bench leaderboard build|serve` commands and `bench recommend`.

Module scope stays light everywhere in this package: no torch, and jinja2 is imported only when building.
"""
