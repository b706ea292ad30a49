"""The command line and what it runs: thin front-ends over the library (generate, checks before loading, loading
by preset or folder, output files, the offline demo). Nothing here is imported by the library."""
