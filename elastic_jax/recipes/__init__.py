"""Recipes: a config dataclass and the runner that executes it (the class's `run(out_dir)` method
names it). `star_elastic`: the main job."""
