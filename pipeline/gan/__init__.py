"""The GAN core: architectures, losses, the training step and loop, sampling. No files, no MLflow."""
