"""Sharded elastic distillation: configs, mesh + rules, chunked KD, optimizer groups, the loop,
orbax checkpoints and metrics (METHOD §6-7, §14). Entry points: `train_elastic`, `train_kd`,
`train_lm` (loop.py)."""
from ..errors import CheckpointCorrupt, CheckpointMismatch, TrainingDiverged
from .checkpoint import Checkpointer, params_fingerprint
from .config import MeshConfig, OptimConfig, Stage, TrainConfig
from .loop import TrainResult, train_elastic, train_kd, train_lm
from .sharding import DEFAULT_RULES, init_distributed, logical_to_spec, make_mesh, tree_shardings
from ..data import DataConfig

__all__ = ["MeshConfig", "OptimConfig", "Stage", "TrainConfig", "DataConfig", "TrainResult", "TrainingDiverged",
           "train_elastic", "train_kd", "train_lm", "CheckpointMismatch", "CheckpointCorrupt", "Checkpointer", "params_fingerprint", "DEFAULT_RULES",
           "init_distributed", "logical_to_spec", "make_mesh", "tree_shardings"]
