"""A 2-rank script (started with torchrun's environment variables, see test_teardown.py) that tears
the process group down while MoELayer outputs, and so their autograd graphs with the started
all-to-alls, are still alive."""

import torch
import torch.distributed as dist

from expert_parallel import MoEConfig, MoELayer

OUTPUTS = []  # a global: the graphs are still alive when the interpreter shuts down


def main() -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    # num_chunks=2: the started (async) all-to-alls, whose works the graph's tickets hold
    layer = MoELayer(MoEConfig(d_model=8, d_ff=16, num_experts=4, ep_size=2, num_chunks=2))
    OUTPUTS.extend(layer(torch.randn(6, 8, requires_grad=True)) for _ in range(3))
    OUTPUTS[0].output.sum().backward()  # one graph after its backward, two before
    dist.destroy_process_group()
    assert all(out.output.grad_fn is not None for out in OUTPUTS)  # still alive at exit


if __name__ == "__main__":
    main()
