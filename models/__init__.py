"""The GPT model: megatron-core ``GPTModel`` built from a layer spec, configs and presets."""
