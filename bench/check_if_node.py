"""Whether this torch can capture a CUDA-graph conditional (if) node: prints the replays'
results."""

import torch

has = hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node")
print("torch", torch.__version__, "if nodes:", has)
if has:
    x = torch.zeros(4, device="cuda")
    pred = torch.zeros((), dtype=torch.bool, device="cuda")
    y = torch.ones(4, device="cuda")
    (x + y).sum()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        with torch.cuda.graph(g, stream=s):
            cur = torch.cuda.CUDAGraph.get_currently_capturing_graph()
            cur.begin_capture_to_if_node(pred)
            z = (y @ y.view(4, 1)).view(1) * 2  # an allocation and a cuBLAS call inside the body
            x.add_(z)
            cur.end_capture_to_conditional_node()
    for p in (False, True, True, False):
        pred.fill_(p)
        g.replay()
    torch.cuda.synchronize()
    print("x after replays (expect 16s):", x.tolist())
