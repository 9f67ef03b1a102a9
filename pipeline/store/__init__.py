"""Where artifacts live and how they are written: paths, atomic io with provenance, artifact groups,
figures, and the experiment leaderboard with its storage. Imports nothing above it."""
