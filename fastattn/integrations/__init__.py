"""Integrations of fastattn into other libraries (optional dependencies, imported on demand).

    fastattn.integrations.transformers.register()   # attn_implementation="fastattn" in Hugging Face transformers
"""
