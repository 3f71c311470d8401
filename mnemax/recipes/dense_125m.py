"""dense_125m: a GPT-3-Small-sized Llama (12 x 768) for one GPU.

Point `data.source` at a directory from `mnemax data prepare` with a real tokenizer; the default
(stdlib bytes) only uses 257 of the 32,768 output classes.
"""

from mnemax.layers.transformer import TransformerConfig
from mnemax.parallel.strategy import Strategy
from mnemax.trainer.checkpoint import CheckpointConfig
from mnemax.trainer.config import EvalConfig, RunConfig
from mnemax.trainer.data import DataConfig
from mnemax.trainer.optimizer import OptimizerConfig, ScheduleConfig
from mnemax.trainer.recipe import Recipe


def recipe() -> Recipe:
    return Recipe(
        name="dense_125m",
        model=TransformerConfig(vocab_size=32768, num_layers=12, d_model=768, num_heads=12,
                                mlp_dim=2048),
        strategy=Strategy(mesh="data:-1", zero_stage=0, remat="none"),
        data=DataConfig(source="stdlib", seq_len=2048, global_batch=64),
        optimizer=OptimizerConfig(learning_rate=6e-4, weight_decay=0.1),
        schedule=ScheduleConfig(warmup_steps=700, decay="cosine", min_lr_ratio=0.1),
        checkpoint=CheckpointConfig(every=1000, keep=3),
        eval=EvalConfig(every=1000, batches=16),
        run=RunConfig(steps=20_000, grad_accum=2, compute_dtype="bfloat16", log_every=50),
    )
