"""pytest setup shared by the test files: one torch thread. The tests run tiny shapes, where a
second thread mostly contends for the 2 cores (a 20-step SFT took 0.6 s with 1 thread, 3-44 s with 2)."""
import torch

torch.set_num_threads(1)
