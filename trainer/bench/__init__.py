"""Benchmarks behind `scripts/bench.py`: the NVAE training step (`nvae`), the depthwise convs' backward
(`depthwise`), Langevin and the energy-training iteration (`ebm`), bundle sampling (`sample`), the data stream
(`data`), CPU thread settings under contention (`contention`) and the one-command GPU suite (`gpu_suite`, its
parts in `gpu_parts`). Each returns a dict; the script prints JSON."""
