"""The operator's side: `nebula-cli` (`main`), `nebula-shell` (`shell`), the admin
API's client and the tables they print (`client`, `console`, `commands`,
`key_commands`), and model preparation (`prepare`, run by `nebula models`).

Nothing here runs in a cluster's processes: the router, scheduler and agents
never import it (the import contract in pyproject.toml says so)."""
