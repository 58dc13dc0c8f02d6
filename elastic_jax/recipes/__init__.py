"""Recipes: a config dataclass and the runner that executes it (registered with
`elastic_jax.experiment.register_runner`). `star_elastic`: the main job."""
