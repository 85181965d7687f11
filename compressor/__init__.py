"""The Transformer autoencoder that compresses 512 tokens into 8 latents."""
