"""Real processes for tests and benchmarks: redis-server, Nebula's daemons, the
test engine, a whole single-machine cluster. Not shipped with Nebula; `tests/`
and `bench/` both stand on it, and neither imports the other."""
