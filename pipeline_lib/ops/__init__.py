"""Views over a whole workspace for the CLI: status, summaries, doctor, and the demo's data."""
