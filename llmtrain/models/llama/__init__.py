"""The Llama family (Llama, Qwen2, Mistral, Qwen3 layouts): the model (model.py), the Hugging Face format
(convert.py) and the registered spec (spec.py)."""
