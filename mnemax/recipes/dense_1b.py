"""dense_1b: a Llama-3.2-1B-shaped model (16 x 2048, GQA 32/8, SwiGLU 8192), ~1.1B params.

Sized for one 80 GB GPU with bf16 compute and full activation remat, or FSDP over several.
The loss computes the logits a chunk of positions at a time (`model.factored_logits`).
Point `data.source` at a directory from `mnemax data prepare` with a real tokenizer.
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
        name="dense_1b",
        model=TransformerConfig(vocab_size=32768, num_layers=16, d_model=2048, num_heads=32,
                                num_kv_heads=8, mlp_dim=8192, rope_theta=500_000.0,
                                # Logits over 1 GiB per chip are computed in chunks of
                                # positions: 0.8 GiB less at 16 sequences x 2048 per chip.
                                factored_logits=True),
        strategy=Strategy(mesh="fsdp:-1", zero_stage=3, remat="full"),
        data=DataConfig(source="stdlib", seq_len=2048, global_batch=64),
        optimizer=OptimizerConfig(learning_rate=3e-4, weight_decay=0.1),
        schedule=ScheduleConfig(warmup_steps=2000, decay="cosine", min_lr_ratio=0.1),
        checkpoint=CheckpointConfig(every=1000, keep=3),
        eval=EvalConfig(every=1000, batches=16),
        run=RunConfig(steps=100_000, grad_accum=4, compute_dtype="bfloat16", log_every=50),
    )
