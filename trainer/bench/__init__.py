"""Benchmarks behind `scripts/bench.py`: the NVAE training step (`nvae`), the CPU fast paths of the layers
(`cpu_paths`: the depthwise convs' backward, ELU), Langevin and the energy-training iteration (`ebm`), bundle
sampling (`sample`), the data stream (`data`), CPU thread settings under contention (`contention`) and the
one-command GPU suite (`gpu_suite`, its parts in `gpu_parts`). Each returns a dict; the script prints JSON."""
