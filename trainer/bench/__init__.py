"""Benchmarks behind `scripts/bench.py`: the NVAE training step (`nvae`), Langevin and the energy-training iteration
(`ebm`), bundle sampling (`sample`) and the data stream (`data`). Each returns a dict; the script prints JSON."""
