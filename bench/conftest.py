"""Benchmarks: `python -m pytest bench --benchmark-json=bench/results/NAME.json` on a GPU node.

On a machine without CUDA the same tests run at tiny sizes under Triton's interpreter, only to
show that they run and report: their timings mean nothing.
"""
import datetime
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is imported

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A compiled mode that hits dynamo's recompile limit would run eager and be timed under the wrong
# name: make that an error instead.
torch._dynamo.config.fail_on_recompile_limit_hit = True


def pytest_benchmark_update_machine_info(config, machine_info):
    import triton
    machine_info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (interpreter)"
    machine_info["torch"] = torch.__version__
    machine_info["triton"] = triton.__version__
    machine_info["cuda"] = torch.version.cuda
    machine_info["command"] = " ".join(sys.argv)
    machine_info["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
