"""Everything that touches model weights and KV memory."""
