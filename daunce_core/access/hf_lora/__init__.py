"""The ``hf_lora`` kind: Hugging Face causal LMs and classifiers, copies as LoRA adapters."""
