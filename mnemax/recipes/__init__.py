"""Built-in recipes (one module each, `recipe() -> Recipe`), the `--set` overrides, the registry
that finds a recipe by name or path, and `mnemax show` (`summary`). The `Recipe` schema lives in
`mnemax.trainer.recipe`, so that the trainer reads it without importing this package."""
