"""Training the EasyOmnimatte experts: latent cache, LoRA trainer on the
replica tokens, checkpoints and resume, data parallel across processes."""
