"""Training: token shards and packing (data), stages (recipes), the loop (trainer), LoRA, FSDP2 (distributed).

``qwenlab train CONFIG.toml`` runs a recipe; ``python -m torch.distributed.run --nproc-per-node N -m qwenlab
train CONFIG.toml`` runs the same recipe sharded with FSDP2. The Python entry point is
``qwenlab.train.trainer.train(config)``.
"""
