"""The worker: model runner, sampler, weight and tokenizer loading, CUDA graphs; owns the device."""
