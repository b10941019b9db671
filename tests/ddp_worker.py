"""Run by torchrun in the DDP tests: train, then write this rank's parameters and buffers."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vaegan.cli import train_parser  # noqa: E402
from vaegan.config import config_from_args, explicitly_given  # noqa: E402
from vaegan.trainer import train  # noqa: E402



def fail_to_compile_masked_steps():
    """This process's masked optimizer steps cannot compile whole (a graph break under fullgraph=True); eager they
    run as ever."""
    from vaegan import optimizers, train_step

    def breaks_the_graph(optimizer, update):
        torch._dynamo.graph_break()
        optimizers.masked_update(optimizer, update)
    train_step.masked_update = breaks_the_graph


def test_settings():
    """What the DDP tests set through the environment: the CUDA path's masked steps (VAEGAN_TEST_MASKED), compiling
    by default as on CUDA (VAEGAN_TEST_COMPILE_BY_DEFAULT), and a compile failure on one rank only
    (VAEGAN_TEST_MASKED_COMPILE_FAILS_ON_RANK)."""
    from vaegan import options
    from vaegan.train_step import TrainStep
    if os.environ.get("VAEGAN_TEST_MASKED"):
        TrainStep.read_cpu_decisions = False
    if os.environ.get("VAEGAN_TEST_COMPILE_BY_DEFAULT"):
        options.resolve_compile = lambda cfg, device_type, world_size: (cfg.compile is not False, False, "default")
    if os.environ.get("VAEGAN_TEST_MASKED_COMPILE_FAILS_ON_RANK") == os.environ.get("RANK", "0"):
        fail_to_compile_masked_steps()


if __name__ == "__main__":
    test_settings()
    parser = train_parser()
    argv = sys.argv[1:]
    result = train(config_from_args(parser.parse_args(argv), explicitly_given(parser, argv)))
    rank = int(os.environ.get("RANK", "0"))
    torch.save(result.model.state_dict(), os.path.join(result.out, f"rank{rank}.pt"))
