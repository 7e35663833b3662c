"""Model definitions: configuration, RoPE, the Llama-family decoder."""
