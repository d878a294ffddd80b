"""The torch backend's fast CUDA engine (gpt-fast style Llama, W4A16 int4 kernels); see engine.py."""
