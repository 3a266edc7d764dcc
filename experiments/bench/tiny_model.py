"""The tiny model the benchmarks run on: demo.yaml plus these overrides (SFT warm start cached under
model.cache_dir). One list, so every benchmark measures the same model."""

from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
TINY = [
    "model.hidden_size=128",
    "model.num_heads=2",
    "model.num_kv_heads=1",
    "model.num_layers=2",
    "model.intermediate_size=256",
    "model.vocab_size=384",
    "data.num_train=256",
    "trainer.sft_steps=150",
    "trainer.sft_batch_size=32",
    "logging.progress=false",
    "logging.wandb_mode=disabled",
]
