"""Hugging Face checkpoints in and out of this codebase's runs: the command (convert.py), the
family tensor maps (families.py), export's config.json (export.py) and a tensor-by-tensor
safetensors reader (safetensors_reader.py)."""
